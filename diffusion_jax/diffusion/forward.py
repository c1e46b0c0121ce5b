"""The forward process q(x_t | x_0) and its posterior q(x_{t-1} | x_t, x_0) (DDPM sec. 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion.schedules import Schedule


def check_image_and_t(x: jax.Array, t: jax.Array, name: str = "x") -> None:
  """Raise ValueError unless x is [B,H,W,C] and t is an int [B] (static shapes, so before XLA)."""
  if jnp.ndim(x) != 4:
    raise ValueError(f"{name} must be [B,H,W,C], got shape {jnp.shape(x)}")
  if jnp.ndim(t) != 1 or jnp.shape(t)[0] != jnp.shape(x)[0]:
    raise ValueError(f"t must be [B]=[{jnp.shape(x)[0]}] to match {name}, got shape {jnp.shape(t)}")
  if not jnp.issubdtype(jnp.result_type(t), jnp.integer):
    raise ValueError(f"t must be an integer timestep array, got dtype {jnp.result_type(t)}")


def extract(coef: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
  """coef[t] [B] reshaped to [B,1,1,1] and cast to x's float dtype (float32 if x is an int)."""
  out = coef[t]
  dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  return out.reshape(out.shape + (1,) * (x.ndim - 1)).astype(dtype)


def q_mean_variance(schedule: Schedule, x_start: jax.Array, t: jax.Array):
  """Mean, variance, log-variance of q(x_t | x_0) (DDPM eq. 4); variances [B,1,1,1]."""
  check_image_and_t(x_start, t, "x_start")
  mean = extract(schedule.sqrt_alphas_cumprod, t, x_start) * x_start
  variance = 1.0 - extract(schedule.alphas_cumprod, t, x_start)
  log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, x_start)
  return mean, variance, log_variance


def q_sample(schedule: Schedule, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4). x_start, noise [B,H,W,C]."""
  check_image_and_t(x_start, t, "x_start")
  if jnp.shape(noise) != jnp.shape(x_start):
    raise ValueError(f"noise shape {jnp.shape(noise)} must equal x_start shape {jnp.shape(x_start)}")
  return (extract(schedule.sqrt_alphas_cumprod, t, x_start) * x_start
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start) * noise.astype(x_start.dtype))


def q_posterior_mean_variance(schedule: Schedule, x_start: jax.Array, x_t: jax.Array, t: jax.Array):
  """Mean [B,H,W,C], variance and clipped log-variance [B,1,1,1] of q(x_{t-1}|x_t,x_0) (DDPM eq. 6-7)."""
  check_image_and_t(x_t, t, "x_t")
  if jnp.shape(x_start) != jnp.shape(x_t):
    raise ValueError(f"x_start shape {jnp.shape(x_start)} must equal x_t shape {jnp.shape(x_t)}")
  mean = (extract(schedule.posterior_mean_coef1, t, x_t) * x_start
          + extract(schedule.posterior_mean_coef2, t, x_t) * x_t)
  variance = extract(schedule.posterior_variance, t, x_t)
  log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t)
  return mean, variance, log_variance
