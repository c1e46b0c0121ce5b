"""Multi-process start-up (one call before any other JAX use, that ends with one line instead of hanging) and the
barriers that keep the processes' first collectives together."""

from __future__ import annotations

import os
import socket
import sys
import threading
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import flags, logging

from diffusion_jax.environment import Environment

# JAX aborts the process (a C++ check failure and a stack dump) when its own initialization timeout expires;
# ours fires first, says who is missing, and exits cleanly.
_JAX_TIMEOUT_MARGIN_S = 60


def _coordinator_reachable(address: str) -> bool:
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host, int(port)), timeout=2):
      return True
  except OSError:
    return False


def _start_failure(env: Environment) -> str:
  address, n, i = env.coordinator_address, env.num_processes, env.process_id
  if address is None:  # DJ_DISTRIBUTED=auto: JAX found the cluster's coordinator itself
    return (f"the processes of this job did not all join within DJ_INIT_TIMEOUT={env.init_timeout:g}s "
            "(DJ_DISTRIBUTED=auto); check that every worker was started")
  if i == 0:
    return (f"process 0 waited DJ_INIT_TIMEOUT={env.init_timeout:g}s at {address} for the other {n - 1} "
            f"process(es) of DJ_NUM_PROCESSES={n}, and not all joined: start processes 1..{n - 1} with the same "
            "DJ_COORDINATOR_ADDRESS and DJ_NUM_PROCESSES")
  if not _coordinator_reachable(address):
    return (f"process {i} could not reach the coordinator (process 0) at DJ_COORDINATOR_ADDRESS={address} within "
            f"DJ_INIT_TIMEOUT={env.init_timeout:g}s: start process 0 there, or fix the address")
  return (f"process {i} reached the coordinator at {address}, but not all DJ_NUM_PROCESSES={n} processes joined "
          f"within DJ_INIT_TIMEOUT={env.init_timeout:g}s: start the missing ones")


def _exit_at_start_up(reason: str) -> None:
  """One `error:` line and an immediate exit: at start-up nothing has been written yet, and a normal exit would
  wait (JAX's connect call holds the main thread; after it, JAX's shutdown barrier waits for every peer)."""
  sys.stderr.write(f"error: distributed start-up: {reason}\n")
  sys.stderr.flush()
  os._exit(1)


def maybe_initialize_distributed(env: Environment) -> None:
  """jax.distributed.initialize when a coordinator is configured (DJ_COORDINATOR_ADDRESS, DJ_NUM_PROCESSES,
  DJ_PROCESS_ID) or DJ_DISTRIBUTED=auto (TPU pods and SLURM jobs, detected by JAX). A process whose peers or
  coordinator do not appear within DJ_INIT_TIMEOUT seconds exits with one line saying who is missing."""
  if env.coordinator_address is None and not env.auto_distributed:
    return
  kwargs = dict(initialization_timeout=int(env.init_timeout) + _JAX_TIMEOUT_MARGIN_S)
  if env.coordinator_address is not None:
    kwargs.update(coordinator_address=env.coordinator_address, num_processes=env.num_processes,
                  process_id=env.process_id)

  watchdog = threading.Timer(env.init_timeout, lambda: _exit_at_start_up(_start_failure(env)))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:  # e.g. DJ_DISTRIBUTED=auto where no cluster is detected
    where = (f"DJ_COORDINATOR_ADDRESS={env.coordinator_address}" if env.coordinator_address else "DJ_DISTRIBUTED=auto")
    hint = "" if env.coordinator_address else (": JAX detected no TPU pod or SLURM job here; set "
                                               "DJ_COORDINATOR_ADDRESS, DJ_NUM_PROCESSES and DJ_PROCESS_ID instead")
    raise ValueError(f"distributed start-up failed ({where}): "
                     f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:300]}{hint}") from None
  finally:
    watchdog.cancel()
  if env.num_processes is not None and jax.process_count() != env.num_processes:
    # JAX takes the job's size from the coordinator (process 0): a process told otherwise would run on.
    _exit_at_start_up(f"DJ_NUM_PROCESSES={env.num_processes} for process {env.process_id}, but the job at "
                      f"DJ_COORDINATOR_ADDRESS={env.coordinator_address} has {jax.process_count()} processes "
                      "(process 0's DJ_NUM_PROCESSES): give every process the same DJ_NUM_PROCESSES")
  use_coordination_barriers()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def use_coordination_barriers() -> None:
  """Orbax's own barriers (the manager's start, each save) through the coordination service, as
  `wait_for_all_processes`, instead of device collectives: those open a gloo communicator on CPU (the 30 s limit
  of `compile_then_wait`) and can only hang, not time out with a message. Orbax reads an absl flag, so the flags
  must have been parsed (main does so)."""
  flags.FLAGS["experimental_orbax_use_distributed_barrier"].value = True


def wait_for_all_processes(name: str, timeout_s: float = 1800.0) -> None:
  """Every process waits here until all have arrived: a coordination-service barrier, no device collective
  (nothing to compile, no communicator to open). A no-op with one process; TimeoutError (one line, naming the
  barrier) when not all arrive within timeout_s."""
  if jax.process_count() == 1:
    return
  try:
    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))
  except Exception as e:  # the coordination service's own error is a long gRPC status
    raise TimeoutError(f"process {jax.process_index()} waited {timeout_s:g}s at barrier {name!r} and not all "
                       f"{jax.process_count()} processes arrived (one stopped, or is still compiling): "
                       f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None


def compile_then_wait(jitted: Callable, *args: Any, name: str) -> Callable:
  """`jitted` compiled for `args` (ahead of its first call); with several processes every process compiles first
  and then waits for the others, so the program's first cross-process collective finds every peer there.

  Why: XLA:CPU's gloo collectives give up when a peer reaches a new communicator more than 30 s after another
  (`DEADLINE_EXCEEDED: GetKeyValue() timed out`), and compile times differ by more than that between processes
  sharing a host, or where one finds the program in the persistent compilation cache and another does not.
  """
  if not hasattr(jitted, "lower"):  # a plain function (tests' stand-ins): nothing to compile
    return jitted
  compiled = jitted.lower(*args).compile()
  if jax.process_count() > 1:
    wait_for_all_processes(f"{name}_compiled")
  return compiled
