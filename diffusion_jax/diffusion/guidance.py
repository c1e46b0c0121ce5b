"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper of the model function every sampler takes."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Condition = Any  # a pytree of arrays with a leading batch axis: {"y": [B]} or {"context": [B,L,D], ...}
ConditionalModelFn = Callable[[jax.Array, jax.Array, Condition], jax.Array]  # (x_t, t, cond) -> output


def check_guidance_scale(scale) -> float:
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
    raise ValueError(f"guidance_scale must be a number >= 0 (0 = unconditional, 1 = no guidance), got {scale!r}")
  return float(scale)


def drop_labels(key: jax.Array, labels: jax.Array, p_uncond: float, null_label: int) -> jax.Array:
  """Replace each label [B] by the null label with probability p_uncond (condition dropout in training)."""
  return jnp.where(jax.random.bernoulli(key, p_uncond, labels.shape), null_label, labels)


def guided_model_fn(model_fn: ConditionalModelFn, cond: Condition, null_cond: Condition, scale: float, *,
                    guided_channels: int | None = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """model_fn(x_t, t) = out_uncond + w (out_cond - out_uncond) (Ho & Salimans 2022, eq. 6 with w = 1 + their w).

  Conditional and unconditional outputs come from one batched call on [2B,...]. With a learned variance,
  only the first `guided_channels` (the prediction) are guided and the variance channels stay conditional.
  """
  scale = check_guidance_scale(scale)
  if scale == 1.0:
    return lambda x, t: model_fn(x, t, cond)
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, null_cond)

  def guided(x, t):
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    cond_out, uncond_out = jnp.split(out, 2)
    mixed = uncond_out + scale * (cond_out - uncond_out)
    if guided_channels is not None and guided_channels < out.shape[-1]:
      mixed = jnp.concatenate([mixed[..., :guided_channels], cond_out[..., guided_channels:]], axis=-1)
    return mixed

  return guided
