"""diffusion_jax.models.layers: ResBlock (FiLM, up/down), attention heads, timestep embedding vs float64 numpy."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layer_refs as R
from diffusion_jax.models.layers import (AttentionBlock, GroupNorm, ResBlock, attend, attention_heads,
                                         timestep_embedding)

IN_CH, EMB = 48, 20  # 48 channels: GroupNorm with gcd(32, 48) = 16 groups of 3 channels


def inputs(size=8):
  x = jax.random.normal(jax.random.key(0), (2, size, size, IN_CH))
  emb = jax.random.normal(jax.random.key(1), (2, EMB))
  return x, emb


def close(got, ref):
  np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("scale_shift_norm", [False, True])
@pytest.mark.parametrize("resample,out_ch", [(None, IN_CH), (None, 64), ("down", IN_CH), ("up", 64)])
def test_resblock_matches_reference(scale_shift_norm, resample, out_ch):
  x, emb = inputs()
  block = ResBlock(out_ch, scale_shift_norm=scale_shift_norm, resample=resample)
  params = R.random_params(block, x, emb, train=False)
  assert params["Dense_0"]["kernel"].shape == (EMB, 2 * out_ch if scale_shift_norm else out_ch)
  assert ("skip" in params) == (out_ch != IN_CH)
  got = block.apply({"params": params}, x, emb, train=False)
  size = {"up": 16, "down": 4, None: 8}[resample]
  assert got.shape == (2, size, size, out_ch)
  close(got, R.resblock(R.to_numpy(params), np.asarray(x, np.float64), np.asarray(emb, np.float64),
                        scale_shift_norm=scale_shift_norm, resample=resample))


def test_scale_shift_norm_is_film_not_an_added_embedding():
  """The same params read by the other rule give a different output: the test above tells the two apart."""
  x, emb = inputs()
  params = R.random_params(ResBlock(IN_CH, scale_shift_norm=True), x, emb, train=False)
  got = np.asarray(ResBlock(IN_CH, scale_shift_norm=True).apply({"params": params}, x, emb, train=False))
  p, x64, e64 = R.to_numpy(params), np.asarray(x, np.float64), np.asarray(emb, np.float64)
  # The additive rule on the first half of the FiLM projection (out_ch columns) is another function.
  p["Dense_0"] = {"kernel": p["Dense_0"]["kernel"][:, :IN_CH], "bias": p["Dense_0"]["bias"][:IN_CH]}
  assert np.abs(got - R.resblock(p, x64, e64, scale_shift_norm=False)).max() > 0.1


@pytest.mark.parametrize("resample,resize", [("down", R.avg_pool2), ("up", R.nearest_up2)])
def test_resample_resblock_with_zeroed_residual_is_the_resampled_input(resample, resize):
  x, emb = inputs()
  block = ResBlock(IN_CH, scale_shift_norm=True, resample=resample)
  params = R.random_params(block, x, emb, train=False)
  params["Conv_1"] = jax.tree.map(jnp.zeros_like, params["Conv_1"])  # the residual branch's last conv
  got = np.asarray(block.apply({"params": params}, x, emb, train=False))
  np.testing.assert_allclose(got, resize(np.asarray(x)), rtol=0, atol=1e-6)
  if resample == "down":  # the 2x2 mean, written out
    np.testing.assert_allclose(got[:, 1, 2], np.asarray(x[:, 2:4, 4:6]).mean(axis=(1, 2)), atol=1e-6)
  else:  # nearest: each input pixel fills a 2x2 block
    np.testing.assert_array_equal(got[:, 6:8, 2:4], np.broadcast_to(np.asarray(x)[:, 3:4, 1:2], (2, 2, 2, IN_CH)))


@pytest.mark.parametrize("num_heads,head_channels,heads", [(1, -1, 1), (2, -1, 2), (1, 16, 3)])
def test_attention_block_matches_multi_head_reference(num_heads, head_channels, heads):
  x, _ = inputs()
  block = AttentionBlock(num_heads=num_heads, head_channels=head_channels)
  params = R.random_params(block, x, scale=0.3)
  assert params["q"]["kernel"].shape == (IN_CH, heads, IN_CH // heads)
  close(block.apply({"params": params}, x), R.attention_block(R.to_numpy(params), np.asarray(x, np.float64)))


def test_two_heads_are_not_one_head_of_the_same_weights():
  """Splitting the same Q, K, V projections into 2 heads changes the output: the head count is really used."""
  x, _ = inputs()
  params = R.random_params(AttentionBlock(num_heads=2), x, scale=0.3)
  got = np.asarray(AttentionBlock(num_heads=2).apply({"params": params}, x))
  one = R.to_numpy(params)
  for n in "qkv":
    one[n] = {"kernel": one[n]["kernel"].reshape(IN_CH, 1, IN_CH), "bias": one[n]["bias"].reshape(1, IN_CH)}
  one["proj_out"] = {**one["proj_out"], "kernel": one["proj_out"]["kernel"].reshape(1, IN_CH, IN_CH)}
  assert np.abs(got - R.attention_block(one, np.asarray(x, np.float64))).max() > 1e-2
  with pytest.raises(ValueError, match=r"attention over 48 channels cannot split into 5 heads"):
    attention_heads(48, 5, -1)


def test_timestep_embedding_matches_ddpm_formula():
  t = np.array([0, 1, 17, 999])
  dim = 32
  # DDPM get_timestep_embedding: [sin(t w_i), cos(t w_i)], w_i = 10000^(-i / (dim/2 - 1)).
  w = np.exp(-math.log(10000) * np.arange(dim // 2) / (dim // 2 - 1))
  ref = np.concatenate([np.sin(t[:, None] * w), np.cos(t[:, None] * w)], axis=1)
  np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), dim), ref, atol=2e-4)
  odd = np.asarray(timestep_embedding(jnp.asarray(t), dim + 1))
  np.testing.assert_allclose(odd[:, :dim], ref, atol=2e-4)
  assert np.all(odd[:, dim] == 0)


@pytest.mark.parametrize("native_kernel", [True, False])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape, groups, dtype", [((2, 8, 8, 64), 32, jnp.float32), ((2, 5, 7, 48), 16, jnp.float32),
                                                  ((3, 10, 32), 32, jnp.float32), ((2, 4, 4, 64), 32, jnp.bfloat16)])
def test_group_norm_is_flaxs_group_norm(monkeypatch, shape, groups, dtype, silu, native_kernel):
  """layers.GroupNorm (per-channel sums first, its backward written out, SiLU optionally in the same pass) gives
  nn.GroupNorm's (then nn.silu's) parameters, output and gradients, also for a mean far from 0 (the E[x^2] - E[x]^2
  variance) and on [B,L,C] tokens; in float32 through the native kernels where the host runs them
  (layers.NATIVE_GROUP_NORM) and through XLA."""
  from diffusion_jax.models import layers, native
  monkeypatch.setattr(layers, "NATIVE_GROUP_NORM", native_kernel)
  if native_kernel and not (dtype == jnp.float32 and native.takes_group_norm(jnp.zeros(shape), groups)):
    pytest.skip("the native GroupNorm does not run here (float32 on AVX-512 CPUs only)")
  x = jax.random.normal(jax.random.key(0), shape) * 3 + 2
  ref = nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32)
  ours = GroupNorm(num_groups=groups, epsilon=1e-6, silu=silu, dtype=dtype)
  params = ref.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
  apply_ref = lambda p, x: nn.silu(ref.apply(p, x)) if silu else ref.apply(p, x)
  out, want = ours.apply(params, x), apply_ref(params, x)
  assert out.dtype == want.dtype == dtype
  tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
  cotangent = jax.random.normal(jax.random.key(3), shape)
  grads = [jax.jit(jax.grad(lambda p, x, f=f: jnp.vdot(f(p, x).astype(jnp.float32), cotangent), argnums=(0, 1)))(
      params, x) for f in (ours.apply, apply_ref)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * 10)
  hlo = jax.jit(jax.grad(lambda p, x: jnp.sum(ours.apply(p, x).astype(jnp.float32)), (0, 1))).lower(
      params, x).compile().as_text()
  assert (f'"{native.GROUP_NORM_TARGET}"' in hlo and f'"{native.GROUP_NORM_GRAD_TARGET}"' in hlo) == native_kernel
  with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
    GroupNorm(num_groups=32).init(jax.random.key(0), jnp.zeros((1, 4, 4, 48)))


def test_attend_gives_cudnn_the_valid_key_counts_of_the_mask(monkeypatch):
  """attention_impl='cudnn' passes cuDNN the number of valid keys per example instead of the boolean mask, and
  even sequence lengths (odd ones padded; cuDNN refused a 77-token context on an H200); on this CPU the call is
  routed to XLA with those same arguments, and must equal the masked attention."""
  real, seen = jax.nn.dot_product_attention, []

  def routed(*args, implementation=None, **kwargs):
    seen.append((implementation, sorted(k for k, v in kwargs.items() if v is not None), [a.shape[1] for a in args]))
    return real(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", routed)
  q, k, v = (jax.random.normal(jax.random.key(i), shape) for i, shape in
             enumerate([(2, 5, 2, 8), (2, 5, 2, 8), (2, 5, 2, 8)]))
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # the valid tokens first, then padding (text encoders)
  np.testing.assert_allclose(attend(q, k, v, mask, "cudnn"), attend(q, k, v, mask, "xla"), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(attend(q, k, v, None, "cudnn"), attend(q, k, v, None, "xla"), rtol=1e-5, atol=1e-6)
  assert [s[0] for s in seen] == ["cudnn", "xla", "cudnn", "xla"]
  assert seen[0][1] == ["key_value_seq_lengths"] and seen[1][1] == ["mask"]
  assert seen[0][2] == [6, 6, 6] and seen[1][2] == [5, 5, 5]  # cuDNN gets even lengths: 5 queries and keys padded
  unmasked = attend(q, k, v, None, "xla")
  assert not np.allclose(attend(q, k, v, mask, "xla")[0], unmasked[0])  # the mask matters for example 0
  seen.clear()
  np.testing.assert_allclose(attend(q[:, :4], k[:, :4], v[:, :4], None, "cudnn"),
                             attend(q[:, :4], k[:, :4], v[:, :4], None, "xla"), rtol=1e-5, atol=1e-6)
  assert seen[0][1] == [] and seen[0][2] == [4, 4, 4]  # even and unmasked: cuDNN's plain call, nothing padded
  with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
    attend(q, k, v, None, "flash")


@pytest.mark.parametrize("x_shape,kernel_shape,contract", [
    ((2, 4, 4, 6), (6, 5), 1),  # a 1x1 conv on [B,H,W,C]
    ((2, 7, 5), (5, 3, 4), 1),  # an attention projection to [heads, D]
    ((2, 7, 3, 4), (3, 4, 6), 2),  # the out projection from [heads, D]
])
def test_tensordot_x_first_has_tensordots_value_and_gradients(x_shape, kernel_shape, contract):
  """The x-first kernel gradient is only a different order of the same sums: value and both gradients equal
  jnp.tensordot's under autodiff (float64), and flax's Dense given dot_general_x_first is nn.Dense's."""
  from diffusion_jax.models.layers import dot_general_x_first, tensordot_x_first
  with jax.enable_x64():
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape, jnp.float64)
    kernel = jax.random.normal(kw, kernel_shape, jnp.float64)
    weights = jax.random.normal(kc, x_shape[:-contract] + kernel_shape[contract:], jnp.float64)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k, contract)) * weights)
    ours = jax.value_and_grad(loss(tensordot_x_first), (0, 1))(x, kernel)
    ref = jax.value_and_grad(loss(jnp.tensordot), (0, 1))(x, kernel)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-12)
    for a, b in zip(ours[1], ref[1]):
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    if contract == 1:
      dense = nn.Dense(kernel_shape[-1], dot_general=dot_general_x_first)
      plain = nn.Dense(kernel_shape[-1])
      params = plain.init(jax.random.key(1), x)
      assert "name=tensordot_x_first" in str(jax.make_jaxpr(dense.apply)(params, x))  # flax calls it in this form
      g_ours = jax.grad(lambda p: jnp.sum(jnp.sin(dense.apply(p, x))))(params)
      g_ref = jax.grad(lambda p: jnp.sum(jnp.sin(plain.apply(p, x))))(params)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), g_ours, g_ref)


