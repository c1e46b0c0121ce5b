"""Gaussian diffusion math as pure functions over arrays and a `Schedule` pytree."""

from diffusion_jax.diffusion.bpd import calc_bpd_loop
from diffusion_jax.diffusion.forward import q_mean_variance, q_posterior_mean_variance, q_sample
from diffusion_jax.diffusion.guidance import check_guidance_scale, drop_labels, guided_model_fn
from diffusion_jax.diffusion.losses import (LOSS_TYPES, LossHistory, diffusion_loss,
                                            discretized_gaussian_log_likelihood, init_loss_history,
                                            min_snr_weight, normal_kl, prior_bpd, sample_timesteps,
                                            snr, update_loss_history, vb_terms_bpd)
from diffusion_jax.diffusion.param import (PREDICTIONS, VARIANCES, get_v, p_mean_variance,
                                           predict_eps_from_v, predict_eps_from_x0, predict_x0_from_eps,
                                           predict_x0_from_v)
from diffusion_jax.diffusion.inpaint import inpaint_loop, repaint_path
from diffusion_jax.diffusion.samplers import (SAMPLERS, SPACINGS, ddim_invert, ddim_sample_loop, discrete_sigmas,
                                              num_function_evals, respaced_for_ancestral, sample, sample_loop,
                                              sampling_grid, timestep_grid)
from diffusion_jax.diffusion.schedules import (BETA_SCHEDULES, Schedule, get_beta_schedule, make_schedule,
                                               respace_betas, respace_schedule, space_timesteps)
