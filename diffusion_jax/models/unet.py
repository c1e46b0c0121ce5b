"""The DDPM U-Net (Ho et al. 2020, appendix B) with the IDDPM/ADM options, in Flax linen."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import (AttentionBlock, Conv, ResBlock, SpatialTransformer, dense_dot_general,
                                         downsample, group_norm, masked_mean, timestep_embedding)


class UNet(nn.Module):
  """eps/x0/v network [B,H,W,C] x t [B] -> [B,H,W,out_channels]; odd sizes are padded then cropped.

  Conditioning: class labels y [B] (num_classes > 0), a text context [B,L,context_dim] read by cross-attention
  at the attention resolutions (context_dim > 0), and concat [B,H,W,concat_channels] spatially aligned inputs.
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  num_heads: int = 1
  head_channels: int = -1
  out_channels: int | None = None
  resblock_updown: bool = False
  scale_shift_norm: bool = False
  conv_impl: str = "auto"
  conv_precision: str = "float32"  # or "bfloat16": the convs' operands (layers.CONV_PRECISIONS)
  matmul_precision: str = "float32"  # or "bfloat16": the Dense layers' operands (layers.MATMUL_PRECISIONS)
  attention_impl: str = "xla"  # or "cudnn": cuDNN's fused flash attention (NVIDIA GPUs, bfloat16 dtype)
  num_classes: int = 0  # > 0: class-conditional, label `num_classes` is the null class (for guidance)
  context_dim: int = 0  # > 0: spatial transformers with cross-attention to a [B,L,context_dim] context
  pooled_context: bool = True  # also add the mean text token to the timestep embedding (Imagen)
  concat_channels: int = 0  # > 0: extra input channels (masked image, low-resolution image)
  remat: bool = False  # rematerialise each residual and attention block in the backward pass (less memory)
  dtype: Any = jnp.float32

  def padded_size(self, size: int) -> int:
    multiple = 2 ** (len(self.ch_mult) - 1)
    return -(-size // multiple) * multiple

  def check_input(self, height: int, width: int) -> None:
    """ValueError before any compile when the levels or attention resolutions cannot fit the image.
    Attention resolutions count the (padded) height's side at each level; any width works (outpainting)."""
    h = self.padded_size(height)
    levels = len(self.ch_mult)
    if min(height, width) < 2 ** (levels - 1):
      raise ValueError(f"image size {height}x{width} is too small for {levels} levels (ch_mult={tuple(self.ch_mult)}); "
                       f"need at least {2 ** (levels - 1)}")
    resolutions = [h // 2 ** i for i in range(levels)]
    missing = [r for r in self.attn_resolutions if r not in resolutions]
    if missing:
      raise ValueError(f"attn_resolutions {tuple(self.attn_resolutions)} include {missing}, which no level of a "
                       f"{height}x{width} input has (padded to {h} rows); the levels are {resolutions}")

  def for_size(self, trained_height: int, height: int) -> "UNet":
    """This network (same parameters) for inputs of another height: each attention layer stays at its level
    (attn_resolutions name sizes, so they are moved to the new height's sizes at the same levels)."""
    old = [self.padded_size(trained_height) // 2 ** i for i in range(len(self.ch_mult))]
    new = [self.padded_size(height) // 2 ** i for i in range(len(self.ch_mult))]
    return self.clone(attn_resolutions=tuple(new[old.index(r)] for r in self.attn_resolutions if r in old))

  def check_conditions(self, x: jax.Array, y: jax.Array | None, context: jax.Array | None,
                       concat: jax.Array | None) -> None:
    """ValueError unless exactly the conditions this model was built for are given, with matching shapes."""
    b, height, width, _ = x.shape
    if (y is None) != (self.num_classes == 0):
      raise ValueError(f"class labels y must be given exactly when num_classes > 0 (num_classes={self.num_classes}, "
                       f"y={'None' if y is None else 'given'})")
    if (context is None) != (self.context_dim == 0) or context is not None and (
        context.ndim != 3 or context.shape[-1] != self.context_dim):
      raise ValueError(f"a context [B,L,{self.context_dim}] must be given exactly when context_dim > 0 "
                       f"(context_dim={self.context_dim}, context={'None' if context is None else context.shape})")
    if (concat is None) != (self.concat_channels == 0) or concat is not None and (
        concat.shape != (b, height, width, self.concat_channels)):
      raise ValueError(f"concat [B,H,W,{self.concat_channels}] = {(b, height, width, self.concat_channels)} must be "
                       f"given exactly when concat_channels > 0, got {None if concat is None else concat.shape}")
    self.check_input(height, width)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, context: jax.Array | None = None,
               context_mask: jax.Array | None = None, concat: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    b, height, width, channels = x.shape
    self.check_conditions(x, y, context, concat)
    if concat is not None:  # concatenation conditioning (LDM sec. 3.3; SR3): aligned inputs as extra channels
      x = jnp.concatenate([x, concat.astype(x.dtype)], axis=-1)
    size = self.padded_size(height)
    pad, pad_w = size - height, self.padded_size(width) - width
    # Odd sizes (28x28 with 3 downsamplings): pad to the multiple the levels need, crop at the end.
    x = jnp.pad(x, ((0, 0), (pad // 2, pad - pad // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    kw = dict(conv_impl=self.conv_impl, dtype=self.dtype, conv_precision=self.conv_precision)
    res_kw = dict(dropout=self.dropout, scale_shift_norm=self.scale_shift_norm, matmul_precision=self.matmul_precision,
                  **kw)
    # remat: activations inside each block are recomputed in the backward pass instead of stored (Chen et al.
    # 2016); `train` (argument 3, counting the module) is static. Blocks are named as without remat, so
    # checkpoints load either way.
    res_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    attn_cls = SpatialTransformer if self.context_dim else AttentionBlock
    attn_cls = nn.remat(attn_cls) if self.remat else attn_cls
    counts = {"ResBlock": 0, "attn": 0}

    def res_block(features: int, **extra):
      counts["ResBlock"] += 1
      return res_cls(features, **res_kw, **extra, name=f"ResBlock_{counts['ResBlock'] - 1}")

    def attn():
      counts["attn"] += 1
      name = f"{'SpatialTransformer' if self.context_dim else 'AttentionBlock'}_{counts['attn'] - 1}"
      block = attn_cls(self.num_heads, self.head_channels, dtype=self.dtype, attention_impl=self.attention_impl,
                       matmul_precision=self.matmul_precision, name=name)
      if self.context_dim:
        return lambda h: block(h, context, context_mask)
      return block

    dense_kw = dict(dtype=self.dtype, param_dtype=jnp.float32, dot_general=dense_dot_general(self.matmul_precision))
    emb = timestep_embedding(t, self.ch)
    emb = nn.Dense(4 * self.ch, **dense_kw)(emb)
    emb = nn.Dense(4 * self.ch, **dense_kw)(nn.silu(emb))
    if self.num_classes:
      # A learned class embedding added to the timestep embedding (ADM / Ho & Salimans 2022); +1 for null.
      emb = emb + nn.Embed(self.num_classes + 1, 4 * self.ch, param_dtype=jnp.float32)(y).astype(emb.dtype)
    if self.context_dim and self.pooled_context:
      # The masked mean of the text tokens added to the timestep embedding (Imagen, Saharia et al. 2022, sec. 2.1),
      # so every residual block sees the prompt, not only the cross-attention layers.
      emb = emb + nn.Dense(4 * self.ch, **dense_kw, name="context_embed")(masked_mean(context, context_mask))

    h = Conv(self.ch, 3, **kw)(x.astype(self.dtype))
    skips = [h]
    resolution = size
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = res_block(self.ch * mult)(h, emb, train)
        if resolution in self.attn_resolutions:
          h = attn()(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        if self.resblock_updown:
          h = res_block(h.shape[-1], resample="down")(h, emb, train)
        else:
          h = downsample(h, with_conv=True, **kw)
        resolution //= 2
        skips.append(h)

    h = res_block(h.shape[-1])(h, emb, train)
    h = attn()(h)
    h = res_block(h.shape[-1])(h, emb, train)

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = res_block(self.ch * mult)(jnp.concatenate([h, skips.pop()], axis=-1), emb, train)
        if resolution in self.attn_resolutions:
          h = attn()(h)
      if level != 0:
        if self.resblock_updown:
          h = res_block(h.shape[-1], resample="up")(h, emb, train)
        else:
          h = Conv(h.shape[-1], 3, upsample=True, **kw)(h)
        resolution *= 2
    assert not skips

    h = group_norm(h.shape[-1], self.dtype, silu=True)(h)
    out = Conv(self.out_channels or channels, 3, zero_init=True, **kw)(h)
    return out[:, pad // 2:pad // 2 + height, pad_w // 2:pad_w // 2 + width].astype(jnp.float32)
