#!/usr/bin/env bash
# Installs the embedded default data (Debian's dataset-fashion-mnist) unless it is already there.
set -euo pipefail
if [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