@pytest.mark.parametrize("x_shape,kernel_size,features,stride", [
    ((2, 8, 9, 3), 3, 5, 1),
    ((2, 7, 7, 4), 3, 6, 2),  # an odd size downsampled: the last row and column are read by no window's centre
    ((3, 8, 6, 4), 3, 2, 2),
    ((2, 9, 10, 3), 5, 3, 1),
])
def test_xla_convs_written_out_gradients_are_autodiffs(x_shape, kernel_size, features, stride):
  """layers.xla_conv's gradients (two NHWC/HWIO convs over explicitly transposed operands) equal autodiff's of
  lax.conv_general_dilated in float64: value, input gradient and kernel gradient."""
  from diffusion_jax.models.layers import xla_conv
  with jax.enable_x64():
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape, jnp.float64)
    kernel = jax.random.normal(kw, (kernel_size, kernel_size, x_shape[-1], features), jnp.float64)
    pad = kernel_size // 2
    autodiff = lambda x, k: jax.lax.conv_general_dilated(x, k, (stride, stride), [(pad, pad)] * 2,
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    weights = jax.random.normal(kc, autodiff(x, kernel).shape, jnp.float64)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)) * weights)
    ours = jax.value_and_grad(loss(lambda x, k: xla_conv(x, k, stride)), (0, 1))(x, kernel)
    ref = jax.value_and_grad(loss(autodiff), (0, 1))(x, kernel)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-12)
    for a, b in zip(ours[1], ref[1]):
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's convolution forms")
def test_conv_gradients_inside_a_scan_stay_in_the_form_xla_cpu_runs_fast():
  """Inside a lax.scan (gradient accumulation) XLA:CPU does not canonicalize convolutions, and autodiff's filter
  gradient there (dim_labels f01b_i01o->01bf) ran 30-70x slower than outside (jax-ml/jax#12868): every
  convolution of a conv's gradient over micro-batches, stride 1 and 2, is in the forward's b01f_01io->b01f form."""
  from diffusion_jax.models.layers import xla_conv
  x, kernel = jnp.ones((4, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
  for stride in (1, 2):
    def accumulated(kernel, x):
      grad = jax.grad(lambda k, x: jnp.sum(xla_conv(x, k, stride) ** 2), (0, 1))
      def body(total, micro):
        dk, dx = grad(kernel, micro)
        return total + dk, jnp.sum(dx)
      return jax.lax.scan(body, jnp.zeros_like(kernel), x.reshape(2, 2, *x.shape[1:]))
    hlo = jax.jit(accumulated).lower(kernel, x).compile().as_text()
    labels = re.findall(r"convolution\(.*?dim_labels=(\S+?),", hlo)
    assert len(labels) >= 3, hlo  # the forward, the input gradient and the kernel gradient, inside the loop
    assert set(labels) == {"b01f_01io->b01f"}, labels


@pytest.mark.parametrize("x_shape,features", [((2, 8, 8, 3), 5), ((3, 7, 5, 4), 6), ((1, 1, 1, 2), 3)])
def test_subpixel_upsample_conv_is_the_conv_of_the_upsampled_input(x_shape, features):
  """layers.upsample_conv (one 2x2 conv of x with the 3x3 kernel's four phases, interleaved) equals XLA's 3x3 conv
  of the 2x nearest-upsampled x in float64: value, input gradient and kernel gradient, odd and 1x1 sizes too."""
  from diffusion_jax.models.layers import subpixel_kernel, upsample_conv
  with jax.enable_x64():
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape, jnp.float64)
    kernel = jax.random.normal(kw, (3, 3, x_shape[-1], features), jnp.float64)
    upsampled = lambda x, k: jax.lax.conv_general_dilated(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2), k, (1, 1),
                                                          [(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    weights = jax.random.normal(kc, upsampled(x, kernel).shape, jnp.float64)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)) * weights)
    ours = jax.value_and_grad(loss(lambda x, k: upsample_conv(x, subpixel_kernel(k))), (0, 1))(x, kernel)
    ref = jax.value_and_grad(loss(upsampled), (0, 1))(x, kernel)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-12)
    for a, b in zip(ours[1], ref[1]):
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("subpixel", [True, False])
def test_an_upsampling_conv_has_a_plain_convs_parameters_and_output(monkeypatch, subpixel):
  """Conv(upsample=True)(x) is Conv()(upsample_nearest(x)) with the same parameter tree (checkpoints of either
  load into the other), through the sub-pixel form on CPU or the upsampled input."""
  from diffusion_jax.models import layers
  monkeypatch.setattr(layers, "SUBPIXEL_UPSAMPLE", subpixel)
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8))
  fused, plain = layers.Conv(12, 3, upsample=True, conv_impl="xla"), layers.Conv(12, 3, conv_impl="xla")
  params = fused.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)  # a bias too
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, plain.init(jax.random.key(1),
                                                                                 layers.upsample_nearest(x)))
  jaxpr = str(jax.make_jaxpr(fused.apply)(params, x))
  assert ("f32[2,2,8,48]" in jaxpr) == (subpixel and jax.default_backend() == "cpu")  # the 2x2 sub-pixel kernel
  np.testing.assert_allclose(fused.apply(params, x), plain.apply(params, layers.upsample_nearest(x)),
                             rtol=1e-5, atol=1e-5)


