#!/usr/bin/env bash
# A cascaded sample in one command: a base model samples, a super-resolution model upscales its samples.
#   bash launch/cascade.sh BASE_CONFIG BASE_WORKDIR SR_CONFIG SR_WORKDIR [--config.x=v ...]
# e.g. bash launch/cascade.sh configs/fashion_mnist.py runs/fmnist configs/super_resolution.py:7 runs/sr7
# The base samples (CASCADE_NUM_IMAGES of them, default 16, with the base config's sample.* settings) are
# written by mode=sample to BASE_WORKDIR/samples/samples.npz; the SR model takes them, brought down to its low
# resolution, and writes SR_WORKDIR/edits/upscale.npz and .png. Extra arguments go to the base sampling command.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n 2,8p "$0" >&2
  exit 2
fi
base_config=$1 base_dir=$2 sr_config=$3 sr_dir=$4
shift 4
n=${CASCADE_NUM_IMAGES:-16}
python -m diffusion_jax.main --config="$base_config" --workdir="$base_dir" --config.mode=sample \
  --config.sample.num_images="$n" "$@"
python -m diffusion_jax.main --config="$sr_config" --workdir="$sr_dir" --config.mode=edit \
  --config.edit.task=upscale --config.edit.images="$base_dir/samples/samples.npz"
