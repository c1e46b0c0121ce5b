"""The device mesh over every device of every process, how the train state is laid out on it (replicated, or
FSDP-sharded), and global arrays built from host batches.

The mesh has two axes: `data` (replicas that each see their own rows) and `fsdp` (ZeRO-3 style: each large
parameter, its EMA and its optimizer moments split over these devices along one axis, gathered by XLA where a
layer needs them). The global batch is split over both axes, so every device gets its own rows either way.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
FSDP_MIN_SIZE = 1024  # parameters with fewer elements stay replicated (norms, biases: gathering costs more)


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) with -1 resolved to the devices remaining; ValueError naming config.mesh.* unless their
  product is the device count."""
  for key, value in (("data", data), ("fsdp", fsdp)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (value == -1 or value >= 1):
      raise ValueError(f"config.mesh.{key}={value!r} is invalid: must be an int >= 1, or -1 (all remaining devices)")
  if data == -1 and fsdp == -1:
    raise ValueError("config.mesh.data=-1 and config.mesh.fsdp=-1 is invalid: at most one axis can take the "
                     "remaining devices")
  known = (data if data != -1 else 1) * (fsdp if fsdp != -1 else 1)
  if num_devices % known:
    raise ValueError(f"config.mesh.data={data}, config.mesh.fsdp={fsdp} is invalid: {known} does not divide the "
                     f"{num_devices} devices")
  data, fsdp = (num_devices // known if data == -1 else data), (num_devices // known if fsdp == -1 else fsdp)
  if data * fsdp != num_devices:
    raise ValueError(f"config.mesh.data={data} x config.mesh.fsdp={fsdp} = {data * fsdp} devices is invalid: there "
                     f"are {num_devices} (set one of them to -1 to take the rest)")
  return data, fsdp


HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
MAX_AUTO_HOST_DEVICES = 8


def auto_host_devices(cores: int, batch_sizes: tuple[int, ...], data: int = -1, fsdp: int = 1) -> int:
  """How many XLA:CPU devices to split this host into: the most, up to 2 per core (at most 8), that divide
  every global batch and fit config.mesh (exactly data * fsdp when data is set).

  Why: XLA:CPU runs one device's ops mostly one at a time and leaves cores idle between them (1.2 of 2 cores
  busy on bench/vs_peers.py's fmnist_small step); devices run concurrently, so a data-parallel split over
  host devices keeps the cores busy: that step took 1577 / 1110 / 965 / 1020 ms with 1 / 2 / 4 / 8 devices
  on 2 cores, DDPM's CIFAR-10 U-Net at batch 16 4805 / 4327 / 4501 ms with 1 / 2 / 4.
  """
  if data > 0 and fsdp > 0:
    return data * fsdp
  step = fsdp if fsdp > 0 else 1
  target = max(1, min(2 * cores, MAX_AUTO_HOST_DEVICES))
  fits = [n for n in range(step, target + 1, step) if all(b % n == 0 for b in batch_sizes)]
  return max(fits) if fits else step


def split_host_devices(count: int, environ=None) -> bool:
  """Ask XLA for `count` CPU devices (call before JAX starts its backends); False, leaving it, when XLA_FLAGS
  already names a host device count (the user's choice wins)."""
  import os
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if HOST_DEVICES_FLAG in flags:
    return False
  environ["XLA_FLAGS"] = f"{flags} {HOST_DEVICES_FLAG}={count}".strip()
  return True


def make_mesh(devices=None, *, data: int = -1, fsdp: int = 1) -> Mesh:
  """A (data, fsdp) mesh of `devices` (default: every device of every process; Auto axis types: XLA
  propagates shardings through the step)."""
  devices = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
  shape = mesh_shape(data, fsdp, len(devices))
  return Mesh(devices.reshape(shape), BATCH_AXES, axis_types=(AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device: the data axis, then the fsdp axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """Where one array of the state lives: split over the fsdp axis along its largest axis that the fsdp size
  divides (a conv kernel [3,3,Cin,Cout]: Cout or Cin), or replicated when it is small or nothing divides."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      return P(*([None] * axis + [FSDP_AXIS]))
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
  """A sharding per leaf of a (train) state: FSDP over the mesh's fsdp axis (replicated when it is 1)."""
  fsdp = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp, min_size)),
                      abstract_state)


def host_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows [b,...] -> one global array [P*b,...] sharded over the mesh."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def global_to_host(x: jax.Array) -> np.ndarray:
  """The whole global array on every process, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
