"""CPU kernels written here in C++ as XLA FFI custom calls, built with the system's C++ compiler on first use.

Today one: the filter gradient of a 3x3 or 2x2 stride-1 conv (`conv_filter_grad`, AVX-512). XLA:CPU's own ran
at 40-100 GFLOP/s per core on the narrow convs of small U-Nets, about 60% of its forward's rate; this one at
105-130 (README, "Faster than PyTorch?"). Where it cannot be used (no compiler, no AVX-512, a shape it does not
take, `DJ_NATIVE_KERNELS=0`) the callers keep XLA's: `available()` says which and `unavailable_reason()` why.

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

SOURCE = Path(__file__).with_name("conv_filter_grad.cc")
FFI_TARGET = "diffusion_jax_conv_filter_grad"
COMPILE_TIMEOUT_S = 300
# Fewer input channels than this keep XLA's filter gradient: the kernel pads each block of input channels to its
# register block (6-24), so a 1- or 3-channel stem would do up to 24x the multiply-adds.
MIN_INPUT_CHANNELS = 8
# Output channels must be a multiple of one AVX-512 vector of float32.
OUTPUT_CHANNEL_MULTIPLE = 16


def cache_dir() -> Path:
  return Path(os.environ.get("DJ_NATIVE_CACHE") or Path.home() / ".cache" / "diffusion_jax" / "native")


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
  key = hashlib.sha256("\n".join([SOURCE.read_text(), importlib.metadata.version("jaxlib"), version, " ".join(flags),
                                  _cpu_flags(), platform.machine()]).encode()).hexdigest()[:16]
  target = cache_dir() / f"{SOURCE.stem}-{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = Path(tmp) / target.name
    result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True,
                            timeout=COMPILE_TIMEOUT_S)
    if result.returncode != 0:
      raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-500:]}")
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
    jax.ffi.register_ffi_target(FFI_TARGET, jax.ffi.pycapsule(library.ConvFilterGrad), platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    logging.warning("diffusion_jax native CPU kernels unavailable, XLA's are used instead: %s", e)
    return None, str(e)
  return library, ""


def available() -> bool:
  """Whether the native CPU kernels are built and registered (builds them on the first call)."""
  return _load()[0] is not None


def unavailable_reason() -> str:
  return _load()[1]


def takes_conv_filter_grad(x: jax.Array, dy: jax.Array, kernel_size: int, padding: int) -> bool:
  """Whether `conv_filter_grad` takes this x [B,H,W,Cin], dy [B,Ho,Wo,Cout] on this backend."""
  size = [n + 2 * padding - kernel_size + 1 for n in x.shape[1:3]] if x.ndim == 4 else None
  return (jax.default_backend() == "cpu" and kernel_size in (2, 3) and 0 <= padding < kernel_size
          and x.dtype == jnp.float32 and dy.dtype == jnp.float32 and dy.ndim == 4 and x.ndim == 4
          and x.shape[0] == dy.shape[0] and list(dy.shape[1:3]) == size and x.shape[3] >= MIN_INPUT_CHANNELS
          and dy.shape[3] % OUTPUT_CHANNEL_MULTIPLE == 0 and available())


def _local_filter_grad(x: jax.Array, dy: jax.Array, kernel_size: int, padding: int) -> jax.Array:
  out = jax.ShapeDtypeStruct((kernel_size, kernel_size, x.shape[3], dy.shape[3]), jnp.float32)
  return jax.ffi.ffi_call(FFI_TARGET, out, vmap_method="sequential")(x, dy, padding=np.int64(padding))


def _batch_axes(sharding) -> tuple:
  """The mesh axes x's batch dimension is split over (none if it is not a NamedSharding)."""
  if not isinstance(sharding, NamedSharding) or not sharding.spec:
    return ()
  axes = sharding.spec[0]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


@functools.partial(custom_partitioning, static_argnums=(2, 3))
def _partitioned_filter_grad(x: jax.Array, dy: jax.Array, kernel_size: int, padding: int) -> jax.Array:
  return _local_filter_grad(x, dy, kernel_size, padding)


def _partition(kernel_size, padding, mesh, arg_shapes, result_shape):
  """Each device's rows of the batch (the only dimension left split), then the sum over the batch's axes: the
  contraction over B that a data-parallel step's filter gradient is."""
  axes = _batch_axes(arg_shapes[0].sharding)
  operand = NamedSharding(mesh, P(axes if axes else None, None, None, None))

  def lower(x, dy):
    dw = _local_filter_grad(x, dy, kernel_size, padding)
    return jax.lax.psum(dw, axes) if axes else dw

  return mesh, lower, NamedSharding(mesh, P()), (operand, operand)


def _infer(kernel_size, padding, mesh, arg_shapes, result_shape):
  return NamedSharding(mesh, P())


_partitioned_filter_grad.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                                       sharding_rule="b h w i, b p q o -> k l i o", reduction_factors=("b",),
                                       need_replication_factors=("h", "w", "p", "q"))


def conv_filter_grad(x: jax.Array, dy: jax.Array, kernel_size: int = 3, padding: int = 1) -> jax.Array:
  """dw [K,K,Cin,Cout] of y = conv(x, w) (KxK, stride 1, `padding` on each side; NHWC / HWIO) from x [B,H,W,Cin]
  and dy [B,Ho,Wo,Cout], Ho = H + 2 padding - K + 1: dw[kh,kw,i,o] = sum_{b,oh,ow} x[b,oh+kh-P,ow+kw-P,i]
  dy[b,oh,ow,o]. Under a mesh each device sums its own rows of the batch and the partial sums are added over the
  batch's mesh axes; under `jax.vmap` one call per mapped element. Check `takes_conv_filter_grad` first."""

  @jax.custom_batching.custom_vmap
  def filter_grad(x, dy):
    return _partitioned_filter_grad(x, dy, kernel_size, padding)

  @filter_grad.def_vmap
  def _(axis_size: int, in_batched: list[bool], x: jax.Array, dy: jax.Array):
    # custom_partitioning has no batching rule: map over the vmapped axis (x, dy: [N,B,H,W,C] where batched).
    x, dy = (a if batched else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, batched in zip((x, dy), in_batched))
    return jax.lax.map(lambda pair: _partitioned_filter_grad(*pair, kernel_size, padding), (x, dy)), True

  return filter_grad(x, dy)
