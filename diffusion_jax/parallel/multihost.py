"""Multi-process start-up: one call before any other JAX use."""

from __future__ import annotations

import os

import jax
from absl import logging


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize when a coordinator is configured (env) or a TPU pod / SLURM job is detected.

  Env: DJ_COORDINATOR_ADDRESS (host:port), DJ_NUM_PROCESSES, DJ_PROCESS_ID; TPU VM pods and SLURM
  jobs are detected by jax itself when DJ_DISTRIBUTED=auto.
  """
  address = os.environ.get("DJ_COORDINATOR_ADDRESS")
  if address:
    jax.distributed.initialize(coordinator_address=address,
                               num_processes=int(os.environ["DJ_NUM_PROCESSES"]),
                               process_id=int(os.environ["DJ_PROCESS_ID"]))
  elif os.environ.get("DJ_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
