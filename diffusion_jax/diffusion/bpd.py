"""Bits per dimension: the full variational bound over every timestep (DDPM eq. 5, IDDPM calc_bpd_loop)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion.forward import check_image_and_t, q_sample
from diffusion_jax.diffusion.losses import ModelFn, mean_flat, prior_bpd, vb_terms_bpd
from diffusion_jax.diffusion.param import check_choice, PREDICTIONS, VARIANCES, split_learned_variance
from diffusion_jax.diffusion.param import predict_x0_and_eps
from diffusion_jax.diffusion.schedules import Schedule


def calc_bpd_loop(schedule: Schedule, model_fn: ModelFn, x_start: jax.Array, key: jax.Array, *,
                  prediction: str = "eps", variance: str = "fixed_small",
                  clip_denoised: bool = True) -> dict[str, jax.Array]:
  """total_bpd [B] = prior + sum_t vb[:, t]; vb [B,T] (vb[:, 0] is L_0), mse / xstart_mse [B,T].

  One `lax.scan` over t = T-1 .. 0; the noise at step t is drawn from fold_in(key, t).
  """
  check_choice("prediction", prediction, PREDICTIONS)
  check_choice("variance", variance, VARIANCES)
  batch = x_start.shape[0]
  check_image_and_t(x_start, jnp.zeros((batch,), jnp.int32), "x_start")

  def term(_, t_scalar):
    t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x_start.shape, x_start.dtype)
    x_t = q_sample(schedule, x_start, t, noise)
    model_output = model_fn(x_t, schedule.timestep_map[t]).astype(x_start.dtype)
    vb = vb_terms_bpd(schedule, model_output, x_start, x_t, t, prediction=prediction,
                      variance=variance, clip_denoised=clip_denoised)
    output, _ = split_learned_variance(model_output, x_t, variance)
    _, pred_eps = predict_x0_and_eps(schedule, output, x_t, t, prediction)
    return None, (vb["output"], mean_flat((vb["pred_x0"] - x_start) ** 2), mean_flat((pred_eps - noise) ** 2))

  ts = jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  _, (vb, xstart_mse, mse) = jax.lax.scan(term, None, ts)
  # The scan ran t = T-1 .. 0; flip so column t holds L_t.
  vb, xstart_mse, mse = (jnp.flip(a, axis=0).T for a in (vb, xstart_mse, mse))
  prior = prior_bpd(schedule, x_start)
  return {"total_bpd": jnp.sum(vb, axis=1) + prior, "prior_bpd": prior, "vb": vb,
          "xstart_mse": xstart_mse, "mse": mse}
