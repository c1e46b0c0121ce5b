"""The DJ_* environment variables, read and checked once at start-up (a bad value is one line naming it)."""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Mapping

from diffusion_jax import host_memory

# name -> what it holds (the error messages quote this).
VARIABLES = {
    "DJ_TRACEBACK": "'1' to show the full traceback of a user error, '0' or unset for one line",
    "DJ_COORDINATOR_ADDRESS": "host:port of process 0's coordinator, for a multi-process job",
    "DJ_NUM_PROCESSES": "the number of processes of a multi-process job (an int >= 1)",
    "DJ_PROCESS_ID": "this process's index in [0, DJ_NUM_PROCESSES)",
    "DJ_DISTRIBUTED": "'auto' to let JAX detect a TPU pod or SLURM job",
    "DJ_INIT_TIMEOUT": "seconds a process waits for the others to join at start-up (a number > 0)",
    "DJ_PORT": "the coordinator's port (read by launch/slurm_gpu.sh)",
    "DJ_CPU_DEVICES": "how many XLA:CPU devices to split this host into: an int >= 1, or 'auto' (the default: up "
                      "to 2 per core, dividing the batch)",
    "DJ_HOST_MEMORY": "'tuned' (the default: glibc's huge pages and a reused heap for XLA:CPU's step buffers, and "
                      "on several host devices the system's jemalloc preloaded; diffusion_jax.host_memory), 'glibc' "
                      "(the same without jemalloc), 'jemalloc' (the same as 'tuned') or 'default' (the C library "
                      "and JAX as they are)",
    "DJ_NATIVE_KERNELS": "'1' (the default: diffusion_jax.models.native's C++ CPU convolutions where they apply) "
                         "or '0' (XLA's everywhere)",
    "DJ_NATIVE_CACHE": "the folder the native CPU kernels are compiled into (default ~/.cache/diffusion_jax/native)",
}
DEFAULT_INIT_TIMEOUT = 300.0


@dataclasses.dataclass(frozen=True)
class Environment:
  traceback: bool = False
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto_distributed: bool = False
  init_timeout: float = DEFAULT_INIT_TIMEOUT
  cpu_devices: int | None = None  # None: auto (parallel.mesh.auto_host_devices)


def _bad(name: str, value: str) -> ValueError:
  return ValueError(f"environment variable {name}={value!r} is invalid: expected {VARIABLES[name]}")


def _int(env: Mapping[str, str], name: str, low: int) -> int | None:
  if name not in env:
    return None
  try:
    value = int(env[name])
  except ValueError:
    raise _bad(name, env[name]) from None
  if value < low:
    raise _bad(name, env[name])
  return value


def read_environment(env: Mapping[str, str] | None = None) -> Environment:
  """The DJ_* settings of `env` (os.environ by default); ValueError naming the first bad or unknown one."""
  env = os.environ if env is None else env
  for name in sorted(env):
    if name.startswith("DJ_") and name not in VARIABLES:
      close = difflib.get_close_matches(name, VARIABLES, n=1)
      hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(VARIABLES)}"
      raise ValueError(f"environment variable {name} is unknown; {hint}")
  traceback = env.get("DJ_TRACEBACK", "0")
  if traceback not in ("", "0", "1"):
    raise _bad("DJ_TRACEBACK", traceback)
  if env.get("DJ_HOST_MEMORY", "tuned") not in host_memory.MODES:
    raise _bad("DJ_HOST_MEMORY", env["DJ_HOST_MEMORY"])
  if env.get("DJ_NATIVE_KERNELS", "1") not in ("0", "1"):
    raise _bad("DJ_NATIVE_KERNELS", env["DJ_NATIVE_KERNELS"])
  auto = env.get("DJ_DISTRIBUTED", "")
  if auto not in ("", "auto"):
    raise _bad("DJ_DISTRIBUTED", auto)
  timeout = env.get("DJ_INIT_TIMEOUT", str(DEFAULT_INIT_TIMEOUT))
  try:
    init_timeout = float(timeout)
  except ValueError:
    raise _bad("DJ_INIT_TIMEOUT", timeout) from None
  if not init_timeout > 0:
    raise _bad("DJ_INIT_TIMEOUT", timeout)
  cpu_devices = None if env.get("DJ_CPU_DEVICES", "auto") == "auto" else _int(env, "DJ_CPU_DEVICES", 1)
  address = env.get("DJ_COORDINATOR_ADDRESS") or None
  num_processes, process_id = _int(env, "DJ_NUM_PROCESSES", 1), _int(env, "DJ_PROCESS_ID", 0)
  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise _bad("DJ_COORDINATOR_ADDRESS", address)
    for name, value in (("DJ_NUM_PROCESSES", num_processes), ("DJ_PROCESS_ID", process_id)):
      if value is None:
        raise ValueError(f"environment variable {name} is unset: DJ_COORDINATOR_ADDRESS={address!r} needs "
                         f"{VARIABLES[name]}")
    if process_id >= num_processes:
      raise _bad("DJ_PROCESS_ID", str(process_id))
  return Environment(traceback=traceback == "1", coordinator_address=address, num_processes=num_processes,
                     process_id=process_id, auto_distributed=auto == "auto", init_timeout=init_timeout,
                     cpu_devices=cpu_devices)
