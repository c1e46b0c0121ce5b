"""CPU kernels written here in C++ as XLA FFI custom calls, built with the system's C++ compiler on first use.

Today: the stride-1 2x2 / 3x3 conv (`conv`, a direct convolution) and its filter gradient (`conv_filter_grad`),
float32 and bfloat16 (conv.cc), and GroupNorm (+ SiLU) forward and backward (`group_norm`, `group_norm_grad`;
group_norm.cc), for x86-64 CPUs with AVX-512; layers.xla_conv takes the convs for the convs and both gradients of
small U-Nets, layers.group_norm_affine the normalisations. XLA:CPU's
(Eigen's) filter gradient of those narrow convs ran at 40-100 GFLOP/s per core, about 60% of its forward's rate
(this one: 105-130), and its convs at 67-112 (this one: 90-130); README, "Faster than PyTorch?". Where they cannot
be used (no compiler, no AVX-512, a shape they do not take, `DJ_NATIVE_KERNELS=0`) the callers keep XLA's:
`available()` says which and `unavailable_reason()` why.

The library is compiled once per (source, jaxlib, compiler, CPU flags) into `$DJ_NATIVE_CACHE` (default
~/.cache/diffusion_jax/native), as torch.utils.cpp_extension.load does: a wheel built for one CPU could not use
`-march=native`, and the package stays pure Python for every platform that never calls it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

SOURCES = [Path(__file__).with_name(name) for name in ("conv.cc", "group_norm.cc")]
HEADERS = [Path(__file__).with_name("parallel.h")]
FILTER_GRAD_TARGET = "diffusion_jax_conv_filter_grad"
CONV_TARGET = "diffusion_jax_conv2d"
# The same two for bfloat16 operands (float32 sums and result) on CPUs with AMX (Intel Sapphire Rapids and later) or
# AVX512-BF16 (AMD Zen 4 and later): `bf16_kernels()` says which.
FILTER_GRAD_BF16_TARGET = "diffusion_jax_conv_filter_grad_bf16"
CONV_BF16_TARGET = "diffusion_jax_conv2d_bf16"
# GroupNorm (+ SiLU) of float32 [B,...,C], forward and backward (group_norm.cc).
GROUP_NORM_TARGET = "diffusion_jax_group_norm"
GROUP_NORM_GRAD_TARGET = "diffusion_jax_group_norm_grad"
COMPILE_TIMEOUT_S = 300
# Fewer input channels than this keep XLA's filter gradient: the kernel pads each block of input channels to its
# register block (6-24), so a 1- or 3-channel stem would do up to 24x the multiply-adds.
MIN_INPUT_CHANNELS = 8
# Output channels must be a multiple of one AVX-512 vector of float32.
OUTPUT_CHANNEL_MULTIPLE = 16


def cache_dir() -> Path:
  return Path(os.environ.get("DJ_NATIVE_CACHE") or Path.home() / ".cache" / "diffusion_jax" / "native")


@functools.cache
def _cpu_flags() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def _build(compiler: str) -> Path:
  """The compiled library's path, built if not cached (atomically: concurrent processes may build at once)."""
  include = jax.ffi.include_dir()
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}"]
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
  parts = [*(f.read_text() for f in SOURCES + HEADERS), importlib.metadata.version("jaxlib"), version, " ".join(flags),
           _cpu_flags(), platform.machine()]
  key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
  target = cache_dir() / f"kernels-{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = Path(tmp) / target.name
    result = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(built)], capture_output=True, text=True,
                            timeout=COMPILE_TIMEOUT_S)
    if result.returncode != 0:
      raise RuntimeError(f"{compiler} failed on {', '.join(f.name for f in SOURCES)}: {result.stderr.strip()[-500:]}")
    os.replace(built, target)
  return target


