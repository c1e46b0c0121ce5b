#!/usr/bin/env bash
# Installs the embedded default data (Debian's dataset-fashion-mnist), jemalloc (libjemalloc2: XLA:CPU's step
# buffers on several host devices reuse its freed pages, see diffusion_jax/host_memory.py) and a C++ compiler (g++:
# diffusion_jax/models/native builds its CPU kernels with it on first use) unless they are there.
set -euo pipefail
missing=()
[ -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
# found as diffusion_jax.host_memory finds it
python3 -c "import ctypes.util, sys; sys.exit(not ctypes.util.find_library('jemalloc'))" || missing+=(libjemalloc2)
command -v g++ >/dev/null || command -v clang++ >/dev/null || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}"
fi