def test_group_norms_per_channel_expansion_as_a_dot_is_the_repeat(monkeypatch):
  """On CPU the [B,G] -> [B,C] expansion of GroupNorm's statistics (and its backward's coefficients) is a dot with
  the group-membership matrix (layers.GROUP_MEMBERSHIP_DOT; why in layers._per_channel); output and gradients are
  jnp.repeat's, at 3 channels per group."""
  from diffusion_jax.models import layers
  monkeypatch.setattr(layers, "NATIVE_GROUP_NORM", False)  # the XLA formulation, where the expansion lives
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 48)) * 3 + 2
  norm = GroupNorm(num_groups=16, silu=True)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), norm.init(jax.random.key(1), x))
  cotangent = jax.random.normal(jax.random.key(3), x.shape)
  loss = lambda p, x: jnp.vdot(norm.apply(p, x), cotangent)
  results = {}
  for dot in (True, False):
    monkeypatch.setattr(layers, "GROUP_MEMBERSHIP_DOT", dot)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x))
    assert ("f32[16,48]" in jaxpr) == (dot and jax.default_backend() == "cpu")  # the membership matrix
    results[dot] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_interleave_parities_written_out_backward_is_autodiffs():
  """layers.interleave_parities' backward (each parity plane padded by its offset) equals autodiff's of its forward,
  at odd sizes; the forward puts y4[:, i+a, j+c, a, c] at output pixel (2i+a, 2j+c)."""
  from diffusion_jax.models import layers
  y4 = jax.random.normal(jax.random.key(0), (2, 4, 6, 2, 2, 3))
  out = layers.interleave_parities(y4)
  assert out.shape == (2, 6, 10, 3)
  np.testing.assert_array_equal(out[:, 2 * 1 + 1, 2 * 4 + 0], y4[:, 2, 4, 1, 0])
  cotangent = jax.random.normal(jax.random.key(1), out.shape)
  ours = jax.vjp(layers.interleave_parities, y4)[1](cotangent)
  autodiff = jax.vjp(layers.interleave_parities.fun, y4)[1](cotangent)
  np.testing.assert_array_equal(ours[0], autodiff[0])


