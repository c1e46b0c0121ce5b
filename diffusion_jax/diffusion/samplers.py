"""Samplers: each one `lax.scan` over a timestep grid, for any `model_fn(x_t, t) -> output`.

ddpm: DDPM algorithm 2 (respaced: IDDPM sec. 4); ddim: Song et al. 2021 eq. 12; dpmpp_2m: Lu et al.
2022 (DPM-Solver++ algorithm 2); euler / heun: Karras et al. 2022 (EDM) algorithms 1-2 on the sigmas of
the discrete schedule.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion.param import PREDICTIONS, VARIANCES, check_choice, p_mean_variance
from diffusion_jax.diffusion.param import predict_x0_and_eps, split_learned_variance
from diffusion_jax.diffusion.schedules import Schedule, respace_schedule, space_timesteps

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler", "heun")
SPACINGS = ("uniform", "trailing", "quadratic", "karras", "logsnr")
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
# Measured on Gaussian data (tests/test_samplers.py): DPM-Solver++ wants logSNR steps (its paper's advice
# for pixel space; 12x lower error at 20 steps than uniform), EDM samplers the Karras spacing.
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpmpp_2m": "logsnr", "euler": "karras", "heun": "karras"}


def _check_shape(shape) -> tuple[int, ...]:
  shape = tuple(int(s) for s in shape)
  if len(shape) != 4 or min(shape) < 1:
    raise ValueError(f"shape must be (B,H,W,C) of positive ints, got {shape}")
  return shape


def timestep_grid(schedule: Schedule, num_steps: int, spacing: str = "uniform") -> np.ndarray:
  """`num_steps` distinct indices of `schedule`, decreasing from T-1 (where sampling starts).

  uniform: evenly spaced incl. 0 (IDDPM); trailing: T-1, T-1-T/K, ... (Lin et al. 2024 table 2);
  quadratic: spaced as i^2 (DDIM sec. 5); karras: the sigma spacing of EDM eq. 5 with rho=7;
  logsnr: uniform in log-SNR (DPM-Solver sec. 3.3).
  """
  check_choice("spacing", spacing, SPACINGS)
  T = schedule.num_timesteps
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
    raise ValueError(f"num_steps must be an int in [1, {T}], got {num_steps!r}")
  if spacing == "uniform":
    grid = space_timesteps(T, num_steps)
  elif spacing == "trailing":
    grid = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
  elif spacing == "quadratic":
    grid = np.round(np.linspace(0, np.sqrt(T - 1), num_steps) ** 2).astype(np.int64)
  elif spacing == "karras":
    grid = _karras_timesteps(schedule, num_steps)
  else:
    grid = _logsnr_timesteps(schedule, num_steps)
  return _distinct_descending(grid, num_steps, T)


def _distinct_descending(grid: np.ndarray, num_steps: int, T: int) -> np.ndarray:
  """Exactly `num_steps` distinct indices in [0, T-1], ending at T-1, moved minimally where rounding collided."""
  g = np.sort(np.clip(np.asarray(grid, np.int64), 0, T - 1))[:num_steps]
  g[-1] = T - 1
  for i in range(len(g) - 2, -1, -1):  # push collisions down ...
    g[i] = min(g[i], g[i + 1] - 1)
  g[0] = max(g[0], 0)
  for i in range(1, len(g)):  # ... and back up where they fell below 0
    g[i] = max(g[i], g[i - 1] + 1)
  return g[::-1].copy()


def discrete_sigmas(schedule: Schedule) -> np.ndarray:
  """sigma_t = sqrt((1 - alpha_bar) / alpha_bar) [T] (the VE view of a VP process, EDM table 1)."""
  alphas_cumprod = np.asarray(schedule.alphas_cumprod, np.float64)
  return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def _nearest_timesteps(log_sigmas: np.ndarray, target_log_sigmas: np.ndarray) -> np.ndarray:
  """Quantize to the nearest discrete sigma in log space, so the model sees timesteps it was trained on."""
  return np.abs(log_sigmas[None, :] - target_log_sigmas[:, None]).argmin(axis=1)


def _logsnr_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
  """Uniform in lambda = -log sigma between t=T-1 and t=0 (DPM-Solver sec. 3.3, 'logSNR' steps)."""
  log_sigmas = np.log(discrete_sigmas(schedule))
  return _nearest_timesteps(log_sigmas, np.linspace(log_sigmas[-1], log_sigmas[0], num_steps))


def _karras_timesteps(schedule: Schedule, num_steps: int, rho: float = 7.0) -> np.ndarray:
  sigmas = discrete_sigmas(schedule)
  ramp = np.linspace(0, 1, num_steps)
  # EDM eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
  target = (sigmas[-1] ** (1 / rho) + ramp * (sigmas[0] ** (1 / rho) - sigmas[-1] ** (1 / rho))) ** rho
  return _nearest_timesteps(np.log(sigmas), np.log(target))


def _predict(schedule, model_fn, x, t_index, batch, prediction, variance, clip_denoised=False):
  """(x0, eps) [B,H,W,C] the model implies at schedule index `t_index`; x0 clipped to [-1,1] if asked."""
  t = jnp.full((batch,), t_index, jnp.int32)
  output, _ = split_learned_variance(model_fn(x, schedule.timestep_map[t]).astype(x.dtype), x, variance)
  pred_x0, pred_eps = predict_x0_and_eps(schedule, output, x, t, prediction)
  return (jnp.clip(pred_x0, -1.0, 1.0) if clip_denoised else pred_x0), pred_eps


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


def _grid_pairs(grid: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """(t_i, t_{i+1}) over a decreasing grid; -1 marks the clean end (alpha_bar = 1)."""
  grid = np.asarray(grid, np.int64)
  return jnp.asarray(grid, jnp.int32), jnp.asarray(np.append(grid[1:], -1), jnp.int32)


def _alpha_bar(schedule: Schedule, t: jax.Array) -> jax.Array:
  return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def ddim_sample_loop(schedule: Schedule, model_fn: ModelFn, x_T: jax.Array, key: jax.Array,
                     grid: np.ndarray, *, prediction: str = "eps", variance: str = "fixed_small",
                     eta: float = 0.0, clip_denoised: bool = True) -> jax.Array:
  """DDIM (Song et al. 2021, eq. 12) over a decreasing `grid` of schedule indices."""
  batch = x_T.shape[0]
  ts, prev = _grid_pairs(grid)

  def step(x, inputs):
    i, t_i, t_prev = inputs
    pred_x0, _ = _predict(schedule, model_fn, x, t_i, batch, prediction, variance, clip_denoised)
    a_t, a_prev = _alpha_bar(schedule, t_i), _alpha_bar(schedule, t_prev)
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


def ddim_invert(schedule: Schedule, model_fn: ModelFn, x_start: jax.Array, grid: np.ndarray, *,
                prediction: str = "eps", variance: str = "fixed_small") -> jax.Array:
  """Deterministic DDIM encoding x_0 -> x_T: eq. 12 with eta=0 run upwards (DDIM sec. 4.3).

  eps at the next grid point is approximated by the model at the current point, as is usual.
  """
  batch = x_start.shape[0]
  up = np.asarray(grid, np.int64)[::-1].copy()  # increasing
  ts = jnp.asarray(up, jnp.int32)
  prev = jnp.asarray(np.concatenate([[-1], up[:-1]]), jnp.int32)

  def step(x, inputs):
    t_prev, t_next = inputs
    _, eps = _predict(schedule, model_fn, x, t_next, batch, prediction, variance)
    a_prev, a_next = _alpha_bar(schedule, t_prev), _alpha_bar(schedule, t_next)
    pred_x0 = (x - jnp.sqrt(1.0 - a_prev) * eps) * jax.lax.rsqrt(a_prev)
    return (jnp.sqrt(a_next) * pred_x0 + jnp.sqrt(1.0 - a_next) * eps).astype(x.dtype), None

  x, _ = jax.lax.scan(step, x_start, (prev, ts))
  return x


def dpmpp_2m_sample_loop(schedule: Schedule, model_fn: ModelFn, x_T: jax.Array, grid: np.ndarray, *,
                         prediction: str = "eps", variance: str = "fixed_small",
                         clip_denoised: bool = True) -> jax.Array:
  """DPM-Solver++(2M) (Lu et al. 2022, algorithm 2): data prediction, first-order warm-up and final step."""
  batch = x_T.shape[0]
  ts, nxt = _grid_pairs(grid)

  def lam(t):  # lambda_t = log(alpha_t / sigma_t) (DPM-Solver eq. 3.2)
    a = _alpha_bar(schedule, t)
    return 0.5 * (jnp.log(a) - jnp.log1p(-a))

  def step(carry, inputs):
    x, x0_prev, h_prev = carry
    i, t_s, t_t = inputs
    x0, _ = _predict(schedule, model_fn, x, t_s, batch, prediction, variance, clip_denoised)
    a_s, a_t = _alpha_bar(schedule, t_s), _alpha_bar(schedule, t_t)
    h = lam(t_t) - lam(t_s)
    r = h_prev / h
    # DPM-Solver++ algorithm 2: D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}; first order at the first step.
    d = jnp.where(i > 0, (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev, x0)
    # x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) D; to the clean end (t=-1) this is D's first-order x0.
    ratio = jnp.sqrt((1.0 - a_t) / (1.0 - a_s))
    x_next = ratio * x - jnp.sqrt(a_t) * jnp.expm1(-h) * d
    x_next = jnp.where(t_t >= 0, x_next, x0)
    return (x_next.astype(x.dtype), x0, jnp.where(t_t >= 0, h, 1.0)), None

  init = (x_T, jnp.zeros_like(x_T), jnp.ones((), x_T.dtype))
  (x, _, _), _ = jax.lax.scan(step, init, (jnp.arange(ts.shape[0]), ts, nxt))
  return x


def karras_sample_loop(schedule: Schedule, model_fn: ModelFn, x_T: jax.Array, grid: np.ndarray, *,
                       heun: bool, prediction: str = "eps", variance: str = "fixed_small",
                       clip_denoised: bool = True) -> jax.Array:
  """Euler (EDM algorithm 1 with gamma=0) or Heun (EDM algorithm 2) on x / sqrt(alpha_bar), sigma grid."""
  batch = x_T.shape[0]
  sigmas_all = jnp.asarray(discrete_sigmas(schedule), x_T.dtype)
  ts, nxt = _grid_pairs(grid)

  def sigma_of(t):
    return jnp.where(t >= 0, sigmas_all[jnp.maximum(t, 0)], 0.0)

  def denoise(x_ve, t):  # D(x; sigma): the VP model on x_vp = x_ve / sqrt(1 + sigma^2) (EDM table 1)
    return _predict(schedule, model_fn, x_ve * jax.lax.rsqrt(1.0 + sigma_of(t) ** 2), t, batch,
                    prediction, variance, clip_denoised)[0]

  def step(x, inputs):
    t_i, t_n = inputs
    s_i, s_n = sigma_of(t_i), sigma_of(t_n)
    d = (x - denoise(x, t_i)) / s_i  # EDM eq. 3: dx/dsigma = (x - D(x; sigma)) / sigma
    x_euler = x + (s_n - s_i) * d
    if not heun:
      return x_euler, None

    def correct(_):
      d_next = (x_euler - denoise(x_euler, t_n)) / s_n
      return x + (s_n - s_i) * 0.5 * (d + d_next)  # EDM algorithm 2, line 8

    return jax.lax.cond(t_n >= 0, correct, lambda _: x_euler, None), None

  x_ve = x_T * jnp.sqrt(1.0 + sigma_of(ts[0]) ** 2)  # x_T of the VP process seen as VE
  x, _ = jax.lax.scan(step, x_ve, (ts, nxt))
  return x


def num_function_evals(sampler: str, num_steps: int) -> int:
  """Network evaluations a sampler makes for `num_steps` grid points."""
  check_choice("sampler", sampler, SAMPLERS)
  return 2 * num_steps - 1 if sampler == "heun" else num_steps


def _check_sample_args(sampler, prediction, variance, eta) -> None:
  check_choice("sampler", sampler, SAMPLERS)
  check_choice("prediction", prediction, PREDICTIONS)
  check_choice("variance", variance, VARIANCES)
  if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
    raise ValueError(f"eta must be a number >= 0, got {eta!r}")


def sampling_grid(schedule: Schedule, num_steps: int | None, sampler: str, spacing: str | None = None) -> np.ndarray:
  """The decreasing grid `sample` walks: `num_steps` (None: all T) indices in the sampler's default spacing."""
  T = schedule.num_timesteps
  if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer))
                                or not 1 <= num_steps <= T):
    raise ValueError(f"num_steps must be None or an int in [1, {T}], got {num_steps!r}")
  check_choice("sampler", sampler, SAMPLERS)
  return timestep_grid(schedule, T if num_steps is None else int(num_steps), spacing or DEFAULT_SPACING[sampler])


