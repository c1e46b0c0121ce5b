#!/usr/bin/env bash
# The README's GPU rows, in one command on a machine with one GPU and jax with CUDA (run from the repo root):
#   bash bench/gpu.sh [OUT_DIR] [levers|peers|all]
# levers (~6-7 min on an H200, mostly compiles) and peers (~5 min) each fit one device call; all runs both.
# Wheels that machine lacks (ml_collections; diffusers for the peer rows) are installed from .device_wheels/
# when that folder is there. Logs go to OUT_DIR (default /tmp/gpu_bench); traces to /tmp.
set -u
out=${1:-${OUT:-/tmp/gpu_bench}}
part=${2:-all}
mkdir -p "$out"
nvidia-smi -L
if ls .device_wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device_wheels/*.whl 2>&1 | tail -1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache PYTHONUNBUFFERED=1
cd bench
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
show() { grep -E "^\||^backend|^where|^compiled|^variant|Error|error:" "$1" | grep -v "^| ynn" ; }
# 1. MFU of DDPM's CIFAR-10 step at batch 128 against the H100's 989 TFLOP/s bf16 dense peak, lever by lever in one
#    process (bench/levers.py: each variant compiled once, ~35-95 s each on an H200, then timed in alternating
#    rounds; each variant's first reading prints as soon as it is compiled), and where the base's time goes.
#    --pipelined: each round's steps also dispatched back to back (as the training loop runs), since on 2026-11-28
#    the device kernels filled only 19.4 of the 27 ms synced step. Graphing cuDNN convolutions and short kernel runs
#    gained nothing that day (26.97 -> 26.83 / 26.52 ms); batch 256 took 41.4 ms (21.9% MFU). jax 0.11.2's GPU
#    lowering gave no cost analysis there: --gflop-per-image carries DDPM's count (4,484 GFLOP at batch 128, from
#    the CPU lowering with model.conv_impl=xla).
if [ "$part" != peers ]; then
timeout 540 python3 levers.py --config cifar10_ddpm --batch 128 --set model.dtype=bfloat16 --peak-tflops 989 --gflop-per-image 35.03 \
  --variant base --variant "no_triton_gemm=xla:xla_gpu_enable_triton_gemm=false" --variant "b256=batch_size=256" \
  --rounds 4 --steps 5 --pipelined --budget-s 400 --profile /tmp/trace --profile-only base > "$out/levers.log" 2>&1; show "$out/levers.log"
fi
# 2. This project vs diffusers' UNet2DModel on the same GPU (peer in eager PyTorch; bf16 = torch.autocast).
[ "$part" = levers ] || for dtype in bfloat16 float32; do
  timeout 160 python3 vs_peers.py --cases ddpm_cifar10,fmnist_small --batch 128 --no-rss --peer-device cuda \
    --steps 10 --rounds 2 --set model.dtype=$dtype > "$out/vs_peers_$dtype.log" 2>&1; show "$out/vs_peers_$dtype.log"
done
