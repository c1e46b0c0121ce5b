#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, every GPU of the node visible to it; process 0's node
# is the coordinator. Install first on the shared environment: pip install -e ".[gpu]" && bash launch/install_text_encoder.sh
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh configs/cifar10_ddpm.py /shared/runs/cifar10 [--config.x=y]
#   bash launch/slurm_gpu.sh --dry-run CONFIG WORKDIR ...   (prints the sbatch and the srun command lines)
#SBATCH --job-name=diffusion_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
CONFIG=${1:?config file}; WORKDIR=${2:?workdir on a shared filesystem}; shift 2

show() {  # one command, quoted so that pasting it into a shell runs exactly it
  printf '%q' "$1"; shift; printf ' %q' "$@"; echo
}

if [ "$DRY" = 1 ]; then
  # Outside a job there is no node list: the coordinator's host is a placeholder, the node count is NODES.
  show sbatch --nodes="${NODES:-2}" --gpus-per-node="${GPUS_PER_NODE:-8}" "$0" "$CONFIG" "$WORKDIR" "$@"
  COORDINATOR="<first node>"; NUM_PROCESSES=${NODES:-2}
else
  COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1); NUM_PROCESSES=$SLURM_NNODES
fi
# The rank is only known inside each task (single quotes: its own $SLURM_PROCID); the config, workdir and overrides
# reach python as bash -c's "$@", each one argument, so spaces and quotes in them survive.
TASKS=(env DJ_COORDINATOR_ADDRESS="$COORDINATOR:${DJ_PORT:-12355}" DJ_NUM_PROCESSES="$NUM_PROCESSES"
       srun bash -c 'DJ_PROCESS_ID=$SLURM_PROCID python -m diffusion_jax.main "$@"' diffusion_jax
       "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
if [ "$DRY" = 1 ]; then show "${TASKS[@]}"; else "${TASKS[@]}"; fi
