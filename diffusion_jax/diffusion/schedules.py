"""Beta schedules and the precomputed `Schedule` pytree (DDPM, IDDPM, Stable Diffusion)."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "cosine", "sigmoid", "scaled_linear")


def _check_num_timesteps(num_timesteps: int) -> None:
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
    raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")


def _alpha_bar_cosine(t: np.ndarray, s: float = 0.008) -> np.ndarray:
  # IDDPM eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2).
  return np.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def get_beta_schedule(name: str, num_timesteps: int, *, max_beta: float = 0.999) -> np.ndarray:
  """Betas [T] float64 by schedule name: linear (DDPM sec. 4), cosine (IDDPM eq. 17), sigmoid, scaled_linear."""
  _check_num_timesteps(num_timesteps)
  T = int(num_timesteps)
  if name == "linear":
    # DDPM sec. 4: 1e-4 .. 0.02 over T=1000; IDDPM rescales by 1000/T so other T keep the same shape.
    scale = 1000.0 / T
    if scale * 0.02 > max_beta:
      raise ValueError(f"the linear schedule at T={T} reaches beta={scale * 0.02:g} > max_beta={max_beta}; "
                       "use num_timesteps >= 21 or the cosine schedule")
    return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
  if name == "cosine":
    # IDDPM eq. 17 turned into betas: beta_t = 1 - alpha_bar(t)/alpha_bar(t-1), clipped at max_beta.
    steps = np.arange(T + 1, dtype=np.float64) / T
    alpha_bar = _alpha_bar_cosine(steps)
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
  if name == "sigmoid":
    # GeoDiff (Xu et al. 2022): betas follow a sigmoid over [-6, 6] between the linear endpoints.
    scale = 1000.0 / T
    lo, hi = scale * 1e-4, scale * 0.02
    x = np.linspace(-6.0, 6.0, T, dtype=np.float64)
    return lo + (hi - lo) / (1.0 + np.exp(-x))
  if name == "scaled_linear":
    # Stable Diffusion (LDM): linear in sqrt(beta) from sqrt(0.00085) to sqrt(0.012).
    return np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=np.float64) ** 2
  raise ValueError(f"unknown beta schedule {name!r}; choose one of {BETA_SCHEDULES}")


class Schedule(NamedTuple):
  """Precomputed per-timestep coefficients [T] of a discrete Gaussian diffusion (a pytree)."""

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  alphas_cumprod_next: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  fixed_large_log_variance: jax.Array
  timestep_map: jax.Array  # [T] int32: the model's timestep for each index (identity unless respaced)

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])


def make_schedule(betas: np.ndarray | Sequence[float], *, timestep_map: np.ndarray | None = None,
                  dtype=jnp.float32) -> Schedule:
  """All coefficients computed in float64 numpy from betas [T], cast to `dtype` once."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1:
    raise ValueError(f"betas must be 1-D [T], got shape {betas.shape}")
  _check_num_timesteps(betas.shape[0])
  if not np.all((betas > 0) & (betas <= 1)):
    raise ValueError(f"betas must lie in (0, 1], got min {betas.min()} max {betas.max()}")
  T = betas.shape[0]
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)  # alpha_bar_t = prod_{s<=t} alpha_s (DDPM sec. 2)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
  # DDPM eq. 7: beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t.
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  # beta_tilde_0 = 0: IDDPM clips the log at t=0 to beta_tilde_1.
  posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
  # DDPM eq. 7: mu_tilde = coef1 * x_0 + coef2 * x_t.
  posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
  # DDPM sec. 3.2 "sigma_t^2 = beta_t" (fixed large), with beta_tilde_1 at t=0 as IDDPM does.
  fixed_large_log_variance = np.log(np.append(posterior_variance[1], betas[1:]))
  if timestep_map is None:
    timestep_map = np.arange(T)
  timestep_map = np.asarray(timestep_map)
  if timestep_map.shape != (T,):
    raise ValueError(f"timestep_map must have shape ({T},), got {timestep_map.shape}")
  cast = lambda a: jnp.asarray(a, dtype=dtype)
  return Schedule(
      betas=cast(betas),
      alphas_cumprod=cast(alphas_cumprod),
      alphas_cumprod_prev=cast(alphas_cumprod_prev),
      alphas_cumprod_next=cast(alphas_cumprod_next),
      sqrt_alphas_cumprod=cast(np.sqrt(alphas_cumprod)),
      sqrt_one_minus_alphas_cumprod=cast(np.sqrt(1.0 - alphas_cumprod)),
      log_one_minus_alphas_cumprod=cast(np.log(1.0 - alphas_cumprod)),
      sqrt_recip_alphas_cumprod=cast(np.sqrt(1.0 / alphas_cumprod)),
      sqrt_recipm1_alphas_cumprod=cast(np.sqrt(1.0 / alphas_cumprod - 1.0)),
      posterior_variance=cast(posterior_variance),
      posterior_log_variance_clipped=cast(posterior_log_variance_clipped),
      posterior_mean_coef1=cast(posterior_mean_coef1),
      posterior_mean_coef2=cast(posterior_mean_coef2),
      fixed_large_log_variance=cast(fixed_large_log_variance),
      timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
  )


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """`num_steps` evenly spaced timesteps of [0, T), always keeping 0 and T-1 (IDDPM sec. 4)."""
  _check_num_timesteps(num_timesteps)
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be an int in [1, {num_timesteps}], got {num_steps!r}")
  if num_steps == 1:
    return np.array([num_timesteps - 1])
  return np.unique(np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64))


def respace_betas(betas: np.ndarray, use_timesteps: Sequence[int]) -> np.ndarray:
  """Betas [K] of the sub-process on `use_timesteps` with the same alpha_bar there (IDDPM sec. 4)."""
  betas = np.asarray(betas, dtype=np.float64)
  use = np.asarray(sorted(set(int(t) for t in use_timesteps)))
  if use.size < 1 or use[0] < 0 or use[-1] >= betas.shape[0]:
    raise ValueError(f"use_timesteps must lie in [0, {betas.shape[0]}), got {use_timesteps!r}")
  alphas_cumprod = np.cumprod(1.0 - betas)[use]
  # IDDPM sec. 4: beta_{S_t} = 1 - alpha_bar_{S_t} / alpha_bar_{S_{t-1}}.
  return 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])


def respace_schedule(betas: np.ndarray, use_timesteps: Sequence[int], *, dtype=jnp.float32) -> Schedule:
  """The respaced `Schedule`; its `timestep_map` gives the original timestep the model expects."""
  use = np.asarray(sorted(set(int(t) for t in use_timesteps)))
  new_betas = respace_betas(betas, use)
  if new_betas.shape[0] < 2:
    raise ValueError(f"a respaced schedule needs >= 2 timesteps, got {use.tolist()}")
  return make_schedule(new_betas, timestep_map=use, dtype=dtype)
