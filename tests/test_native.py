"""diffusion_jax.models.native: the C++ 2x2 / 3x3 stride-1 convs and their filter gradients (XLA FFI custom calls on
CPU) against XLA's in float64, under a mesh, vmap, scan and shard_map, as the U-Net's layers use them, and the
fallback where they cannot be built."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_jax.models import layers, native

# Skipped only where the host cannot run the kernels at all (no AVX-512, no compiler); a failing build fails.
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu" or native.host_unsupported_reason() is not None,
                                reason=f"native CPU kernels not for this host: {native.host_unsupported_reason()}")


def conv(x, kernel, padding):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(padding, padding)] * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def reference_filter_grad(x, dy, kernel_size, padding):
  """autodiff's kernel gradient of XLA's conv, in float64."""
  with jax.enable_x64():
    x64, dy64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (x, dy))
    zero = jnp.zeros((kernel_size, kernel_size, x.shape[-1], dy.shape[-1]), jnp.float64)
    return np.asarray(jax.vjp(lambda k: conv(x64, k, padding), zero)[1](dy64)[0])


def inputs(shape, kernel_size, padding, cout, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  out = [n + 2 * padding - kernel_size + 1 for n in shape[1:3]]
  return jax.random.normal(kx, shape), jax.random.normal(ky, (shape[0], *out, cout))


def close(got, ref):
  np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_the_kernels_build_on_this_host():
  assert native.available(), native.unavailable_reason()


SHAPES = [
    ((2, 8, 8, 8), 16),     # the smallest input block the kernels take
    ((3, 7, 5, 20), 32),    # odd sizes; 20 input channels: a partial block of 12
    ((2, 6, 9, 13), 48),    # 3 output vectors; 13 = 8 + a partial block of 5
    ((2, 5, 6, 70), 64),    # 4 output vectors; 70 = 11 blocks of 6 + 4
    ((1, 4, 4, 9), 128),    # several output blocks of 64
    ((2, 3, 33, 24), 16),   # one output vector, blocks of 24; rows longer than a chunk's 256 pixels / width
    ((1, 9, 7, 16), 32),    # one image: the conv's rows in bands, one per task, the last one shorter
]


@pytest.mark.parametrize("shape,cout,kernel_size,padding",
                         [(*case, 3, 1) for case in SHAPES] + [(*case, 2, 1) for case in SHAPES]
                         + [(*SHAPES[1], 3, 0), (*SHAPES[1], 2, 0), (*SHAPES[1], 3, 2)])
def test_filter_grad_is_xlas(shape, cout, kernel_size, padding):
  x, dy = inputs(shape, kernel_size, padding, cout)
  assert native.takes_conv_filter_grad(x, dy, kernel_size, padding)
  got = jax.jit(native.conv_filter_grad, static_argnums=(2, 3))(x, dy, kernel_size, padding)
  assert got.shape == (kernel_size, kernel_size, shape[-1], cout) and got.dtype == jnp.float32
  close(got, reference_filter_grad(x, dy, kernel_size, padding))


def reference_conv(x, kernel, padding):
  with jax.enable_x64():
    return np.asarray(conv(*(jnp.asarray(np.asarray(a), jnp.float64) for a in (x, kernel)), padding))


@pytest.mark.parametrize("shape,cout,kernel_size,padding",
                         [(*case, 3, 1) for case in SHAPES] + [(*case, 2, 1) for case in SHAPES]
                         + [(*SHAPES[1], 3, 0), (*SHAPES[1], 2, 0), (*SHAPES[1], 3, 2)])
def test_conv_is_xlas(shape, cout, kernel_size, padding):
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, shape[-1], cout))
  assert native.takes_conv(x, kernel, padding)
  got = jax.jit(native.conv, static_argnums=2)(x, kernel, padding)
  ref = reference_conv(x, kernel, padding)
  assert got.shape == ref.shape and got.dtype == jnp.float32
  close(got, ref)


@pytest.mark.parametrize("x_shape,cout,kernel_size,padding,dtype", [
    ((2, 8, 8, 4), 16, 3, 1, jnp.float32),    # fewer input channels than MIN_INPUT_CHANNELS (a stem)
    ((2, 8, 8, 8), 24, 3, 1, jnp.float32),    # output channels not a multiple of 16
    ((2, 8, 8, 8), 16, 5, 2, jnp.float32),    # 5x5
    ((2, 8, 8, 8), 16, 3, 1, jnp.float16),
    ((2, 1, 1, 8), 16, 2, 0, jnp.float32),    # an empty output
])
def test_shapes_and_dtypes_it_does_not_take(x_shape, cout, kernel_size, padding, dtype):
  x, dy = (a.astype(dtype) for a in inputs(x_shape, kernel_size, padding, cout))
  assert not native.takes_conv_filter_grad(x, dy, kernel_size, padding)
  assert not native.takes_conv(x, jnp.zeros((kernel_size, kernel_size, x_shape[-1], cout), dtype), padding)


def test_mixed_dtypes_and_bfloat16_without_amx_or_avx512_bf16_are_not_taken(monkeypatch):
  x, dy = inputs((2, 8, 8, 8), 3, 1, 16)
  assert not native.takes_conv_filter_grad(x.astype(jnp.bfloat16), dy, 3, 1)
  assert not native.takes_conv(x, jnp.zeros((3, 3, 8, 16), jnp.bfloat16), 1)
  monkeypatch.setattr(native, "bf16_available", lambda: False)
  x, dy = x.astype(jnp.bfloat16), dy.astype(jnp.bfloat16)
  assert not native.takes_conv_filter_grad(x, dy, 3, 1)
  assert not native.takes_conv(x, jnp.zeros((3, 3, 8, 16), jnp.bfloat16), 1)


def test_flipped_kernels_are_bfloat16_only_and_without_amx_or_avx512_bf16_refused_with_a_line(monkeypatch):
  """The float32 conv takes no flipped kernel; a bfloat16 call on a host without AMX's tile state or AVX512-BF16 is
  a ValueError, not the process killed by an illegal instruction."""
  x = jnp.zeros((2, 8, 8, 32))
  kernel = jnp.zeros((3, 3, 16, 32))  # flipped: [K,K,Cout,Cin]
  assert not native.takes_conv(x, kernel, 1, flipped=True)
  monkeypatch.setattr(native, "bf16_available", lambda: False)
  with pytest.raises(ValueError, match="need AMX"):
    native.conv(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), 1, flipped=True)
  with pytest.raises(ValueError, match="need AMX"):
    native.conv_filter_grad(x.astype(jnp.bfloat16), jnp.zeros((2, 8, 8, 16), jnp.bfloat16), 3, 1)


needs_bf16 = pytest.mark.skipif(not native.bf16_available(),
                                reason="the bfloat16 kernels need a CPU with AMX or AVX512-BF16")
# Channel counts around the AMX kernels' blocks: 32 input channels per tile (8-70: zero-padded to 32 or 96), 16 or
# 32 output channels per pass; widths around the 32 positions of a tile pair; one image in bands.
BF16_SHAPES = SHAPES + [((2, 32, 32, 32), 32), ((1, 16, 16, 64), 64), ((2, 8, 8, 40), 48), ((3, 5, 17, 96), 16)]


@pytest.fixture(params=["amx", "avx512_bf16"])
def bf16_kernels(request):
  """Each of the bfloat16 kernels this CPU can run (an AMX host usually has AVX512-BF16 too), chosen in turn."""
  kind = request.param
  if not (native.amx_available() if kind == "amx" else native.avx512_bf16_available()):
    pytest.skip(f"this CPU cannot run the {kind} kernels")
  native.use_amx(kind == "amx")
  assert native.bf16_kernels() == kind
  yield kind
  native.use_amx(True)


@pytest.mark.parametrize("shape,cout,kernel_size,padding",
                         [(*case, 3, 1) for case in BF16_SHAPES] + [(*case, 2, 1) for case in BF16_SHAPES[:7]]
                         + [(*SHAPES[1], 3, 0), (*SHAPES[1], 2, 0), (*SHAPES[1], 3, 2)])
def test_bfloat16_kernels_sum_exact_products_in_float32(bf16_kernels, shape, cout, kernel_size, padding):
  """bfloat16 x, w / dy (AMX's kernels and AVX512-BF16's): each product exact, summed in float32, so float64's value
  of the same bfloat16 numbers to float32's rounding; the result float32."""
  x, dy = (a.astype(jnp.bfloat16) for a in inputs(shape, kernel_size, padding, cout))
  kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, shape[-1], cout)).astype(jnp.bfloat16)
  assert native.takes_conv(x, kernel, padding) and native.takes_conv_filter_grad(x, dy, kernel_size, padding)
  y = jax.jit(native.conv, static_argnums=2)(x, kernel, padding)
  dw = jax.jit(native.conv_filter_grad, static_argnums=(2, 3))(x, dy, kernel_size, padding)
  assert y.dtype == dw.dtype == jnp.float32
  as32 = lambda a: a.astype(jnp.float32)
  close(y, reference_conv(as32(x), as32(kernel), padding))
  close(dw, reference_filter_grad(as32(x), as32(dy), kernel_size, padding))
  # flipped (the input gradient's form): the kernel whose flip-transpose `kernel` is, packed into the same tiles
  given = kernel[::-1, ::-1].transpose(0, 1, 3, 2)  # [K,K,Cout,Cin]
  assert native.takes_conv(x, given, padding, flipped=True)
  flipped = jax.jit(native.conv, static_argnums=(2, 3))(x, given, padding, True)
  np.testing.assert_array_equal(flipped, y)


