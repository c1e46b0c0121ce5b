"""U-Net shapes, parameter count and the im2col conv against lax.conv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import UNet
from diffusion_jax.models.layers import conv_im2col

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
  params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.key(2), p.shape), params)
  out = model.apply(params, x, t)
  assert float(jnp.abs(out[0] - out[1]).max()) > 0


def test_unet_bfloat16_compute_and_xla_conv_agree():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  t = jnp.array([3, 500])
  params = UNet(**SMALL).init(jax.random.key(0), x, t)
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(3), p.shape), params)
  ref = UNet(**SMALL, conv_impl="xla").apply(params, x, t)
  np.testing.assert_allclose(UNet(**SMALL, conv_impl="im2col").apply(params, x, t), ref, rtol=1e-4, atol=1e-4)
  low = UNet(**SMALL, dtype=jnp.bfloat16).apply(params, x, t)
  assert low.dtype == jnp.float32 and float(jnp.abs(low - ref).mean()) < 0.05 * float(jnp.abs(ref).mean()) + 1e-3


def test_unet_bad_sizes():
  model = UNet(**SMALL)
  with pytest.raises(ValueError, match=r"attn_resolutions \(8,\) include \[8\].*levels are \[28, 14\]"):
    model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match="too small"):
    UNet(ch=32, ch_mult=(1, 2, 2, 2, 2, 2), attn_resolutions=()).init(
        jax.random.key(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,), jnp.int32))
