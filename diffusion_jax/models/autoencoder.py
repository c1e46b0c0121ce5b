"""The LDM KL autoencoder (Rombach et al. 2022, sec. 3 and appendix G): images <-> latents z."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import AttentionBlock, Conv, ResBlock, downsample, group_norm


class DiagonalGaussian(NamedTuple):
  """The encoder's posterior q(z|x) = N(mean, exp(logvar)) [B,h,w,z] (LDM's DiagonalGaussianDistribution)."""

  mean: jax.Array
  logvar: jax.Array

  def sample(self, key: jax.Array) -> jax.Array:
    """Reparameterised draw z = mean + std * eps (Kingma & Welling 2014, eq. 10)."""
    return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def kl(self) -> jax.Array:
    """KL(q(z|x) || N(0, I)) summed over latent dims [B] (Kingma & Welling 2014, appendix B)."""
    return 0.5 * jnp.sum(self.mean ** 2 + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3))


def posterior_from_moments(moments: jax.Array) -> DiagonalGaussian:
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))  # LDM clips the log-variance to [-30, 20]


class _Coder(nn.Module):
  """The layout both halves share (LDM's ddconfig)."""

  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  mid_attention: bool = True
  conv_impl: str = "auto"
  dtype: Any = jnp.float32
  conv_precision: str = "float32"  # or "bfloat16": the convs' operands (layers.CONV_PRECISIONS)
  matmul_precision: str = "float32"  # or "bfloat16": the attention projections' (layers.MATMUL_PRECISIONS)


class Encoder(_Coder):
  """x [B,H,W,C] -> moments [B,H/f,W/f,2*z_channels], f = 2^(len(ch_mult)-1)."""

  z_channels: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    kw = dict(conv_impl=self.conv_impl, dtype=self.dtype, conv_precision=self.conv_precision)
    h = Conv(self.ch, 3, **kw)(x.astype(self.dtype))
    resolution = x.shape[1]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = ResBlock(self.ch * mult, **kw)(h, None, train=train)
        if resolution in self.attn_resolutions:
          h = AttentionBlock(dtype=self.dtype, matmul_precision=self.matmul_precision)(h)
      if level != len(self.ch_mult) - 1:
        h = downsample(h, with_conv=True, **kw)
        resolution //= 2
    h = ResBlock(h.shape[-1], **kw)(h, None, train=train)
    if self.mid_attention:
      h = AttentionBlock(dtype=self.dtype, matmul_precision=self.matmul_precision)(h)
    h = ResBlock(h.shape[-1], **kw)(h, None, train=train)
    h = group_norm(h.shape[-1], self.dtype, silu=True)(h)
    h = Conv(2 * self.z_channels, 3, **kw)(h)
    return Conv(2 * self.z_channels, 1, **kw, name="quant_conv")(h).astype(jnp.float32)


class Decoder(_Coder):
  """z [B,h,w,z_channels] -> x [B,h*f,w*f,out_channels]."""

  out_channels: int = 3

  @nn.compact
  def __call__(self, z: jax.Array, *, train: bool = False) -> jax.Array:
    kw = dict(conv_impl=self.conv_impl, dtype=self.dtype, conv_precision=self.conv_precision)
    z = Conv(z.shape[-1], 1, **kw, name="post_quant_conv")(z.astype(self.dtype))
    h = Conv(self.ch * self.ch_mult[-1], 3, **kw)(z)
    h = ResBlock(h.shape[-1], **kw)(h, None, train=train)
    if self.mid_attention:
      h = AttentionBlock(dtype=self.dtype, matmul_precision=self.matmul_precision)(h)
    h = ResBlock(h.shape[-1], **kw)(h, None, train=train)
    resolution = z.shape[1]
    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = ResBlock(self.ch * mult, **kw)(h, None, train=train)
        if resolution in self.attn_resolutions:
          h = AttentionBlock(dtype=self.dtype, matmul_precision=self.matmul_precision)(h)
      if level != 0:
        h = Conv(h.shape[-1], 3, upsample=True, **kw)(h)
        resolution *= 2
    h = group_norm(h.shape[-1], self.dtype, silu=True)(h)
    return Conv(self.out_channels, 3, **kw)(h).astype(jnp.float32)


class AutoencoderKL(nn.Module):
  """Encoder + diagonal Gaussian posterior + decoder; `encode`, `decode` and `__call__` (reconstruct)."""

  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  attn_resolutions: Sequence[int] = ()
  z_channels: int = 4
  out_channels: int = 1
  mid_attention: bool = True
  conv_impl: str = "auto"
  dtype: Any = jnp.float32
  conv_precision: str = "float32"  # or "bfloat16": the convs' operands (layers.CONV_PRECISIONS)
  matmul_precision: str = "float32"  # or "bfloat16": the attention projections' (layers.MATMUL_PRECISIONS)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
    """(h, w, z_channels) for an image (H, W, C); ValueError when f does not divide H and W."""
    f = self.downsample_factor
    h, w = image_shape[0], image_shape[1]
    if h % f or w % f:
      raise ValueError(f"the autoencoder's downsampling factor f={f} (ch_mult={tuple(self.ch_mult)}) does not "
                       f"divide the image size {h}x{w}")
    return h // f, w // f, self.z_channels

  def setup(self):
    common = dict(ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                  attn_resolutions=self.attn_resolutions, mid_attention=self.mid_attention,
                  conv_impl=self.conv_impl, dtype=self.dtype, conv_precision=self.conv_precision,
                  matmul_precision=self.matmul_precision)
    self.encoder = Encoder(z_channels=self.z_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)

  def encode(self, x: jax.Array, *, train: bool = False) -> DiagonalGaussian:
    self.latent_shape(x.shape[1:])
    return posterior_from_moments(self.encoder(x, train=train))

  def decode(self, z: jax.Array, *, train: bool = False) -> jax.Array:
    return self.decoder(z, train=train)

  def __call__(self, x: jax.Array, key: jax.Array, *, train: bool = False):
    """(reconstruction [B,H,W,C], posterior) with z drawn from the posterior."""
    posterior = self.encode(x, train=train)
    return self.decode(posterior.sample(key), train=train), posterior


def autoencoder_loss(reconstruction: jax.Array, x: jax.Array, posterior: DiagonalGaussian, *,
                     kl_weight: float = 1e-6, rec_loss: str = "l1") -> dict[str, jax.Array]:
  """LDM's stage-1 objective without the perceptual / adversarial terms: sum-over-pixels reconstruction
  (L1 or L2) + kl_weight * KL, each averaged over the batch (LDM's LPIPSWithDiscriminator, logvar=0)."""
  if rec_loss not in ("l1", "l2"):
    raise ValueError(f"unknown rec_loss {rec_loss!r}; choose one of ('l1', 'l2')")
  err = jnp.abs(x - reconstruction) if rec_loss == "l1" else (x - reconstruction) ** 2
  rec = jnp.mean(jnp.sum(err, axis=(1, 2, 3)))
  kl = jnp.mean(posterior.kl())
  return {"loss": rec + kl_weight * kl, "rec": rec, "kl": kl,
          "mse": jnp.mean((x - reconstruction) ** 2)}