def _round_to_bfloat16(tree):
  return jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), tree)


def _kernels_rounded_to_bfloat16(params):
  """The conv's kernel rounded, its bias (added in float32 either way) as it is."""
  return jax.tree_util.tree_map_with_path(
      lambda path, a: _round_to_bfloat16(a) if "kernel" in jax.tree_util.keystr(path) else a, params)


@pytest.mark.parametrize("kernels", ["amx", "avx512_bf16", None])
@pytest.mark.parametrize("kernel_size,stride,features", [(3, 1, 32), (3, 2, 16), (1, 1, 32)])
def test_conv_precision_bfloat16_rounds_the_operands_and_sums_in_float32(monkeypatch, request, kernels, kernel_size,
                                                                        stride, features):
  """conv_precision='bfloat16' is the float32 conv of the operands rounded to bfloat16 (each product exact, summed
  in float32): the same value and gradients as conv_precision='float32' on x, the kernel and dy rounded first, to
  float32's rounding; the result float32. With AMX or AVX512-BF16 through the native bfloat16 kernels, without
  either (kernels=None) through XLA's bfloat16 convs with float32 results."""
  from diffusion_jax.models import layers, native
  if kernels and not (native.amx_available() if kernels == "amx" else native.avx512_bf16_available()):
    pytest.skip(f"this CPU cannot run the {kernels} kernels")
  if kernels:
    native.use_amx(kernels == "amx")
    request.addfinalizer(lambda: native.use_amx(True))
  else:
    monkeypatch.setattr(native, "bf16_available", lambda: False)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
  bf16, f32 = (layers.Conv(features, kernel_size, stride=stride, conv_impl="auto", conv_precision=p)
               for p in ("bfloat16", "float32"))
  params = bf16.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  weights = _round_to_bfloat16(jax.random.normal(jax.random.key(3), bf16.apply(params, x).shape))  # dy: exact
  loss = lambda conv: jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(conv.apply(p, x) * weights), (0, 1)))
  (value, grads), (ref_value, ref_grads) = loss(bf16)(params, x), loss(f32)(_kernels_rounded_to_bfloat16(params),
                                                                            _round_to_bfloat16(x))
  y = jax.jit(bf16.apply)(params, x)
  assert y.dtype == jnp.float32
  ref_y = f32.apply(_kernels_rounded_to_bfloat16(params), _round_to_bfloat16(x))
  np.testing.assert_allclose(y, ref_y, rtol=0, atol=2e-6 * float(jnp.abs(ref_y).max()))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * float(jnp.abs(b).max()))
  hlo = jax.jit(jax.grad(lambda p, x: jnp.sum(bf16.apply(p, x)), (0, 1))).lower(params, x).compile().as_text()
  native_taken = kernels is not None and kernel_size == 3 and stride == 1 and jax.default_backend() == "cpu"
  assert (native.CONV_BF16_TARGET in hlo) == native_taken and (native.FILTER_GRAD_BF16_TARGET in hlo) == native_taken
  # and the plain float32 conv differs from it by bfloat16's rounding, not more
  np.testing.assert_allclose(y, f32.apply(params, x), rtol=0, atol=2e-2 * float(jnp.abs(ref_y).max()))


