"""Conversions between the eps, x0 and v parameterizations, and the reverse process p(x_{t-1}|x_t)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion.forward import check_image_and_t, extract, q_posterior_mean_variance
from diffusion_jax.diffusion.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  """ValueError naming the bad value and the valid choices."""
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")


def predict_x0_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) (DDPM eq. 4 inverted)."""
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
          - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)


def predict_eps_from_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
  """eps = (x_t / sqrt(alpha_bar) - x_0) / sqrt(1/alpha_bar - 1) (DDPM eq. 4 inverted)."""
  return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
          / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t))


def predict_x0_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v (Salimans & Ho 2022, sec. 4)."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v)


def predict_eps_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v (Salimans & Ho 2022, sec. 4)."""
  return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
          + extract(schedule.sqrt_alphas_cumprod, t, x_t) * v)


def get_v(schedule: Schedule, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, eq. after 9)."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x_start) * noise
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start)


def prediction_target(schedule: Schedule, x_start: jax.Array, t: jax.Array, noise: jax.Array,
                      prediction: str) -> jax.Array:
  """What a network of the given parameterization is trained to output."""
  check_choice("prediction", prediction, PREDICTIONS)
  if prediction == "eps":
    return noise
  if prediction == "x0":
    return x_start
  return get_v(schedule, x_start, t, noise)


def predict_x0_and_eps(schedule: Schedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array,
                       prediction: str) -> tuple[jax.Array, jax.Array]:
  """(x0, eps) implied by a network output of the given parameterization (unclipped)."""
  check_choice("prediction", prediction, PREDICTIONS)
  if prediction == "eps":
    return predict_x0_from_eps(schedule, x_t, t, model_output), model_output
  if prediction == "x0":
    return model_output, predict_eps_from_x0(schedule, x_t, t, model_output)
  return (predict_x0_from_v(schedule, x_t, t, model_output),
          predict_eps_from_v(schedule, x_t, t, model_output))


def split_learned_variance(model_output: jax.Array, x_t: jax.Array, variance: str):
  """(prediction [B,H,W,C], variance values or None); learned_range wants 2C output channels."""
  check_choice("variance", variance, VARIANCES)
  channels = x_t.shape[-1]
  if variance == "learned_range":
    if model_output.shape[-1] != 2 * channels:
      raise ValueError(f"variance='learned_range' needs a model output with 2*C={2 * channels} channels "
                       f"(prediction, then variance), got shape {model_output.shape}")
    return model_output[..., :channels], model_output[..., channels:]
  if model_output.shape != x_t.shape:
    raise ValueError(f"model output shape {model_output.shape} must equal x_t shape {x_t.shape} "
                     f"for variance={variance!r}")
  return model_output, None


def p_mean_variance(schedule: Schedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array, *,
                    prediction: str = "eps", variance: str = "fixed_small",
                    clip_denoised: bool = True) -> dict[str, jax.Array]:
  """p(x_{t-1} | x_t): pred_x0 into DDPM eq. 7; learned-range variance is IDDPM eq. 15."""
  check_choice("prediction", prediction, PREDICTIONS)
  check_image_and_t(x_t, t, "x_t")
  output, var_values = split_learned_variance(model_output, x_t, variance)
  if variance == "learned_range":
    # IDDPM eq. 15: Sigma = exp(v log beta_t + (1 - v) log beta_tilde_t), v = (out + 1) / 2.
    min_log = extract(schedule.posterior_log_variance_clipped, t, x_t)
    max_log = extract(jnp.log(schedule.betas), t, x_t)
    frac = (var_values.astype(min_log.dtype) + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
    variance_value = jnp.exp(log_variance)
  elif variance == "fixed_large":
    log_variance = extract(schedule.fixed_large_log_variance, t, x_t)
    variance_value = jnp.exp(log_variance)
  else:
    # IDDPM keeps the true beta_tilde_0 = 0 as the variance but a clipped log-variance.
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t)
    variance_value = extract(schedule.posterior_variance, t, x_t)
  pred_x0, pred_eps = predict_x0_and_eps(schedule, output, x_t, t, prediction)
  if clip_denoised:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
  mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
  return {"mean": mean, "variance": variance_value, "log_variance": log_variance,
          "pred_x0": pred_x0, "pred_eps": pred_eps}