def respaced_for_ancestral(schedule: Schedule, grid: np.ndarray) -> Schedule:
  """The sub-process of `schedule` on the grid's indices (IDDPM sec. 4: ancestral sampling on fewer steps);
  its `timestep_map` feeds the model the original timesteps. The full grid returns `schedule` itself."""
  kept = np.sort(np.asarray(grid, np.int64))
  if len(kept) == schedule.num_timesteps:
    return schedule
  if len(kept) < 2:
    raise ValueError("ancestral sampling needs num_steps >= 2 (a respaced process of one step has no posterior)")
  respaced = respace_schedule(np.asarray(schedule.betas, np.float64), kept)
  return respaced._replace(timestep_map=schedule.timestep_map[kept])


def sample_loop(schedule: Schedule, model_fn: ModelFn, x_t: jax.Array, key: jax.Array, grid: np.ndarray, *,
                sampler: str = "ddpm", prediction: str = "eps", eta: float = 0.0, variance: str = "fixed_small",
                clip_denoised: bool = True) -> jax.Array:
  """x_0 [B,H,W,C] from x_t at schedule index grid[0], down the decreasing `grid`. From pure noise at T-1
  this is sampling; from a noised image at an intermediate index it is SDEdit (Meng et al. 2022, sec. 3)."""
  _check_sample_args(sampler, prediction, variance, eta)
  common = dict(prediction=prediction, variance=variance, clip_denoised=clip_denoised)
  if sampler == "ddpm":
    return ddpm_sample_loop(respaced_for_ancestral(schedule, grid), model_fn, x_t, key, **common)
  if sampler == "ddim":
    return ddim_sample_loop(schedule, model_fn, x_t, key, grid, eta=eta, **common)
  if sampler == "dpmpp_2m":
    return dpmpp_2m_sample_loop(schedule, model_fn, x_t, grid, **common)
  return karras_sample_loop(schedule, model_fn, x_t, grid, heun=sampler == "heun", **common)


def sample(schedule: Schedule, model_fn: ModelFn, shape, key: jax.Array, *, sampler: str = "ddpm",
           num_steps: int | None = None, prediction: str = "eps", eta: float = 0.0,
           variance: str = "fixed_small", clip_denoised: bool = True, spacing: str | None = None) -> jax.Array:
  """Draw x_0 [B,H,W,C] from x_T ~ N(0, I); `model_fn(x_t, t)` takes timesteps of `schedule`.

  spacing: the timestep grid (SPACINGS); None picks DEFAULT_SPACING[sampler]. num_steps=None: all T.
  """
  _check_sample_args(sampler, prediction, variance, eta)
  shape = _check_shape(shape)
  grid = sampling_grid(schedule, num_steps, sampler, spacing)
  key_T, key_loop = jax.random.split(key)
  x_T = jax.random.normal(key_T, shape, jnp.float32)
  return sample_loop(schedule, model_fn, x_T, key_loop, grid, sampler=sampler, prediction=prediction, eta=eta,
                     variance=variance, clip_denoised=clip_denoised)
