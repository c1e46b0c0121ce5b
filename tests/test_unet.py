"""diffusion_jax.models.unet: shapes, parameter count, options wired into every block, im2col conv against lax.conv."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layer_refs as R
from diffusion_jax.models import UNet
from diffusion_jax.models.layers import (AttentionBlock, Conv, ResBlock, conv_im2col, conv_winograd,
                                         conv_winograd_wgrad)

SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


def count(params):
  return sum(x.size for x in jax.tree.leaves(params))


def test_ddpm_cifar10_parameter_count():
  model = UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)))
  n = count(shapes)
  assert abs(n - 35.7e6) / 35.7e6 < 0.01, n  # DDPM reports 35.7M for CIFAR-10


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
def test_im2col_conv_equals_lax_conv(stride, size):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 5))
  k = jax.random.normal(jax.random.key(1), (3, 3, 5, 6))
  ref = jax.lax.conv_general_dilated(x, k, (stride, stride), [(1, 1), (1, 1)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv_im2col(x, k, stride, 1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_matrices_compute_1d_correlation_in_float64(m):
  """A^T [(G g) * (B^T d)] is the correlation of an (m+2)-tap input with a 3-tap filter (Lavin & Gray 2016 sec. 4),
  exactly up to float64 rounding; and _combine applies a matrix as the additions it names."""
  from diffusion_jax.models import layers
  mats = {k: np.array(v, np.float64) for k, v in layers.WINOGRAD_MATRICES[m].items()}
  rng = np.random.default_rng(m)
  for _ in range(5):
    d, g = rng.normal(size=m + 2), rng.normal(size=3)
    want = np.array([d[i:i + 3] @ g for i in range(m)])
    np.testing.assert_allclose(mats["AT"] @ ((mats["G"] @ g) * (mats["BT"] @ d)), want, rtol=1e-12, atol=1e-12)
    combined = layers._combine(layers.WINOGRAD_MATRICES[m]["BT"], list(d))
    np.testing.assert_allclose(combined, mats["BT"] @ d, rtol=1e-12, atol=1e-12)


def test_winograd_tile_falls_back_to_2_and_names_a_bad_tile():
  from diffusion_jax.models import layers
  assert layers.winograd_tile((1, 8, 8, 3), 4) == 4
  assert layers.winograd_tile((1, 8, 6, 3), 4) == 2  # 6 is even but not a multiple of 4
  with pytest.raises(ValueError, match="Winograd output tile 3"):
    layers.winograd_tile((1, 6, 6, 3), 3)
  with pytest.raises(ValueError, match="Winograd output tile 0"):
    layers.winograd_tile((1, 8, 8, 3), 0)
  with pytest.raises(ValueError, match="height x width 7x8: expected both even"):
    conv_winograd(jnp.zeros((1, 7, 8, 3)), jnp.zeros((3, 3, 3, 4)))


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("conv", [conv_winograd, conv_winograd_wgrad], ids=["winograd", "winograd_wgrad"])
@pytest.mark.parametrize("shape", [(2, 8, 6, 5), (3, 4, 4, 16), (1, 32, 32, 8)])  # 8x6 under tile 4: 2 (fallback)
def test_winograd_conv_and_its_gradients_equal_lax_conv(shape, conv, tile):
  """F(2x2,3x3)'s and F(4x4,3x3)'s forward against XLA's conv, and its gradients (XLA's, or the filter gradient in
  Winograd's domain for conv_winograd_wgrad) as autodiff's of XLA's conv."""
  conv = functools.partial(conv, tile=tile)
  x = jax.random.normal(jax.random.key(0), shape)
  k = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], 7))
  dy = jax.random.normal(jax.random.key(2), shape[:3] + (7,))
  lax_conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), [(1, 1), (1, 1)],
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  (y_ref, vjp_ref), (y, vjp) = jax.vjp(lax_conv, x, k), jax.vjp(conv, x, k)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-5 * float(jnp.abs(y_ref).max()))
  for got, want, name in zip(vjp(dy), vjp_ref(dy), ("dx", "dkernel")):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * float(jnp.abs(want).max()), err_msg=name)