def host_unsupported_reason() -> str | None:
  """Why this host cannot run the kernels at all (switched off, not x86-64 with AVX-512, no compiler), or None.
  A build that fails on a host without such a reason is a fault (the tests fail on it), not a fallback to hide."""
  if os.environ.get("DJ_NATIVE_KERNELS", "1") == "0":
    return "DJ_NATIVE_KERNELS=0"
  if platform.machine() not in ("x86_64", "AMD64"):
    return f"the kernels are written for x86-64 (this is {platform.machine()})"
  if "avx512f" not in _cpu_flags().split():
    return "this CPU has no AVX-512"
  if _compiler() is None:
    return "no C++ compiler (g++ or clang++; or set CXX)"
  return None


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
  """(the library with its FFI target registered for CPU, '') or (None, why not)."""
  reason = host_unsupported_reason()
  if reason is not None:
    return None, reason
  compiler = _compiler()
  try:
    path = _build(compiler)
    library = ctypes.CDLL(str(path))
    jax.ffi.register_ffi_target(FILTER_GRAD_TARGET, jax.ffi.pycapsule(library.ConvFilterGrad), platform="cpu")
    jax.ffi.register_ffi_target(CONV_TARGET, jax.ffi.pycapsule(library.Conv), platform="cpu")
    jax.ffi.register_ffi_target(FILTER_GRAD_BF16_TARGET, jax.ffi.pycapsule(library.ConvFilterGradBf16),
                                platform="cpu")
    jax.ffi.register_ffi_target(CONV_BF16_TARGET, jax.ffi.pycapsule(library.ConvBf16), platform="cpu")
    jax.ffi.register_ffi_target(GROUP_NORM_TARGET, jax.ffi.pycapsule(library.GroupNorm), platform="cpu")
    jax.ffi.register_ffi_target(GROUP_NORM_GRAD_TARGET, jax.ffi.pycapsule(library.GroupNormGrad), platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    logging.warning("diffusion_jax native CPU kernels unavailable, XLA's are used instead: %s", e)
    return None, str(e)
  return library, ""


def available() -> bool:
  """Whether the native CPU kernels are built and registered (builds them on the first call)."""
  return _load()[0] is not None


def unavailable_reason() -> str:
  return _load()[1]


@functools.cache
def amx_available() -> bool:
  """Whether the bfloat16 kernels run on AMX here: the float32 ones are, the CPU has AMX's tiles and bfloat16
  products, and Linux granted this process the tile state (asked once, process-wide)."""
  flags = _cpu_flags().split()
  return (available() and "amx_tile" in flags and "amx_bf16" in flags
          and _load()[0].EnableAmx() == 0)


def bf16_available() -> bool:
  """Whether the bfloat16 kernels can run here: on AMX (`amx_available`), else with AVX512-BF16's dot products
  (AMD Zen 4 and later, Intel Cooper Lake; half the speed of AMX's where both exist, twice float32's FMA)."""
  return amx_available() or avx512_bf16_available()


def avx512_bf16_available() -> bool:
  """Whether the AVX512-BF16 bfloat16 kernels can run here (the float32 ones are and the CPU has avx512_bf16)."""
  return available() and "avx512_bf16" in _cpu_flags().split()


def bf16_kernels() -> str | None:
  """Which bfloat16 kernels run: 'amx', 'avx512_bf16', or None (neither)."""
  if not bf16_available():
    return None
  return "amx" if amx_available() and _use_amx else "avx512_bf16"


_use_amx = True


def use_amx(on: bool) -> None:
  """Choose AMX's bfloat16 kernels (the default where the CPU has it) or AVX512-BF16's (`on=False`; tests compare
  the two on an AMX host). Takes effect for calls made after it, compiled programs included."""
  global _use_amx
  _use_amx = bool(on)
  if available():
    _load()[0].UseAmx(int(_use_amx))


def keep_compilation_cache_hits() -> None:
  """Let JAX's persistent compilation cache hit for programs that call these kernels under a mesh of several
  devices. JAX puts the id of each `custom_partitioning` call's Python object into its HLO, and so into the cache
  key, unless `jax_remove_custom_partitioning_ptr_from_cache_key` is set: without it every new process compiled a
  multi-device train step afresh (a probe: one new cache entry per run). Setting it is safe for this package's
  partitioned calls, each determined by what the HLO holds (the operands' and result's shapes, hence K and the
  padding, and its Shardy rule), but not for a program whose custom_partitioning calls differ only in their Python
  callbacks; so main and the tests call this where they set the cache directory, and a library import does not."""
  jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", True)


def _takes(x: jax.Array, other: jax.Array, kernel_size: int, padding: int, out_channels: int) -> bool:
  """The conditions both kernels share: CPU, [B,H,W,C] operands both float32 (or both bfloat16 where the CPU has
  AMX or AVX512-BF16), a 2x2 / 3x3 kernel, stride 1."""
  dtype_fits = x.dtype == other.dtype and (x.dtype == jnp.float32 or (x.dtype == jnp.bfloat16 and bf16_available()))
  return (jax.default_backend() == "cpu" and kernel_size in (2, 3) and 0 <= padding < kernel_size and dtype_fits
          and x.ndim == 4 and other.ndim == 4 and x.shape[3] >= MIN_INPUT_CHANNELS
          and out_channels % OUTPUT_CHANNEL_MULTIPLE == 0 and available())


def output_size(x_shape: tuple[int, ...], kernel_size: int, padding: int) -> list[int]:
  """[Ho, Wo] of a stride-1 KxK conv of x [B,H,W,C] padded by `padding` on each side."""
  return [n + 2 * padding - kernel_size + 1 for n in x_shape[1:3]]


def takes_conv(x: jax.Array, kernel: jax.Array, padding: int, flipped: bool = False) -> bool:
  """Whether `conv` takes this x [B,H,W,Cin], kernel [K,K,Cin,Cout] (`flipped`: [K,K,Cout,Cin], bfloat16 only)
  on this backend."""
  k = kernel.shape[0] if kernel.ndim == 4 else 0
  cin, cout = (kernel.shape[3], kernel.shape[2]) if flipped and kernel.ndim == 4 else kernel.shape[2:]
  return (_takes(x, kernel, k, padding, cout) and kernel.shape[1] == k and cin == x.shape[3]
          and (not flipped or x.dtype == jnp.bfloat16) and min(output_size(x.shape, k, padding)) > 0)


def takes_conv_filter_grad(x: jax.Array, dy: jax.Array, kernel_size: int, padding: int) -> bool:
  """Whether `conv_filter_grad` takes this x [B,H,W,Cin], dy [B,Ho,Wo,Cout] on this backend."""
  return (_takes(x, dy, kernel_size, padding, dy.shape[-1]) and x.shape[0] == dy.shape[0]
          and list(dy.shape[1:3]) == output_size(x.shape, kernel_size, padding) and min(dy.shape[1:3]) > 0)


def _loaded() -> None:
  """The kernels registered before a call is traced (a call without them fails only when run, deep in XLA)."""
  if not available():
    raise ValueError(f"the native CPU kernels are unavailable here: {unavailable_reason()}")


def _bf16_checked(x: jax.Array) -> None:
  """A bfloat16 kernel's first instruction on a host without AMX's tile state or AVX512-BF16 would kill the process
  (SIGILL): refuse it with a line instead (takes_conv / takes_conv_filter_grad say False there)."""
  _loaded()
  if x.dtype == jnp.bfloat16 and not bf16_available():
    raise ValueError("the native bfloat16 conv kernels need AMX (amx_tile, amx_bf16) granted by Linux or "
                     "AVX512-BF16, which this host lacks: check native.takes_conv / takes_conv_filter_grad first")


def _local_conv(x: jax.Array, kernel: jax.Array, padding: int, flipped: bool = False) -> jax.Array:
  _bf16_checked(x)
  cout = kernel.shape[2] if flipped else kernel.shape[3]
  out = jax.ShapeDtypeStruct((x.shape[0], *output_size(x.shape, kernel.shape[0], padding), cout), jnp.float32)
  if x.dtype == jnp.bfloat16:
    return jax.ffi.ffi_call(CONV_BF16_TARGET, out)(x, kernel, padding=np.int64(padding), flipped=np.int64(flipped))
  if flipped:
    raise ValueError("the float32 native conv takes its kernel as [K,K,Cin,Cout] only (flipped=False)")
  return jax.ffi.ffi_call(CONV_TARGET, out)(x, kernel, padding=np.int64(padding))


def _local_filter_grad(x: jax.Array, dy: jax.Array, kernel_size: int, padding: int) -> jax.Array:
  _bf16_checked(x)
  out = jax.ShapeDtypeStruct((kernel_size, kernel_size, x.shape[3], dy.shape[3]), jnp.float32)
  target = FILTER_GRAD_BF16_TARGET if x.dtype == jnp.bfloat16 else FILTER_GRAD_TARGET
  return jax.ffi.ffi_call(target, out)(x, dy, padding=np.int64(padding))


def _batch_axes(sharding) -> tuple:
  """The mesh axes x's batch dimension is split over (none if it is not a NamedSharding)."""
  if not isinstance(sharding, NamedSharding) or not sharding.spec:
    return ()
  axes = sharding.spec[0]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _batch_split(mesh, axes: tuple, rank: int = 4) -> NamedSharding:
  return NamedSharding(mesh, P(axes if axes else None, *(None,) * (rank - 1)))


def _conv_partitioned(flipped: bool):
  """_local_conv under custom_partitioning: each device convolves its own rows of the batch (the only dimension
  left split) with the whole kernel."""

  @functools.partial(custom_partitioning, static_argnums=(2,))
  def partitioned(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    return _local_conv(x, kernel, padding, flipped)

  def partition(padding, mesh, arg_shapes, result_shape):
    split = _batch_split(mesh, _batch_axes(arg_shapes[0].sharding))
    return (mesh, lambda x, kernel: _local_conv(x, kernel, padding, flipped), split,
            (split, NamedSharding(mesh, P())))

  partitioned.def_partition(
      partition=partition,
      infer_sharding_from_operands=lambda padding, mesh, arg_shapes, result_shape: _batch_split(
          mesh, _batch_axes(arg_shapes[0].sharding)),
      sharding_rule="b h w i, k l o i -> b p q o" if flipped else "b h w i, k l i o -> b p q o",
      need_replication_factors=("h", "w", "i", "k", "l", "o", "p", "q"))
  return partitioned


_partitioned_conv = {flipped: _conv_partitioned(flipped) for flipped in (False, True)}


@functools.partial(custom_partitioning, static_argnums=(2, 3))
def _partitioned_filter_grad(x: jax.Array, dy: jax.Array, kernel_size: int, padding: int) -> jax.Array:
  return _local_filter_grad(x, dy, kernel_size, padding)


def _partition_filter_grad(kernel_size, padding, mesh, arg_shapes, result_shape):
  """Each device's rows of the batch (the only dimension left split), then the sum over the batch's axes: the
  contraction over B that a data-parallel step's filter gradient is."""
  axes = _batch_axes(arg_shapes[0].sharding)
  if arg_shapes[0].shape[0] % math.prod(mesh.shape[a] for a in axes):
    axes = ()  # a batch the devices do not divide would be padded, and the padding rows summed: gather it instead

  def lower(x, dy):
    dw = _local_filter_grad(x, dy, kernel_size, padding)
    return jax.lax.psum(dw, axes) if axes else dw

  split = _batch_split(mesh, axes)
  return mesh, lower, NamedSharding(mesh, P()), (split, split)


_partitioned_filter_grad.def_partition(
    partition=_partition_filter_grad,
    infer_sharding_from_operands=lambda kernel_size, padding, mesh, arg_shapes, result_shape: NamedSharding(mesh, P()),
    sharding_rule="b h w i, b p q o -> k l i o", reduction_factors=("b",),
    need_replication_factors=("h", "w", "i", "p", "q", "o"))


def _mapped_over_vmap(fn):
  """fn(*arrays) with a vmap rule: custom_partitioning has none, so map over the vmapped axis (one call each)."""

  @jax.custom_batching.custom_vmap
  def call(*arrays):
    return fn(*arrays)

  @call.def_vmap
  def _(axis_size: int, in_batched: list[bool], *arrays: jax.Array):
    arrays = tuple(v if batched else jnp.broadcast_to(v, (axis_size, *v.shape))
                   for v, batched in zip(arrays, in_batched))
    out = jax.lax.map(lambda each: call(*each), arrays)  # `call`: a vmap around this one maps again
    return out, jax.tree.map(lambda _: True, out)

  return call


def conv(x: jax.Array, kernel: jax.Array, padding: int = 1, flipped: bool = False) -> jax.Array:
  """y [B,Ho,Wo,Cout] = the stride-1 conv of x [B,H,W,Cin] padded by `padding` on each side with kernel
  [K,K,Cin,Cout] (NHWC / HWIO; Ho = H + 2 padding - K + 1), XLA's conv_general_dilated's value (a direct
  convolution, not differentiable itself: layers.xla_conv gives it gradients). `flipped` (bfloat16 only): kernel
  is [K,K,Cout,Cin] and is taken flipped in space and transposed, the input gradient's kernel of the conv it
  belongs to, with no copy made. Under a mesh each device convolves its own rows of the batch. Check `takes_conv`
  first."""
  return _mapped_over_vmap(lambda x, kernel: _partitioned_conv[flipped](x, kernel, padding))(x, kernel)


def conv_filter_grad(x: jax.Array, dy: jax.Array, kernel_size: int = 3, padding: int = 1) -> jax.Array:
  """dw [K,K,Cin,Cout] of y = conv(x, w) (KxK, stride 1, `padding` on each side; NHWC / HWIO) from x [B,H,W,Cin]
  and dy [B,Ho,Wo,Cout], Ho = H + 2 padding - K + 1: dw[kh,kw,i,o] = sum_{b,oh,ow} x[b,oh+kh-P,ow+kw-P,i]
  dy[b,oh,ow,o]. Under a mesh each device sums its own rows of the batch and the partial sums are added over the
  batch's mesh axes; under `jax.vmap` one call per mapped element. Check `takes_conv_filter_grad` first."""
  return _mapped_over_vmap(lambda x, dy: _partitioned_filter_grad(x, dy, kernel_size, padding))(x, dy)


def _group_norm_fits(x: jax.Array, num_groups: int) -> bool:
  """x [B,...,C] float32, at least one spatial axis, no empty axis, C a multiple of num_groups."""
  return (x.dtype == jnp.float32 and x.ndim >= 3 and num_groups > 0 and x.shape[-1] % num_groups == 0
          and min(x.shape) > 0)


def takes_group_norm(x: jax.Array, num_groups: int) -> bool:
  """Whether `group_norm` and `group_norm_grad` take this x [B,...,C] (float32, at least one spatial axis, C a
  multiple of num_groups) on this backend."""
  return jax.default_backend() == "cpu" and _group_norm_fits(x, num_groups) and available()


def _group_norm_checked(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int) -> None:
  """One line naming what does not fit, before the kernel would refuse it deep inside XLA."""
  if not _group_norm_fits(x, num_groups):
    raise ValueError(f"native group_norm of x {x.dtype}{list(x.shape)} in {num_groups} groups: expected float32 "
                     "[B,...,C] (at least one spatial axis, none empty) with C a multiple of the groups")
  if scale.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
    raise ValueError(f"native group_norm: scale {list(scale.shape)} and bias {list(bias.shape)}; expected both "
                     f"[{x.shape[-1]}]")


def _local_group_norm(x, scale, bias, options, num_groups):
  _loaded()
  stats = jax.ShapeDtypeStruct((x.shape[0], num_groups), jnp.float32)
  return jax.ffi.ffi_call(GROUP_NORM_TARGET, (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats, stats))(
      x, scale, bias, options, groups=np.int64(num_groups))


def _local_group_norm_grad(x, scale, bias, mean, rstd, dy, options, num_groups):
  _loaded()
  per_example = jax.ShapeDtypeStruct((x.shape[0], x.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call(GROUP_NORM_GRAD_TARGET, (jax.ShapeDtypeStruct(x.shape, jnp.float32), per_example,
                                                   per_example))(
      x, scale, bias, mean, rstd, dy, options, groups=np.int64(num_groups))


def _group_norm_options(epsilon: float, silu: bool) -> jax.Array:
  """[epsilon, silu] as an operand of the kernels' calls: a constant in the HLO, hence in the compilation cache's
  key, where custom_partitioning's Python arguments are not (keep_compilation_cache_hits drops its callback)."""
  return jnp.asarray([epsilon, 1.0 if silu else 0.0], jnp.float32)


def _per_example_partitioned(local, static_argnums: tuple[int, ...], sharding_rule: str,
                             result_ranks: tuple[int, ...]):
  """local(*arrays, *static) under custom_partitioning, each device computing its own rows of the batch: the
  first array's batch axis is the only one left split, every result is per example (split the same way), and the
  per-channel arrays (the scale, the bias) are replicated. Per-example statistics [B,G] travel split too."""

  @functools.partial(custom_partitioning, static_argnums=static_argnums)
  def partitioned(*args):
    return local(*args)

  def shardings(mesh, arg_shapes):
    axes = _batch_axes(arg_shapes[0].sharding)
    ranks = [len(a.shape) for a in arg_shapes]
    args = tuple(_batch_split(mesh, axes, r) if r > 1 else NamedSharding(mesh, P()) for r in ranks)
    return args, tuple(_batch_split(mesh, axes, r) for r in result_ranks)

  def partition(*static_and_rest):
    static, (mesh, arg_shapes, result_shape) = static_and_rest[:-3], static_and_rest[-3:]
    args, results = shardings(mesh, arg_shapes)
    return mesh, lambda *a: local(*a, *static), results, args

  partitioned.def_partition(
      partition=partition,
      infer_sharding_from_operands=lambda *a: shardings(a[-3], a[-2])[1],
      sharding_rule=sharding_rule,
      need_replication_factors=tuple(  # every factor but the batch's, in the rule's order (as Shardy requires)
          f for f in dict.fromkeys(sharding_rule.replace("->", " ").replace(",", " ").split()) if f != "b"))
  return partitioned


_partitioned_group_norm = _per_example_partitioned(
    _local_group_norm, (4,), "b s c, c, c, z -> b s c, b g, b g", (3, 2, 2))
_partitioned_group_norm_grad = _per_example_partitioned(
    _local_group_norm_grad, (7,), "b s c, c, c, b g, b g, b s c, z -> b s c, b c, b c", (3, 2, 2))


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float,
               silu: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(y, mean, rstd): y [B,...,C] = GroupNorm of x [B,...,C] float32 over each example's num_groups groups of
  channels (every spatial position), times scale [C] plus bias [C], then SiLU when `silu`; mean and rstd =
  1 / sqrt(var + epsilon) [B,G], float32 (layers.group_norm_affine's forward and residuals; statistics summed in
  float64 per channel group). Under a mesh each device normalises its own rows of the batch. Check
  `takes_group_norm` first."""
  _group_norm_checked(x, scale, bias, num_groups)
  shape = x.shape
  call = _mapped_over_vmap(lambda *arrays: _partitioned_group_norm(*arrays, num_groups))
  y, mean, rstd = call(x.reshape(shape[0], -1, shape[-1]), scale, bias, _group_norm_options(epsilon, silu))
  return y.reshape(shape), mean, rstd


def group_norm_grad(x: jax.Array, scale: jax.Array, bias: jax.Array, mean: jax.Array, rstd: jax.Array,
                    dy: jax.Array, num_groups: int, silu: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dx [B,...,C], dscale [C], dbias [C]) of `group_norm` at x with its mean and rstd [B,G], given the output's
  gradient dy [B,...,C] (float32)."""
  _group_norm_checked(x, scale, bias, num_groups)
  stats = (x.shape[0], num_groups)
  if dy.shape != x.shape or dy.dtype != jnp.float32 or mean.shape != stats or rstd.shape != stats:
    raise ValueError(f"group_norm_grad: dy {dy.dtype}{list(dy.shape)}, mean {list(mean.shape)}, rstd "
                     f"{list(rstd.shape)}; expected dy float32{list(x.shape)} and both [{x.shape[0]},{num_groups}]")
  shape = x.shape
  call = _mapped_over_vmap(lambda *arrays: _partitioned_group_norm_grad(*arrays, num_groups))
  flat = lambda a: a.reshape(shape[0], -1, shape[-1])
  dx, sum_dy, sum_dy_xhat = call(flat(x), scale, bias, mean, rstd, flat(dy), _group_norm_options(0.0, silu))
  return dx.reshape(shape), jnp.sum(sum_dy_xhat, 0), jnp.sum(sum_dy, 0)