def test_an_unknown_conv_precision_is_refused_with_the_choices():
  from diffusion_jax.models import layers
  with pytest.raises(ValueError, match=r"unknown conv_precision 'float16'; choose one of \('float32', 'bfloat16'\)"):
    layers.Conv(8, conv_precision="float16").init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))


def test_matmul_precision_bfloat16_rounds_a_dense_layers_operands_and_sums_in_float32():
  """A Dense layer under matmul_precision='bfloat16' is the float32 one on its input, kernel and dy rounded to
  bfloat16 (each product exact, summed in float32), value and both gradients, to float32's rounding."""
  import flax.linen as nn
  from diffusion_jax.models import layers
  x = jax.random.normal(jax.random.key(0), (3, 5, 48))
  bf16, f32 = (nn.Dense(40, dot_general=layers.dense_dot_general(p)) for p in ("bfloat16", "float32"))
  params = bf16.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  weights = _round_to_bfloat16(jax.random.normal(jax.random.key(3), (3, 5, 40)))
  loss = lambda dense: jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(dense.apply(p, x) * weights), (0, 1)))
  (value, grads), (ref_value, ref_grads) = loss(bf16)(params, x), loss(f32)(_kernels_rounded_to_bfloat16(params),
                                                                            _round_to_bfloat16(x))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * float(jnp.abs(b).max()))
  unrounded = jax.value_and_grad(lambda p, x: jnp.sum(f32.apply(p, x) * weights))(params, x)[0]
  assert value != unrounded  # the rounding happened


