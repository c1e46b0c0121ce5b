#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, every GPU of the node visible to it; process 0's node
# is the coordinator. Install first on the shared environment: pip install -e ".[gpu]" && bash launch/install_text_encoder.sh
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh configs/cifar10_ddpm.py /shared/runs/cifar10 [--config.x=y]
#   bash launch/slurm_gpu.sh --dry-run CONFIG WORKDIR ...   (prints the sbatch command and what each task runs)
#SBATCH --job-name=diffusion_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
if [ "${1:-}" = "--dry-run" ]; then
  shift
  CONFIG=${1:?config file}; WORKDIR=${2:?workdir on a shared filesystem}; shift 2
  echo "sbatch --nodes=${NODES:-2} --gpus-per-node=${GPUS_PER_NODE:-8} $0 $CONFIG $WORKDIR $*"
  echo "each task: DJ_COORDINATOR_ADDRESS=<first node>:${DJ_PORT:-12355} DJ_NUM_PROCESSES=${NODES:-2}" \
       "DJ_PROCESS_ID=<task rank> python -m diffusion_jax.main --config=$CONFIG --workdir=$WORKDIR $*"
  exit 0
fi
CONFIG=${1:?config file}; WORKDIR=${2:?workdir on a shared filesystem}; shift 2
export DJ_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):${DJ_PORT:-12355}"
export DJ_NUM_PROCESSES="$SLURM_NNODES"
srun bash -c 'DJ_PROCESS_ID=$SLURM_PROCID python -m diffusion_jax.main --config='"$CONFIG"' --workdir='"$WORKDIR"' '"$*"
