"""Samplers: each one `lax.scan` over a timestep grid, for any `model_fn(x_t, t) -> output`."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion.param import PREDICTIONS, VARIANCES, check_choice, p_mean_variance
from diffusion_jax.diffusion.param import predict_x0_and_eps, split_learned_variance
from diffusion_jax.diffusion.schedules import Schedule, respace_schedule, space_timesteps

SAMPLERS = ("ddpm", "ddim")
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_shape(shape) -> tuple[int, ...]:
  shape = tuple(int(s) for s in shape)
  if len(shape) != 4 or min(shape) < 1:
    raise ValueError(f"shape must be (B,H,W,C) of positive ints, got {shape}")
  return shape


def ddpm_sample_loop(schedule: Schedule, model_fn: ModelFn, x_T: jax.Array, key: jax.Array, *,
                     prediction: str = "eps", variance: str = "fixed_small",
                     clip_denoised: bool = True) -> jax.Array:
  """Ancestral sampling over every index of `schedule` (DDPM algorithm 2); x_T [B,H,W,C]."""
  batch = x_T.shape[0]

  def step(x, i):
    t = jnp.full((batch,), i, jnp.int32)
    out = p_mean_variance(schedule, model_fn(x, schedule.timestep_map[t]).astype(x.dtype), x, t,
                          prediction=prediction, variance=variance, clip_denoised=clip_denoised)
    noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    nonzero = (i > 0).astype(x.dtype)  # DDPM algorithm 2: no noise at the last step
    return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise, None

  x, _ = jax.lax.scan(step, x_T, jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32))
  return x


def ddim_sample_loop(schedule: Schedule, model_fn: ModelFn, x_T: jax.Array, key: jax.Array,
                     timesteps: np.ndarray, *, prediction: str = "eps", variance: str = "fixed_small",
                     eta: float = 0.0, clip_denoised: bool = True) -> jax.Array:
  """DDIM (Song et al. 2021, eq. 12) over increasing `timesteps` [K] of `schedule`, visited downwards."""
  batch = x_T.shape[0]
  ts = jnp.asarray(np.asarray(timesteps)[::-1].copy(), jnp.int32)
  prev = jnp.concatenate([ts[1:], jnp.array([-1], jnp.int32)])
  alphas_cumprod = schedule.alphas_cumprod

  def step(x, inputs):
    i, t_i, t_prev = inputs
    t = jnp.full((batch,), t_i, jnp.int32)
    output, _ = split_learned_variance(model_fn(x, schedule.timestep_map[t]).astype(x.dtype), x, variance)
    pred_x0, _ = predict_x0_and_eps(schedule, output, x, t, prediction)
    if clip_denoised:
      pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    a_t = alphas_cumprod[t_i]
    a_prev = jnp.where(t_prev >= 0, alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
    # eps recomputed from the (clipped) x0 keeps the update consistent (IDDPM ddim_sample).
    eps = (x * jax.lax.rsqrt(a_t) - pred_x0) / jnp.sqrt(1.0 / a_t - 1.0)
    # DDIM eq. 16: sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev).
    sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t)) * jnp.sqrt(1.0 - a_t / a_prev)
    noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    # DDIM eq. 12.
    x_prev = (jnp.sqrt(a_prev) * pred_x0 + jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma ** 2, 0.0)) * eps
              + sigma * noise)
    return x_prev.astype(x.dtype), None

  x, _ = jax.lax.scan(step, x_T, (jnp.arange(ts.shape[0]), ts, prev))
  return x


def sample(schedule: Schedule, model_fn: ModelFn, shape, key: jax.Array, *, sampler: str = "ddpm",
           num_steps: int | None = None, prediction: str = "eps", eta: float = 0.0,
           variance: str = "fixed_small", clip_denoised: bool = True) -> jax.Array:
  """Draw x_0 [B,H,W,C] from x_T ~ N(0, I); `model_fn(x_t, t)` takes timesteps of `schedule`."""
  check_choice("sampler", sampler, SAMPLERS)
  check_choice("prediction", prediction, PREDICTIONS)
  check_choice("variance", variance, VARIANCES)
  shape = _check_shape(shape)
  T = schedule.num_timesteps
  if num_steps is not None and (not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T):
    raise ValueError(f"num_steps must be None or an int in [1, {T}], got {num_steps!r}")
  if not isinstance(eta, (int, float)) or eta < 0:
    raise ValueError(f"eta must be a number >= 0, got {eta!r}")
  key_T, key_loop = jax.random.split(key)
  x_T = jax.random.normal(key_T, shape, jnp.float32)
  steps = T if num_steps is None else int(num_steps)
  if sampler == "ddpm":
    if steps < T:
      # IDDPM sec. 4: ancestral sampling on a respaced sub-process; timestep_map feeds the model.
      kept = space_timesteps(T, max(steps, 2))
      respaced = respace_schedule(np.asarray(schedule.betas, np.float64), kept)
      schedule = respaced._replace(timestep_map=schedule.timestep_map[kept])
    return ddpm_sample_loop(schedule, model_fn, x_T, key_loop, prediction=prediction,
                            variance=variance, clip_denoised=clip_denoised)
  return ddim_sample_loop(schedule, model_fn, x_T, key_loop, space_timesteps(T, steps),
                          prediction=prediction, variance=variance, eta=eta, clip_denoised=clip_denoised)