def test_winograd_filter_gradient_in_batch_chunks_equals_the_whole_batch():
  """winograd_filter_grad sums its batch chunks' products in a scan (bounding the tiles' memory): the same
  gradient as the whole batch at once, and as XLA's."""
  from diffusion_jax.models import layers
  x, dy = jax.random.normal(jax.random.key(0), (8, 8, 6, 5)), jax.random.normal(jax.random.key(1), (8, 8, 6, 7))
  whole = layers.winograd_filter_grad(x, dy, max_tile_bytes=1 << 30)
  chunked = jax.jit(lambda x, dy: layers.winograd_filter_grad(x, dy, max_tile_bytes=8 * 6 * 12 * 4 * 4))
  whole_jaxpr = jax.make_jaxpr(lambda x, dy: layers.winograd_filter_grad(x, dy, max_tile_bytes=1 << 30))(x, dy)
  assert "scan" in str(jax.make_jaxpr(chunked)(x, dy)) and "scan" not in str(whole_jaxpr)
  _, conv_vjp = jax.vjp(lambda k: jax.lax.conv_general_dilated(
      x, k, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC")), jnp.zeros((3, 3, 5, 7)))
  scale = float(jnp.abs(whole).max())
  np.testing.assert_allclose(chunked(x, dy), whole, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(whole, conv_vjp(dy)[0], rtol=1e-5, atol=2e-5 * scale)
  # 8x4: F(4x4,3x3)'s tiles, 2.25x the input and dy (27,648 bytes over the batch of 8): 3,072 bytes a chunk makes 8
  x8, dy8 = x[:, :, :4], dy[:, :, :4]
  _, conv_vjp = jax.vjp(lambda k: jax.lax.conv_general_dilated(
      x8, k, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC")), jnp.zeros((3, 3, 5, 7)))
  chunked4 = lambda x, dy: layers.winograd_filter_grad(x, dy, max_tile_bytes=3072, tile=4)
  assert "scan" in str(jax.make_jaxpr(chunked4)(x8, dy8))
  got = chunked4(x8, dy8)
  np.testing.assert_allclose(got, conv_vjp(dy8)[0], rtol=1e-5, atol=2e-5 * float(jnp.abs(got).max()))


@pytest.mark.parametrize("impl", ["winograd", "winograd_wgrad"])
@pytest.mark.parametrize("size,stride,kernel_size", [(8, 1, 3), (7, 1, 3), (8, 2, 3), (8, 1, 1)])
def test_winograd_conv_impl_matches_xla_and_falls_back_where_it_does_not_apply(size, stride, kernel_size, impl):
  """conv_impl='winograd' (and 'winograd_wgrad') computes what 'xla' does with the same parameters; odd sizes,
  strides and 1x1 kernels take XLA's conv (Winograd's 2x2 tiles need 3x3, stride 1, even sizes)."""
  x = jax.random.normal(jax.random.key(0), (2, size, size, 4))
  conv = lambda impl: Conv(6, kernel_size, stride=stride, conv_impl=impl)
  params = conv("xla").init(jax.random.key(1), x)
  ref = conv("xla").apply(params, x)
  np.testing.assert_allclose(conv(impl).apply(params, x), ref, rtol=1e-5, atol=1e-5)
  winograd_ran = "name=_conv_winograd" in str(jax.make_jaxpr(conv(impl).apply)(params, x))
  assert winograd_ran == (size % 2 == 0 and stride == 1 and kernel_size == 3)


def test_auto_conv_impl_takes_winograd_on_cpu_only_for_wide_eligible_convs(monkeypatch):
  from diffusion_jax.models import layers
  wide, narrow = (2, 8, 8, 128), (2, 8, 8, 64)
  assert layers.resolve_conv_impl("auto", wide, 3, 1, 128) == "winograd_wgrad"
  assert layers.resolve_conv_impl("auto", narrow, 3, 1, 128) == "xla"  # input too narrow
  assert layers.resolve_conv_impl("auto", wide, 3, 1, 64) == "xla"  # output too narrow
  assert layers.resolve_conv_impl("auto", wide, 3, 2, 128) == "xla"  # strided: no 2x2 tiles
  assert layers.resolve_conv_impl("winograd", narrow, 3, 1, 8) == "winograd"  # explicit: wherever it applies
  assert layers.resolve_conv_impl("winograd_wgrad", narrow, 3, 1, 8) == "winograd_wgrad"
  assert layers.resolve_conv_impl("winograd_wgrad", wide, 3, 2, 128) == "xla"
  with pytest.raises(ValueError, match="unknown conv_impl 'fft'"):
    layers.resolve_conv_impl("fft", wide, 3, 1, 128)
  monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
  assert layers.resolve_conv_impl("auto", wide, 3, 1, 128) == "xla"  # accelerators keep their own convolutions


def test_wide_models_train_step_options_leave_convolutions_to_xla_on_cpu(monkeypatch):
  """step_compiler_options: on CPU under 'auto' a model of >= WINOGRAD_MIN_CHANNELS gets the options that keep
  convolutions out of YNNPACK, and a compiled conv + bias + add (what a residual block's conv is) then has no
  convolution inside a YNNPACK fusion while the default compile has; narrow models, other lowerings, the user's
  own XLA_FLAGS and accelerators get none."""
  import re
  from diffusion_jax.models import layers
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  options = layers.step_compiler_options("auto", 128)
  assert options == layers.WIDE_MODEL_CPU_XLA_OPTIONS
  assert layers.step_compiler_options("auto", 64) == {}
  assert layers.step_compiler_options("xla", 128) == {}

  def convs_in_ynn(compiled_text: str) -> int:
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%([\w.\-]+) .*?\{\n(.*?)\n\}", compiled_text, re.M | re.S)}
    called = [re.search(r"calls=%([\w.\-]+)", line).group(1) for line in compiled_text.splitlines()
              if '"kind":"__ynn_fusion"' in line]
    return sum(" convolution(" in bodies.get(name, "") for name in called)

  x, w = jnp.ones((2, 8, 8, 128)), jnp.ones((3, 3, 128, 128))
  monkeypatch.setattr(layers, "NATIVE_CONV", False)  # XLA's own conv (not diffusion_jax.models.native's)
  lowered = jax.jit(lambda x, w: layers.xla_conv(x, w) + 1.0 + x).lower(x, w)
  assert convs_in_ynn(lowered.compile().as_text()) == 1  # XLA:CPU's default: YNNPACK's
  assert convs_in_ynn(lowered.compile(compiler_options=options).as_text()) == 0
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_ELTWISE")
  user_set = layers.step_compiler_options("auto", 128)  # the user's own setting of an option wins; the rest stay
  assert "xla_cpu_experimental_ynn_fusion_type" not in user_set and user_set["xla_cpu_opt_preset"]
  monkeypatch.delenv("XLA_FLAGS")
  monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
  assert layers.step_compiler_options("auto", 128) == {}


def test_wide_model_options_leave_the_loss_and_gradients_as_they_were(monkeypatch):
  """WIDE_MODEL_CPU_XLA_OPTIONS (Eigen's convolutions, the fast-compile preset) change how XLA:CPU runs a step,
  not what it computes: a wide U-Net's loss and parameter gradients compiled with them equal the default
  compile's to float32 rounding."""
  from diffusion_jax.models import layers
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  options = layers.step_compiler_options("auto", 128)
  assert set(options) == set(layers.WIDE_MODEL_CPU_XLA_OPTIONS)
  # 128 channels on both levels (not 128 / 256): the gradient compiles in 15.7 s instead of 20.8, with the same
  # kinds of conv: Winograd's 3x3 under 'auto' beside XLA's (stride-2 downsampling, 1x1 skips, input and output).
  model = UNet(ch=128, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
  kx, kn, kp = jax.random.split(jax.random.key(0), 3)
  x, noise = jax.random.normal(kx, (2, 8, 8, 3)), jax.random.normal(kn, (2, 8, 8, 3))
  t = jnp.array([3, 700])
  params = model.init(kp, x, t)
  loss = lambda p: jnp.mean((model.apply(p, x, t) - noise) ** 2)
  lowered = jax.jit(jax.value_and_grad(loss)).lower(params)
  l_default, g_default = lowered.compile()(params)
  l_wide, g_wide = lowered.compile(compiler_options=options)(params)
  np.testing.assert_allclose(l_wide, l_default, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), g_wide, g_default)


@pytest.mark.parametrize("size,ch_mult,kw", [
    (16, (1, 2), {}),
    (28, (1, 2, 2), dict(attn_resolutions=(7,))),  # 28 = 4 * 7 divides evenly
    (28, (1, 2, 2, 2), dict(attn_resolutions=(8,), resblock_updown=True, scale_shift_norm=True,
                            num_heads=2)),  # padded to 32
])
def test_unet_shapes_and_options(size, ch_mult, kw):
  cfg = {**SMALL, "ch_mult": ch_mult, **kw}
  model = UNet(**cfg, out_channels=2)
  x = jnp.ones((2, size, size, 1))
  t = jnp.array([0, 999])
  params = model.init(jax.random.key(0), x, t)
  out = model.apply(params, x, t)
  assert out.shape == (2, size, size, 2) and out.dtype == jnp.float32
  # The zero-initialised output conv gives a zero output at init (DDPM); perturb it to see t matter.
  np.testing.assert_array_equal(out, 0.0)
  params = R.perturb(params, 0.01)
  out = model.apply(params, x, t)
  assert float(jnp.abs(out[0] - out[1]).max()) > 0


def test_unet_options_reach_every_block_and_match_the_reference():
  """resblock_updown, scale_shift_norm and num_heads=2 in a whole U-Net: each ResBlock and AttentionBlock call
  equals the float64 reference (tests/layer_refs.py) on its own params and inputs, and the resampling ResBlocks
  halve (encoder) and double (decoder) the resolution where a plain U-Net would use a conv."""
  model = UNet(**{**SMALL, "ch_mult": (1, 2, 2)}, resblock_updown=True, scale_shift_norm=True, num_heads=2)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 1)), jnp.float32)
  t = jnp.array([3, 500])
  params = {"params": R.random_params(model, x, t, scale=0.05)}
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, (ResBlock, AttentionBlock)):
      calls.append((context.module, R.to_numpy(context.module.variables["params"]),
                    [np.asarray(a, np.float64) for a in args], np.asarray(out, np.float64)))
    return out

  with nn.intercept_methods(record):
    model.apply(params, x, t)
  resamples = [(m.resample, a[0].shape[1], out.shape[1]) for m, _, a, out in calls if isinstance(m, ResBlock)]
  assert [r for r in resamples if r[0]] == [("down", 16, 8), ("down", 8, 4), ("up", 4, 8), ("up", 8, 16)]
  assert sum(isinstance(m, AttentionBlock) for m, *_ in calls) == 4  # at 8x8: 1 down, 2 up; 1 in the middle
  for module, p, args, out in calls:
    if isinstance(module, ResBlock):
      assert module.scale_shift_norm and p["Dense_0"]["kernel"].shape[-1] == 2 * module.out_ch
      ref = R.resblock(p, *args[:2], scale_shift_norm=True, resample=module.resample)  # (x, emb[, train])
    else:
      assert p["q"]["kernel"].shape[1] == 2  # two heads
      ref = R.attention_block(p, *args)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=module.name)


