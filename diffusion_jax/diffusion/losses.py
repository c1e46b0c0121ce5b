"""Diffusion training losses: simple (DDPM eq. 14), VLB terms (DDPM eq. 5), hybrid (IDDPM sec. 3.1)."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion.forward import q_mean_variance, q_posterior_mean_variance, q_sample
from diffusion_jax.diffusion.param import (PREDICTIONS, VARIANCES, check_choice, p_mean_variance,
                                           prediction_target, split_learned_variance)
from diffusion_jax.diffusion.schedules import Schedule

LOSS_TYPES = ("simple", "hybrid", "vlb")
TIMESTEP_SAMPLERS = ("uniform", "importance")
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [B,H,W,C], t [B]) -> output


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all but the batch axis: [B,...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (DDPM eq. 5 terms)."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """Tanh approximation of the standard normal CDF used by DDPM / IDDPM (so bpd numbers compare)."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
  """log p(x) of 8-bit data x in [-1,1] under a Gaussian integrated over each bin (DDPM sec. 3.3)."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  # DDPM sec. 3.3: the edge bins extend to -inf and +inf.
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def prior_bpd(schedule: Schedule, x_start: jax.Array) -> jax.Array:
  """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension [B] (DDPM eq. 5)."""
  t = jnp.full((x_start.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_variance = q_mean_variance(schedule, x_start, t)
  return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def vb_terms_bpd(schedule: Schedule, model_output: jax.Array, x_start: jax.Array, x_t: jax.Array,
                 t: jax.Array, *, prediction: str = "eps", variance: str = "fixed_small",
                 clip_denoised: bool = True) -> dict[str, jax.Array]:
  """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t>0, L_0 = -log p(x_0|x_1), bits/dim [B]."""
  true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x_start, x_t, t)
  out = p_mean_variance(schedule, model_output, x_t, t, prediction=prediction, variance=variance,
                        clip_denoised=clip_denoised)
  kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
  # DDPM sec. 3.3: the decoder's log-likelihood of the 8-bit data at t = 0.
  decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
      x_start, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
  return {"output": jnp.where(t == 0, decoder_nll, kl), "pred_x0": out["pred_x0"]}


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at t [B]."""
  # 1 - alpha_bar from the float64-precomputed sqrt, not from a float32 subtraction near alpha_bar=1.
  return schedule.alphas_cumprod[t] / schedule.sqrt_one_minus_alphas_cumprod[t] ** 2


def min_snr_weight(schedule: Schedule, t: jax.Array, gamma: float, prediction: str) -> jax.Array:
  """Min-SNR-gamma weight [B] for an MSE on the given parameterization (Hang et al. 2023, eq. 9)."""
  check_choice("prediction", prediction, PREDICTIONS)
  s = snr(schedule, t)
  clipped = jnp.minimum(s, gamma)
  if prediction == "eps":
    return clipped / s
  if prediction == "v":
    return clipped / (s + 1.0)
  return clipped


def diffusion_loss(schedule: Schedule, model_fn: ModelFn, x_start: jax.Array, t: jax.Array,
                   noise: jax.Array, *, loss_type: str = "simple", prediction: str = "eps",
                   variance: str = "fixed_small", vlb_weight: float = 1e-3,
                   snr_gamma: float | None = None) -> dict[str, jax.Array]:
  """Per-example loss [B] and its terms; `model_fn(x_t, t)` gets the schedule's own timesteps."""
  check_choice("loss_type", loss_type, LOSS_TYPES)
  check_choice("prediction", prediction, PREDICTIONS)
  check_choice("variance", variance, VARIANCES)
  if loss_type == "hybrid" and variance != "learned_range":
    raise ValueError("loss_type='hybrid' trains the variance: it needs variance='learned_range', "
                     f"got variance={variance!r}")
  x_t = q_sample(schedule, x_start, t, noise)
  model_output = model_fn(x_t, schedule.timestep_map[t]).astype(jnp.float32)
  output, var_values = split_learned_variance(model_output, x_t, variance)
  terms = {}
  target = prediction_target(schedule, x_start, t, noise, prediction)
  mse = mean_flat((target - output) ** 2)  # DDPM eq. 14 (for eps); its analogue for x0 / v
  if snr_gamma is not None:
    mse = mse * min_snr_weight(schedule, t, snr_gamma, prediction)
  terms["mse"] = mse
  T = schedule.num_timesteps
  if loss_type in ("hybrid", "vlb"):
    vb_output = model_output
    if loss_type == "hybrid":
      # IDDPM sec. 3.1: L_vlb trains only the variance; stop its gradient into the mean.
      vb_output = jnp.concatenate([jax.lax.stop_gradient(output), var_values], axis=-1)
    # T * L_t is an unbiased one-sample estimate of L_vlb = sum_t L_t (IDDPM eq. 16).
    terms["vb"] = T * vb_terms_bpd(schedule, vb_output, x_start, x_t, t, prediction=prediction,
                                   variance=variance, clip_denoised=False)["output"]
  if loss_type == "simple":
    terms["loss"] = mse
  elif loss_type == "hybrid":
    terms["loss"] = mse + vlb_weight * terms["vb"]  # IDDPM: L_hybrid = L_simple + lambda L_vlb
  else:
    terms["loss"] = terms["vb"]
  return terms


class LossHistory(NamedTuple):
  """Last `history_per_term` losses per timestep, for importance sampling (IDDPM sec. 3.3)."""

  losses: jax.Array  # [T, K]
  counts: jax.Array  # [T] int32, saturating at K


def init_loss_history(num_timesteps: int, history_per_term: int = 10) -> LossHistory:
  return LossHistory(jnp.zeros((num_timesteps, history_per_term), jnp.float32),
                     jnp.zeros((num_timesteps,), jnp.int32))


def update_loss_history(history: LossHistory, t: jax.Array, losses: jax.Array) -> LossHistory:
  """Push each (t, loss) pair in batch order, dropping the oldest once K are kept."""
  K = history.losses.shape[1]

  def push(i, h):
    row = jnp.roll(h.losses[t[i]], -1).at[-1].set(losses[i].astype(jnp.float32))
    return LossHistory(h.losses.at[t[i]].set(row), h.counts.at[t[i]].set(jnp.minimum(h.counts[t[i]] + 1, K)))

  return jax.lax.fori_loop(0, t.shape[0], push, history)


def sample_timesteps(key: jax.Array, batch_size: int, num_timesteps: int, *, method: str = "uniform",
                     history: LossHistory | None = None, uniform_prob: float = 1e-3):
  """Timesteps [B] and importance weights [B] (all 1 for method='uniform'); method='importance': IDDPM
  sec. 3.3, p_t ∝ sqrt(E[L_t^2]) over the loss history."""
  check_choice("timestep sampling method", method, TIMESTEP_SAMPLERS)
  uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps)
  if method == "uniform":
    probs = uniform
  else:
    if history is None:
      raise ValueError("method='importance' needs a LossHistory (init_loss_history)")
    warm = jnp.all(history.counts == history.losses.shape[1])
    weights = jnp.sqrt(jnp.mean(history.losses ** 2, axis=-1))
    weights = weights / jnp.maximum(jnp.sum(weights), 1e-12) * (1 - uniform_prob) + uniform_prob / num_timesteps
    probs = jnp.where(warm, weights, uniform)
  t = jax.random.choice(key, num_timesteps, (batch_size,), p=probs)
  return t.astype(jnp.int32), 1.0 / (num_timesteps * probs[t])
