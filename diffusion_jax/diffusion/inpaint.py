"""Training-free inpainting with any noise-prediction model: ancestral sampling in which the known region is
replaced, at every step, by the forward-noised original (the "replacement" method, Song et al. 2021 sec. 5 /
appendix I.2), optionally with RePaint's resampling (Lugmayr et al. 2022, sec. 4.2, algorithm 1): after a
stretch of `jump` reverse steps, diffuse back up `jump` steps and denoise again, `resample_steps` times, so the
generated region can harmonize with the known one instead of only being glued to it.

Masks here are `keep` masks, 1 where the original is known ([B,H,W,1] or [B,H,W,C], values in {0, 1}).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion.param import p_mean_variance
from diffusion_jax.diffusion.samplers import ModelFn
from diffusion_jax.diffusion.schedules import Schedule


def repaint_path(num_steps: int, jump: int = 1, resample_steps: int = 1) -> np.ndarray:
  """The sequence of schedule indices RePaint visits, from num_steps-1 down to -1 (clean).

  A decrease by one is a reverse (denoising) step, an increase by `jump` a forward re-noising jump. Every
  `jump` steps (except the first stretch from T), the walk goes back up `jump` steps, `resample_steps - 1`
  times (RePaint's `get_schedule_jump` with its jump_length = jump, jump_n_sample = resample_steps).
  resample_steps=1 is plain replacement: num_steps reverse steps.
  """
  for name, value in (("num_steps", num_steps), ("jump", jump), ("resample_steps", resample_steps)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  remaining = {t: resample_steps - 1 for t in range(0, num_steps - jump, jump)}
  t, path = num_steps - 1, [num_steps - 1]
  while t >= 0:
    t -= 1
    path.append(t)
    if remaining.get(t, 0) > 0:
      remaining[t] -= 1
      t += jump
      path.append(t)
  return np.asarray(path, np.int64)


def inpaint_loop(schedule: Schedule, model_fn: ModelFn, x_known: jax.Array, keep: jax.Array, key: jax.Array, *,
                 path: np.ndarray, prediction: str = "eps", variance: str = "fixed_small",
                 clip_denoised: bool = True) -> jax.Array:
  """x_0 [B,H,W,C] whose known region (keep=1) is x_known [B,H,W,C] and the rest generated, walking `path`
  (repaint_path over `schedule`'s indices; a respaced schedule for fewer steps).

  Reverse step t -> t-1 (RePaint algorithm 1, lines 4-8): x_{t-1} = keep * q_sample(x_known, t-1)
  + (1 - keep) * p-sample(x_t), and at t-1 = -1 the known region is x_known itself.
  Forward jump a -> b > a (line 10, over several steps): x_b ~ q(x_b | x_a) =
  N(sqrt(abar_b / abar_a) x_a, (1 - abar_b / abar_a) I).
  """
  path = np.asarray(path, np.int64)
  if path[0] != schedule.num_timesteps - 1 or path[-1] != -1:
    raise ValueError(f"path must start at {schedule.num_timesteps - 1} and end at -1, got {path[0]}..{path[-1]}")
  batch = x_known.shape[0]
  keep = keep.astype(x_known.dtype)
  abar = jnp.concatenate([schedule.alphas_cumprod.astype(x_known.dtype), jnp.ones((1,), x_known.dtype)])
  at = lambda t: abar[jnp.where(t >= 0, t, schedule.num_timesteps)]  # index -1 (clean): alpha_bar = 1

  def reverse(x, t, key):
    key_known, key_sample = jax.random.split(key)
    tb = jnp.full((batch,), t, jnp.int32)
    out = p_mean_variance(schedule, model_fn(x, schedule.timestep_map[tb]).astype(x.dtype), x, tb,
                          prediction=prediction, variance=variance, clip_denoised=clip_denoised)
    noise = jax.random.normal(key_sample, x.shape, x.dtype)
    unknown = out["mean"] + (t > 0).astype(x.dtype) * jnp.exp(0.5 * out["log_variance"]) * noise
    a_prev = at(t - 1)
    known = jnp.sqrt(a_prev) * x_known + jnp.sqrt(1.0 - a_prev) * jax.random.normal(key_known, x.shape, x.dtype)
    return keep * known + (1.0 - keep) * unknown

  def forward(x, t_from, t_to, key):
    ratio = at(t_to) / at(t_from)
    return jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * jax.random.normal(key, x.shape, x.dtype)

  def step(x, inputs):
    i, t_from, t_to = inputs
    key_i = jax.random.fold_in(key, i)
    x = jax.lax.cond(t_to < t_from, lambda x: reverse(x, t_from, key_i), lambda x: forward(x, t_from, t_to, key_i), x)
    return x, None

  key_T, key = jax.random.split(key)
  # x_T: the known region noised to T-1 (as every later step), the rest pure noise.
  a_T = at(jnp.asarray(path[0]))
  x = keep * (jnp.sqrt(a_T) * x_known + jnp.sqrt(1 - a_T) * jax.random.normal(key_T, x_known.shape, x_known.dtype))
  x = x + (1.0 - keep) * jax.random.normal(jax.random.fold_in(key_T, 1), x_known.shape, x_known.dtype)
  steps = (jnp.arange(len(path) - 1), jnp.asarray(path[:-1], jnp.int32), jnp.asarray(path[1:], jnp.int32))
  x, _ = jax.lax.scan(step, x, steps)
  return keep * x_known + (1.0 - keep) * x
