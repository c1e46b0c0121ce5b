"""The device mesh over every device of every process, how the train state is laid out on it (replicated, or
FSDP-sharded), and global arrays built from host batches.

The mesh has two axes: `data` (replicas that each see their own rows) and `fsdp` (ZeRO-3 style: each large
parameter, its EMA and its optimizer moments split over these devices along one axis, gathered by XLA where a
layer needs them). The global batch is split over both axes, so every device gets its own rows either way.

Which axis of which array is split comes from an automatic rule (each large array along its largest axis the fsdp
size divides), or from `config.mesh.partition_rules`: (regex, spec) pairs, first match wins (t5x / MaxText's
logical-axis rules, in their regex form), matched against each leaf's path in the state, e.g.
`opt_state/1/0/mu/params/down_1/ResBlock_0/Conv_0/kernel`, so one rule places a parameter, its EMA and its Adam
moments alike.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

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
MIN_AUTO_IMAGES_PER_DEVICE = 8


WIDE_MODEL_CHANNELS = 128


def auto_host_devices(cores: int, batch_sizes: tuple[int, ...], data: int = -1, fsdp: int = 1,
                      min_channels: int = 0, activations_per_image: int = 0) -> int:
  """How many XLA:CPU devices to split this host into: the most, up to one per core (two per core where the
  image sizes are unknown; at most 8), that divide every global batch into at least MIN_AUTO_IMAGES_PER_DEVICE
  images per device and fit config.mesh (exactly data * fsdp when data is set); one (or the fsdp size) when every
  model's base width, `min_channels`, is at least WIDE_MODEL_CHANNELS.

  Why: XLA:CPU runs one device's ops mostly one at a time, and its convolutions of 32-64 channels on one thread
  each, so on narrow models it leaves cores idle (1.2 of 2 cores busy on bench/vs_peers.py's fmnist_small step);
  devices run concurrently, so a data-parallel split over host devices keeps the cores busy: that step (batch
  64) took 1577 / 1110 / 965 / 1020 ms with 1 / 2 / 4 / 8 devices on 2 cores. Fewer than 8 images per device
  cost more than the split gains, and each device holds its own copy of the state. Wide models are the other
  way round: convolutions of 128 channels and more (XLA's, and the Winograd matmuls that conv_impl 'auto' gives
  them on CPU) already spread over the cores, and a split only adds contention and copies of the state: DDPM's
  CIFAR-10 U-Net at batch 16 (ch 128) trained at 0.83x diffusers' speed on 1 device with Winograd's forward and
  0.82x on 2 devices with XLA's convs (same-evening runs of bench/vs_peers.py), at a peak RSS of 2582 vs 3052 MB;
  with the Winograd filter gradient too (an Intel Xeon host) 2 devices took 3514 ms per step against 1 device's
  ~2950.

  More devices than cores only where the image size or width is unknown (`activations_per_image` 0): once
  XLA:CPU's step buffers were reused rather than mapped afresh per step (diffusion_jax.host_memory), 2 devices on 2
  cores beat 4 on the quick start's steps (fashion_mnist 146-159 -> 129-135 ms, latent's autoencoder 128-135 ->
  105-110, its U-Net 179-183 -> 139-145), and a model whose convolutions are large per device (at least
  layers.MIN_MULTITHREADED_CONV_ACTIVATIONS first-level activations, images per device x height x width x the
  narrowest base width, on `cores` devices) trains faster with XLA's multi-threaded convolutions on one device per
  core than with YNNPACK's on two (layers.step_compiler_options; bench/levers.py, the Intel Xeon host, 2026-11-28:
  fmnist_small b64 666 vs 749 ms, b32 344 vs 343, fashion_mnist:full b64 2790 vs 4001).
  """
  if data > 0 and fsdp > 0:
    return data * fsdp
  step = fsdp if fsdp > 0 else 1
  if min_channels >= WIDE_MODEL_CHANNELS:
    return step
  target = max(1, min(2 * cores, MAX_AUTO_HOST_DEVICES))
  busy = lambda n: n <= cores or not activations_per_image  # more devices than cores: see the docstring
  fits = [n for n in range(step, target + 1, step)
          if all(b % n == 0 and b // n >= MIN_AUTO_IMAGES_PER_DEVICE for b in batch_sizes) and busy(n)]
  return max(fits) if fits else step


def auto_host_devices_for_config(config, cores: int) -> int:
  """auto_host_devices for a run of `config` (main's choice, and the benches'): its batches (the autoencoder's
  too), its mesh, the narrowest base width of the models it trains and its image size. Values a config check
  would refuse are left out here (check_config reports them)."""
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  models = [config.model] + ([config.autoencoder.model] if config.get("autoencoder") else [])
  batches = [config.batch_size] + ([config.autoencoder.batch_size] if config.get("autoencoder") else [])
  data, fsdp = (config.mesh.data, config.mesh.fsdp) if all(map(is_int, (config.mesh.data, config.mesh.fsdp))) \
      else (-1, 1)
  widths = [m.get("ch") for m in models]
  min_channels = min(widths) if all(map(is_int, widths)) else 0
  size = config.data.get("image_size") if config.get("data") else None
  # At the images' size: a latent model's U-Net runs smaller, but its autoencoder trains at this size.
  activations = size * size * min_channels if is_int(size) and size > 0 else 0
  return auto_host_devices(cores, tuple(b for b in batches if is_int(b) and b > 0), data, fsdp, min_channels,
                           activations)


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


def host_device_count(environ=None) -> int:
  """The CPU device count XLA_FLAGS asks for (split_host_devices' or the user's; 1 where it names none)."""
  import os
  flags = (os.environ if environ is None else environ).get("XLA_FLAGS", "")
  if f"{HOST_DEVICES_FLAG}=" not in flags:
    return 1
  value = flags.rsplit(f"{HOST_DEVICES_FLAG}=", 1)[1].split()[0]
  return int(value) if value.isdigit() else 1


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


def flat_gradient_reduce(param_shardings: Any) -> bool:
  """Whether a train step averages its gradients across the devices as one flat vector
  (train_state.flat_reduced_value_and_grad) rather than XLA's per-parameter tuple all-reduce: on CPU when the
  devices span processes (gloo collectives, which reduce a tuple one buffer at a time) and every parameter is
  replicated. Within one process XLA:CPU's in-memory all-reduce of the tuple is fast, and sharded parameters are
  gathered and scattered by XLA's partitioner. With mesh.shard_optimizer_state (ZeRO-1) the gradient is still one
  vector, but the updated parameters are gathered from the optimizer's shards one buffer each (not measured)."""
  return jax.default_backend() == "cpu" and jax.process_count() > 1 and all_replicated(param_shardings)