def test_a_batch_split_over_a_mesh_sums_each_devices_rows_without_gathering_them():
  """On 8 host devices with the batch split (as the data-parallel train step): each device's rows, then one
  all-reduce of the [K,K,Cin,Cout] result; x and dy are never gathered."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x, dy = inputs((16, 6, 6, 12), 3, 1, 32)
  split = NamedSharding(mesh, P("data"))
  f = jax.jit(lambda x, dy: native.conv_filter_grad(x, dy, 3, 1))
  xs, dys = jax.device_put(x, split), jax.device_put(dy, split)
  got = f(xs, dys)
  close(got, reference_filter_grad(x, dy, 3, 1))
  hlo = f.lower(xs, dys).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  assert re.findall(r"= f32\[[\d,]+\]\{[\d,]+\} all-reduce\(", hlo) and "f32[3,3,12,32]" in hlo
  assert re.search(r'custom_call_target="' + native.FILTER_GRAD_TARGET, hlo)
  # the conv itself: each device its own rows, no collective at all
  kernel = jax.random.normal(jax.random.key(3), (3, 3, 12, 32))
  forward = jax.jit(lambda x, kernel: native.conv(x, kernel, 1))
  y = forward(xs, kernel)
  close(y, reference_conv(x, kernel, 1))
  assert y.sharding.spec[0] == "data"
  hlo = forward.lower(xs, kernel).compile().as_text()
  assert native.CONV_TARGET in hlo and not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", hlo)
  # and inside shard_map (the multi-process flat gradient reduce computes each device's gradient there)
  per_device = jax.shard_map(lambda x, dy: jax.lax.psum(native.conv_filter_grad(x, dy, 3, 1), "data"), mesh=mesh,
                             in_specs=(P("data"), P("data")), out_specs=P(), check_vma=False)
  close(jax.jit(per_device)(xs, dys), reference_filter_grad(x, dy, 3, 1))


def test_bfloat16_under_a_mesh_each_device_its_own_rows(bf16_kernels):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x, dy = (a.astype(jnp.bfloat16) for a in inputs((16, 6, 6, 32), 3, 1, 32))
  kernel = jax.random.normal(jax.random.key(3), (3, 3, 32, 32)).astype(jnp.bfloat16)
  split = NamedSharding(mesh, P("data"))
  xs, dys = jax.device_put(x, split), jax.device_put(dy, split)
  as32 = lambda a: a.astype(jnp.float32)
  close(jax.jit(lambda x, dy: native.conv_filter_grad(x, dy, 3, 1))(xs, dys),
        reference_filter_grad(as32(x), as32(dy), 3, 1))
  y = jax.jit(lambda x, kernel: native.conv(x, kernel, 1))(xs, kernel)
  close(y, reference_conv(as32(x), as32(kernel), 1))
  assert y.sharding.spec[0] == "data"
  flipped = jax.jit(lambda x, kernel: native.conv(x, kernel, 1, flipped=True))(xs, kernel[::-1, ::-1].transpose(
      0, 1, 3, 2))
  np.testing.assert_array_equal(flipped, y)
  assert flipped.sharding.spec[0] == "data"


def test_vmap_and_scan():
  x, dy = inputs((4, 6, 6, 8), 2, 1, 16)
  vmapped = jax.jit(jax.vmap(lambda x, dy: native.conv_filter_grad(x, dy, 2, 1)))(x.reshape(2, 2, 6, 6, 8),
                                                                                  dy.reshape(2, 2, 7, 7, 16))
  for i in range(2):
    close(vmapped[i], reference_filter_grad(x[2 * i:2 * i + 2], dy[2 * i:2 * i + 2], 2, 1))
  unbatched = jax.vmap(lambda x: native.conv_filter_grad(x, dy, 2, 1))(x[None])  # dy not mapped
  close(unbatched[0], reference_filter_grad(x, dy, 2, 1))
  nested = jax.vmap(jax.vmap(lambda x, dy: native.conv_filter_grad(x, dy, 2, 1)))(x.reshape(2, 1, 2, 6, 6, 8),
                                                                                dy.reshape(2, 1, 2, 7, 7, 16))
  close(nested[1, 0], reference_filter_grad(x[2:], dy[2:], 2, 1))

  def accumulated(x, dy):
    return jax.lax.scan(lambda total, pair: (total + native.conv_filter_grad(*pair, 2, 1), None),
                        jnp.zeros((2, 2, 8, 16)), (x.reshape(2, 2, 6, 6, 8), dy.reshape(2, 2, 7, 7, 16)))[0]
  close(jax.jit(accumulated)(x, dy), reference_filter_grad(x, dy, 2, 1))
  kernel = jax.random.normal(jax.random.key(3), (2, 2, 8, 16))
  close(jax.vmap(lambda x: native.conv(x, kernel, 1))(x.reshape(2, 2, 6, 6, 8)).reshape(4, 7, 7, 16),
        reference_conv(x, kernel, 1))


@pytest.mark.parametrize("upsample,dtype", [(False, jnp.float32), (True, jnp.float32),
                                            pytest.param(False, jnp.bfloat16, marks=needs_bf16),
                                            pytest.param(True, jnp.bfloat16, marks=needs_bf16)])
def test_the_unets_convs_take_it_and_keep_their_gradients(monkeypatch, upsample, dtype):
  """layers.Conv (3x3, and the sub-pixel upsampling conv's 2x2) through the native kernels, its value and both
  gradients, equals the same through XLA's convs (`layers.NATIVE_CONV = NATIVE_FILTER_GRAD = False`), and the
  compiled step calls both kernels. In bfloat16 (model.dtype) both round each conv's float32 sums to bfloat16."""
  conv_layer = layers.Conv(32, upsample=upsample, conv_impl="xla", dtype=dtype)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
  params = conv_layer.init(jax.random.key(1), x)
  weights = jax.random.normal(jax.random.key(2), conv_layer.apply(params, x).shape)
  loss = lambda p, x: jnp.sum(jnp.sin(conv_layer.apply(p, x).astype(jnp.float32)) * weights)
  grad = jax.jit(jax.grad(loss, (0, 1)))
  native_grads, native_y = grad(params, x), jax.jit(conv_layer.apply)(params, x)
  hlo = grad.lower(params, x).compile().as_text()
  conv_target, filter_grad_target = ((native.CONV_TARGET, native.FILTER_GRAD_TARGET) if dtype == jnp.float32 else
                                     (native.CONV_BF16_TARGET, native.FILTER_GRAD_BF16_TARGET))
  assert f'"{filter_grad_target}"' in hlo and len(re.findall(f'"{conv_target}"', hlo)) == 2  # forward, input grad
  assert native_y.dtype == dtype
  monkeypatch.setattr(layers, "NATIVE_FILTER_GRAD", False)
  monkeypatch.setattr(layers, "NATIVE_CONV", False)
  xla_grads = jax.jit(jax.grad(loss, (0, 1)))(params, x)
  assert native.CONV_TARGET not in jax.jit(conv_layer.apply).lower(params, x).compile().as_text()
  xla_y = np.asarray(jax.jit(conv_layer.apply)(params, x), np.float64)
  tolerance = 2e-6 if dtype == jnp.float32 else 1e-2  # bfloat16: an ulp of the rounded sums, either side
  np.testing.assert_allclose(np.asarray(native_y, np.float64), xla_y, rtol=0, atol=tolerance * np.abs(xla_y).max())
  for a, b in zip(jax.tree.leaves(native_grads), jax.tree.leaves(xla_grads)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=0, atol=5 * tolerance * np.abs(b).max())


def test_a_host_that_cannot_build_them_keeps_xlas_and_says_why(monkeypatch, tmp_path, caplog):
  """Switched off, or a compiler that fails: `available()` is False with the reason, a warning names the
  compiler's failure, and the layers' gradients go through XLA's conv."""
  try:
    monkeypatch.setenv("DJ_NATIVE_KERNELS", "0")
    native._load.cache_clear()
    assert not native.available() and native.unavailable_reason() == "DJ_NATIVE_KERNELS=0"
    monkeypatch.delenv("DJ_NATIVE_KERNELS")
    monkeypatch.setenv("CXX", "false")  # exits 1 on any arguments
    monkeypatch.setenv("DJ_NATIVE_CACHE", str(tmp_path))  # nothing built here yet
    native._load.cache_clear()
    assert not native.available() and "false failed on conv.cc" in native.unavailable_reason()
    assert "XLA's are used instead" in caplog.text
    x, dy = inputs((2, 8, 8, 8), 3, 1, 16)
    kernel = jnp.zeros((3, 3, 8, 16))
    assert not native.takes_conv_filter_grad(x, dy, 3, 1) and not native.takes_conv(x, kernel, 1)
    grad = jax.jit(jax.grad(lambda k: jnp.sum(layers.xla_conv(x, k) * dy)))
    hlo = grad.lower(kernel).compile().as_text()
    assert native.FILTER_GRAD_TARGET not in hlo and native.CONV_TARGET not in hlo
    close(grad(kernel), reference_filter_grad(x, dy, 3, 1))
  finally:
    monkeypatch.undo()
    native._load.cache_clear()
  assert native.available()


def test_the_environment_variables_are_known_and_checked():
  from diffusion_jax.environment import read_environment
  assert read_environment({"DJ_NATIVE_KERNELS": "0", "DJ_NATIVE_CACHE": "/tmp/x"}) == read_environment({})
  with pytest.raises(ValueError, match=r"DJ_NATIVE_KERNELS='off' is invalid: expected '1' \(the default"):
    read_environment({"DJ_NATIVE_KERNELS": "off"})


CACHE_PROBE = """
import os, sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from diffusion_jax.models import layers, native
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
if sys.argv[2] == "keep":
  native.keep_compilation_cache_hits()
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
x = jax.device_put(jnp.ones((4, 8, 8, 16)), NamedSharding(mesh, P("data")))
grad = jax.jit(jax.grad(lambda k, x: jnp.sum(layers.xla_conv(x, k) ** 2), (0, 1)))
assert native.FILTER_GRAD_TARGET in grad.lower(jnp.ones((3, 3, 16, 32)), x).compile().as_text()
grad(jnp.ones((3, 3, 16, 32)), x)
print(len(os.listdir(sys.argv[1])))
"""


@pytest.mark.parametrize("keep", [True, False])
def test_a_multi_device_program_with_the_kernels_hits_the_compilation_cache_in_the_next_process(tmp_path, keep):
  """With keep_compilation_cache_hits (as main and the tests' conftest call it) a second process finds the first
  one's compiled 2-device step in the persistent cache; without it JAX's key holds the custom_partitioning object's
  id and every process compiles and writes the program anew."""
  import subprocess
  import sys
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  run = lambda: subprocess.run([sys.executable, "-c", CACHE_PROBE, str(tmp_path), "keep" if keep else "no"],
                               env=env, capture_output=True, text=True, timeout=300)
  first, second = run(), run()
  assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
  entries = int(first.stdout.split()[-1]), int(second.stdout.split()[-1])
  assert (entries[1] == entries[0]) == keep, entries


def reference_group_norm(x, scale, bias, groups, epsilon, silu):
  """GroupNorm (+ SiLU) in float64: per example and group, mean and variance over the spatial axes and the group's
  channels (float64 jax arrays in, or anything else converted)."""
  with jax.enable_x64():
    x, scale, bias = (a if isinstance(a, jax.core.Tracer) else jnp.asarray(np.asarray(a), jnp.float64)
                      for a in (x, scale, bias))
    grouped = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
    mean, var = grouped.mean((1, 3), keepdims=True), grouped.var((1, 3), keepdims=True)
    y = ((grouped - mean) / jnp.sqrt(var + epsilon)).reshape(x.shape) * scale + bias
    return jax.nn.silu(y) if silu else y


GROUP_NORM_CASES = [
    ((2, 8, 8, 64), 32),    # 2 channels per group, whole 16-lane vectors
    ((2, 5, 7, 96), 32),    # 3 channels per group, odd sizes
    ((1, 8, 8, 64), 32),    # one example: split into ranges of groups across tasks
    ((2, 3, 3, 48), 16),    # 48 channels: a masked last vector, and halves of 24 channels
    ((3, 4, 4, 32), 32),    # one channel per group
    ((2, 10, 40), 8),       # [B,L,C] tokens
    ((1, 64, 80, 32), 32),  # 5120 positions: several float32 partial sums per channel
]


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape,groups", GROUP_NORM_CASES)
def test_group_norm_and_its_gradient_are_float64s(shape, groups, silu):
  """native.group_norm's output (and its [B,G] mean and 1/std) and group_norm_grad's dx, dscale, dbias against
  float64 (autodiff of the reference for the gradients), for a mean far from zero (the E[x^2] - E[x]^2 variance)."""
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], shape) * 2 + 3
  scale, bias = 1 + jax.random.normal(keys[1], (2, shape[-1]))
  dy = jax.random.normal(keys[2], shape)
  assert native.takes_group_norm(x, groups)
  y, mean, rstd = jax.jit(native.group_norm, static_argnums=(3, 4, 5))(x, scale, bias, groups, 1e-6, silu)
  close(y, np.asarray(reference_group_norm(x, scale, bias, groups, 1e-6, silu)))
  grouped = np.asarray(x, np.float64).reshape(shape[0], -1, groups, shape[-1] // groups)
  np.testing.assert_allclose(mean, grouped.mean((1, 3)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(rstd, 1 / np.sqrt(grouped.var((1, 3)) + 1e-6), rtol=1e-5)
  got = jax.jit(native.group_norm_grad, static_argnums=(6, 7))(x, scale, bias, mean, rstd, dy, groups, silu)
  with jax.enable_x64():
    as64 = lambda a: jnp.asarray(np.asarray(a), jnp.float64)
    loss = lambda x, s, b: jnp.vdot(reference_group_norm(x, s, b, groups, 1e-6, silu), as64(dy))
    want = jax.grad(loss, (0, 1, 2))(as64(x), as64(scale), as64(bias))
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w), rtol=0, atol=2e-5 * np.abs(w).max())


def test_group_norm_under_a_mesh_vmap_and_what_it_does_not_take():
  """On 8 host devices with the batch split each device normalises its own rows (no collective but the scale's and
  bias's gradient sums); under vmap one call per mapped element; bfloat16, [B,C] and groups that do not divide C are
  not taken."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.random.normal(jax.random.key(0), (16, 4, 4, 64))
  scale, bias, dy = jnp.full(64, 1.5), jnp.full(64, 0.25), jax.random.normal(jax.random.key(1), x.shape)
  split = NamedSharding(mesh, P("data"))
  xs, dys = jax.device_put(x, split), jax.device_put(dy, split)
  forward = jax.jit(lambda x: native.group_norm(x, scale, bias, 32, 1e-6, True))
  y, mean, rstd = forward(xs)
  close(y, np.asarray(reference_group_norm(x, scale, bias, 32, 1e-6, True)))
  assert y.sharding.spec[0] == "data" and mean.sharding.spec[0] == "data"
  hlo = forward.lower(xs).compile().as_text()
  assert native.GROUP_NORM_TARGET in hlo and not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", hlo)
  backward = jax.jit(lambda x, dy: native.group_norm_grad(x, scale, bias, mean, rstd, dy, 32, True))
  dx, dscale, dbias = backward(xs, dys)
  want = native.group_norm_grad(x, scale, bias, *native.group_norm(x, scale, bias, 32, 1e-6, True)[1:], dy, 32, True)
  for g, w in zip((dx, dscale, dbias), want):
    close(g, np.asarray(w, np.float64))
  assert dx.sharding.spec[0] == "data" and "all-gather" not in backward.lower(xs, dys).compile().as_text()
  mapped = jax.vmap(lambda x: native.group_norm(x, scale, bias, 32, 1e-6, False)[0])(x.reshape(2, 8, 4, 4, 64))
  close(mapped.reshape(x.shape), np.asarray(reference_group_norm(x, scale, bias, 32, 1e-6, False)))
  assert not native.takes_group_norm(x.astype(jnp.bfloat16), 32)
  assert not native.takes_group_norm(x[:, 0, 0], 32)
  assert not native.takes_group_norm(x, 24)
  with pytest.raises(ValueError, match=r"x float32\[16, 4, 4, 64\] in 24 groups: expected float32"):
    native.group_norm(x, scale, bias, 24, 1e-6)
  with pytest.raises(ValueError, match=r"scale \[32\] and bias \[64\]; expected both \[64\]"):
    native.group_norm(x, scale[:32], bias, 32, 1e-6)
  with pytest.raises(ValueError, match=r"dy float32\[16, 4, 4, 32\].*expected dy float32\[16, 4, 4, 64\]"):
    native.group_norm_grad(x, scale, bias, mean, rstd, dy[..., :32], 32)
  with pytest.raises(ValueError, match=r"rstd \[16, 16\]; expected dy float32\[16, 4, 4, 64\] and both \[16,32\]"):
    native.group_norm_grad(x, scale, bias, mean, rstd[:, :16], dy, 32)


def test_group_norms_silu_and_epsilon_reach_the_compilation_cache_key():
  """Under a mesh the partitioned call's HLO holds no Python callback (keep_compilation_cache_hits drops its
  pointer from the cache key), so SiLU and epsilon must be in the HLO itself: programs that differ only in them
  compile to their own executables, not to one found in the persistent cache (conftest turns both on)."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.device_put(jax.random.normal(jax.random.key(7), (8, 6, 6, 32)) * 3, NamedSharding(mesh, P("data")))
  scale, bias = jnp.full(32, 0.75), jnp.full(32, -0.5)
  dy = jax.device_put(jax.random.normal(jax.random.key(8), x.shape), NamedSharding(mesh, P("data")))
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # every program persisted
  try:
    for silu, epsilon in [(False, 1e-6), (True, 1e-6), (True, 1.0)]:
      def loss(x, silu=silu, epsilon=epsilon):
        return jax.jit(lambda x: native.group_norm(x, scale, bias, 32, epsilon, silu)[0])(x)
      close(loss(x), np.asarray(reference_group_norm(x, scale, bias, 32, epsilon, silu)))
      _, mean, rstd = native.group_norm(x, scale, bias, 32, epsilon, silu)
      got = jax.jit(lambda x, dy, silu=silu: native.group_norm_grad(x, scale, bias, mean, rstd, dy, 32, silu)[0])(x, dy)
      with jax.enable_x64():
        as64 = lambda a: jnp.asarray(np.asarray(a), jnp.float64)
        want = jax.grad(lambda x: jnp.vdot(reference_group_norm(x, as64(scale), as64(bias), 32, epsilon, silu),
                                           as64(dy)))(as64(x))
      close(got, np.asarray(want))
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