@pytest.mark.parametrize("context_dim", [0, 12])
def test_matmul_precision_bfloat16_takes_the_unets_dense_layers_only(context_dim):
  """model.matmul_precision='bfloat16': the same parameters (checkpoints load either way), outputs within
  bfloat16's rounding of float32's, every Dense layer's product a bfloat16 dot and attention's own (QK^T, PV)
  still float32."""
  from diffusion_jax.models import UNet
  kw = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), context_dim=context_dim)
  bf16, f32 = (UNet(**kw, matmul_precision=p) for p in ("bfloat16", "float32"))
  x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), jnp.array([3, 700])
  context = jax.random.normal(jax.random.key(1), (2, 5, 12)) if context_dim else None
  params = f32.init(jax.random.key(2), x, t, context=context)
  assert jax.tree.structure(bf16.init(jax.random.key(2), x, t, context=context)) == jax.tree.structure(params)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params)
  y, ref = bf16.apply(params, x, t, context=context), f32.apply(params, x, t, context=context)
  assert y.dtype == jnp.float32
  assert 0 < float(jnp.abs(y - ref).max()) < 3e-2 * float(jnp.abs(ref).max())
  hlo = jax.jit(lambda p: bf16.apply(p, x, t, context=context)).lower(params).as_text()
  dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
  bf16_dots = [line for line in dots if "bf16" in line.split("->")[0].split(":")[-1]]
  dense_layers = [path for path, a in jax.tree_util.tree_leaves_with_path(params)
                  if "kernel" in jax.tree_util.keystr(path) and a.ndim < 4]  # the convs' kernels are [k,k,Cin,Cout]
  assert len(bf16_dots) == len(dense_layers) > 8  # every Dense, nothing else
  assert len(dots) - len(bf16_dots) >= 2  # attention's QK^T and PV in float32


def test_an_unknown_matmul_precision_is_refused_with_the_choices():
  from diffusion_jax.models import UNet
  with pytest.raises(ValueError, match=r"unknown matmul_precision 'float16'; choose one of \('float32', 'bfloat16'\)"):
    UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), matmul_precision="float16").init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,), jnp.int32))