def test_unet_bfloat16_compute_and_xla_conv_agree():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  t = jnp.array([3, 500])
  params = R.perturb(jax.jit(UNet(**SMALL).init)(jax.random.key(0), x, t), 0.02, seed=3)
  apply = lambda **kw: jax.jit(UNet(**SMALL, **kw).apply)(params, x, t)  # compiled: op by op is slower
  ref = apply(conv_impl="xla")
  np.testing.assert_allclose(apply(conv_impl="im2col"), ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(apply(conv_impl="winograd"), ref, rtol=1e-4, atol=1e-4)
  low = apply(dtype=jnp.bfloat16)
  assert low.dtype == jnp.float32 and float(jnp.abs(low - ref).mean()) < 0.05 * float(jnp.abs(ref).mean()) + 1e-3


def test_unet_bad_sizes():
  model = UNet(**SMALL)
  with pytest.raises(ValueError, match=r"attn_resolutions \(8,\) include \[8\].*levels are \[28, 14\]"):
    model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match="too small"):
    UNet(ch=32, ch_mult=(1, 2, 2, 2, 2, 2), attn_resolutions=()).init(
        jax.random.key(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,), jnp.int32))


def test_remat_keeps_the_parameters_outputs_and_gradients(context_dim=8):
  """model.remat recomputes blocks in the backward pass: the same parameter tree (checkpoints load either way),
  the same output and the same gradients (a text model: residual blocks and spatial transformers; plain
  attention blocks go through the same wrapper)."""
  kw = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), out_channels=1, head_channels=4,
            context_dim=context_dim)
  plain, remat = UNet(**kw), UNet(**kw, remat=True)
  x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), jnp.asarray([3, 7])
  cond = {"context": jnp.ones((2, 3, 8)), "context_mask": jnp.ones((2, 3), jnp.int32)} if context_dim else {}
  params = plain.init(jax.random.key(1), x, t, **cond)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, jax.eval_shape(remat.init, jax.random.key(1), x,
                                                                                    t, **cond))
  loss = lambda model: lambda p: jnp.sum(model.apply(p, x, t, train=True, **cond) ** 2)
  (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(loss(m)))(params) for m in (plain, remat))  # jit: eager remat is slow
  np.testing.assert_allclose(a, b, rtol=1e-5)
  for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
