#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, copy this checkout to every worker, install, run the config on
# all workers at once (one process each; JAX finds the pod through DJ_DISTRIBUTED=auto), stream the logs, delete.
#   TPU_NAME=my-pod ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#     bash launch/tpu_vm.sh [--dry-run] configs/cifar10_ddpm.py gs://bucket/run [--config.x=y ...]
# Pods need a gs:// workdir (every worker writes checkpoints to the same place). The TPU this script creates is
# deleted when it exits, whether the run succeeded, failed or was interrupted (the exit status is the run's);
# KEEP=1 keeps it. CREATE=0 uses an existing one and leaves it running. VERSION picks the TPU software (default
# tpu-ubuntu2204-base). --dry-run prints the commands (the delete included) instead of running them.
set -euo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG=${1:?config file}; WORKDIR=${2:?workdir (a gs:// path on pods)}; shift 2
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
VERSION=${VERSION:-tpu-ubuntu2204-base}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ARCHIVE=/tmp/diffusion_jax_checkout.tar.gz
# The python arguments, each quoted for the remote shell, so a workdir or an override with spaces, quotes or
# parentheses arrives as one argument (the remote command is one string that the worker's shell splits again).
PY_ARGS=$(printf '%q ' "--config=$CONFIG" "--workdir=$WORKDIR" "$@")

run() {  # print (dry run) or run one command
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

case "$WORKDIR" in
  gs://*) ;;
  *) echo "warning: --workdir=$WORKDIR is not gs://: each worker of a pod writes its own local copy" >&2 ;;
esac
# A TPU VM is billed while it exists, so it is deleted on any exit (set -e stopping at a failed step, Ctrl-C, kill),
# not only after a good run. Only one this script created: a failed create may mean the name is someone else's TPU.
CREATED=0
cleanup() {
  local status=$?
  trap - EXIT INT TERM HUP  # a second Ctrl-C stops the delete instead of starting it again
  if [ "$CREATED" = 1 ] && [ "${KEEP:-0}" != 1 ]; then
    if ! run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet; then
      echo "error: could not delete TPU VM $TPU_NAME in $ZONE; delete it by hand, it is billed while it exists" >&2
      [ "$status" != 0 ] || status=1
    fi
  fi
  exit "$status"
}
trap cleanup EXIT
# Without these, bash dies of the signal without running the EXIT trap (128 + the signal: the usual status).
trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM
if [ "${CREATE:-1}" = 1 ]; then
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR_TYPE" \
    --version "$VERSION"
  CREATED=1
fi
# This checkout, as it is (uncommitted changes included), without runs/ and caches.
run tar -czf "$ARCHIVE" -C "$ROOT" --exclude=./runs --exclude=./.git --exclude='*.egg-info' --exclude=__pycache__ .
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:~/" --zone "$ZONE" --worker=all
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "set -e; mkdir -p diffusion_jax && tar -xzf ~/$(basename "$ARCHIVE") -C diffusion_jax && cd diffusion_jax \
   && pip install -q -e '.[tpu]' && bash launch/install_text_encoder.sh \
   && DJ_DISTRIBUTED=auto python -m diffusion_jax.main $PY_ARGS"
