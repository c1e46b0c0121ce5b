#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, every GPU of the node visible to it.
# Install first on the shared environment: pip install -e ".[gpu]" && bash launch/install_text_encoder.sh
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh configs/cifar10_ddpm.py /shared/runs/cifar10
#SBATCH --job-name=diffusion_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir on a shared filesystem}; shift 2
export DJ_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):${DJ_PORT:-12355}"
export DJ_NUM_PROCESSES="$SLURM_NNODES"
srun bash -c 'DJ_PROCESS_ID=$SLURM_PROCID python -m diffusion_jax.main --config='"$CONFIG"' --workdir='"$WORKDIR"' '"$*"