def all_replicated(shardings: Any) -> bool:
  """Whether every leaf's sharding holds the whole array on every device (what a flat gradient reduce needs)."""
  return all(s.is_fully_replicated for s in jax.tree.leaves(shardings))


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE, mesh_axis=FSDP_AXIS) -> P:
  """Where one array of the state lives: split over `mesh_axis` (of `fsdp` devices) along its largest axis that
  the fsdp size divides (a conv kernel [3,3,Cin,Cout]: Cout or Cin), or replicated when it is small or nothing
  divides."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      return P(*([None] * axis + [mesh_axis]))
  return P()


# A partition rule's spec "zero": the automatic rule over every device of the mesh (both axes), as ZeRO shards
# optimizer state (Rajbhandari et al. 2020, stage 1) while the parameters stay where the fsdp rule puts them.
ZERO_SPEC = "zero"
# config.mesh.shard_optimizer_state's rule: the EMA and Adam's moments (every leaf under ema_params/ or opt_state/).
OPTIMIZER_STATE_RULE = (r"^(ema_params|opt_state)/", ZERO_SPEC)


def partition_rules_from_config(mesh_config) -> tuple:
  """config.mesh.partition_rules, then (under config.mesh.shard_optimizer_state) OPTIMIZER_STATE_RULE: the user's
  rules come first and win."""
  rules = tuple(mesh_config.partition_rules)
  return rules + ((OPTIMIZER_STATE_RULE,) if mesh_config.get("shard_optimizer_state", False) else ())


PartitionRule = tuple[str, str | Sequence[str | None]]


def parse_partition_rules(rules: Sequence[PartitionRule]) -> list[tuple[re.Pattern, P]]:
  """config.mesh.partition_rules -> [(compiled regex, PartitionSpec)]; ValueError naming the bad rule.

  A rule is (regex, spec). The spec names a mesh axis (or None: not split) per array axis, as a tuple
  (None, "fsdp") or a string "None,fsdp" (what a command-line override writes); "" or () is replicated.
  Trailing axes left out are not split (PartitionSpec's convention)."""
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise ValueError(f"config.mesh.partition_rules={rules!r} is invalid: expected a tuple of (regex, spec) pairs")
  parsed = []
  for i, rule in enumerate(rules):
    where = f"config.mesh.partition_rules[{i}]={rule!r} is invalid"
    if isinstance(rule, (str, bytes)) or not isinstance(rule, Sequence) or len(rule) != 2 \
        or not isinstance(rule[0], str):
      raise ValueError(f"{where}: expected a (regex, spec) pair such as ('Conv_0/kernel$', 'None,None,None,fsdp')")
    pattern, spec = rule
    try:
      compiled = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{where}: the regex does not compile ({e})") from None
    if spec == ZERO_SPEC:
      parsed.append((compiled, ZERO_SPEC))
      continue
    if isinstance(spec, str):
      spec = [a.strip() for a in spec.split(",")] if spec.strip() else []
    if not isinstance(spec, Sequence):
      raise ValueError(f"{where}: the spec must be a string like 'None,fsdp' or a tuple like (None, 'fsdp')")
    axes = [None if a in (None, "None", "none", "") else a for a in spec]
    named = [a for a in axes if a is not None]
    if any(a not in BATCH_AXES for a in named) or len(set(named)) != len(named):
      raise ValueError(f"{where}: each array axis takes one of the mesh axes {BATCH_AXES} or None, each mesh axis "
                       "at most once")
    parsed.append((compiled, P(*axes)))
  return parsed


def state_shardings(abstract_state: Any, mesh: Mesh, partition_rules: Sequence[PartitionRule] = (),
                    min_size: int = FSDP_MIN_SIZE) -> Any:
  """A sharding per leaf of a (train) state: the first of `partition_rules` whose regex matches the leaf's path,
  else FSDP over the mesh's fsdp axis by fsdp_spec (replicated when it is 1). ValueError naming the rule and the
  leaf when a rule's spec does not fit that leaf (more axes than it has, or a size the mesh axis does not divide)."""
  fsdp = mesh.shape[FSDP_AXIS]
  rules = parse_partition_rules(partition_rules)

  def leaf_sharding(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    shape = tuple(leaf.shape)
    for i, (pattern, spec) in enumerate(rules):
      if not pattern.search(name):
        continue
      if spec == ZERO_SPEC:
        return NamedSharding(mesh, fsdp_spec(shape, mesh.size, min_size, mesh_axis=BATCH_AXES))
      where = f"config.mesh.partition_rules[{i}]={partition_rules[i]!r} does not fit {name} of shape {shape}"
      if len(spec) > len(shape):
        raise ValueError(f"{where}: the spec names {len(spec)} axes, the array has {len(shape)}")
      for dim, axis in zip(shape, spec):
        if axis is not None and dim % mesh.shape[axis]:
          raise ValueError(f"{where}: {dim} does not divide over the {mesh.shape[axis]} devices of mesh axis {axis!r}")
      return NamedSharding(mesh, spec)
    return NamedSharding(mesh, fsdp_spec(shape, fsdp, min_size))

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def host_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows [b,...] -> one global array [P*b,...] sharded over the mesh."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def global_to_host(x: jax.Array) -> np.ndarray:
  """The whole global array on every process, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
