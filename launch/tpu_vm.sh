#!/usr/bin/env bash
# Run a config on every worker of a Cloud TPU VM pod slice (each worker runs one process; jax finds
# the pod by itself through DJ_DISTRIBUTED=auto).
#   TPU_NAME=my-pod ZONE=us-central2-b bash launch/tpu_vm.sh configs/cifar10_ddpm.py gs://bucket/run [--config.x=y]
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG=${1:?config file}; WORKDIR=${2:?workdir (a gs:// path on pods)}; shift 2
REPO=${REPO:-https://github.com/diffusion-jax/diffusion_jax.git}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d diffusion_jax ] || git clone $REPO diffusion_jax
  cd diffusion_jax && pip install -q -e '.[tpu]' && bash launch/install_text_encoder.sh
  DJ_DISTRIBUTED=auto python -m diffusion_jax.main --config=$CONFIG --workdir=$WORKDIR $*
"
