"""diffusion_jax.diffusion.param: the eps / x0 / v conversions and the reverse process p(x_{t-1} | x_t)."""

import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as D
from diffusion_refs import SCHEDULES, T, ref_betas, ref_coefs, ref_posterior, ref_pred_x0, sample_data, tb


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("prediction", D.PREDICTIONS)
@pytest.mark.parametrize("variance", D.VARIANCES)
def test_p_mean_variance(name, prediction, variance):
  x0, noise, t = sample_data()
  betas = ref_betas(name, T)
  c = ref_coefs(betas)
  rng = np.random.default_rng(1)
  xt = rng.standard_normal(x0.shape)
  out = rng.standard_normal(x0.shape) * 0.5
  var_out = rng.uniform(-1, 1, x0.shape)
  model_output = np.concatenate([out, var_out], -1) if variance == "learned_range" else out
  got = D.p_mean_variance(D.make_schedule(betas), jnp.asarray(model_output, jnp.float32), jnp.asarray(xt, jnp.float32),
                          jnp.asarray(t), prediction=prediction, variance=variance, clip_denoised=True)
  px0 = np.clip(ref_pred_x0(c, xt, t, out, prediction), -1, 1)
  mean, post_var, post_logvar = ref_posterior(c, px0, xt, t.reshape(-1, 1, 1, 1))
  if variance == "fixed_small":
    var, logvar = post_var, post_logvar
  elif variance == "fixed_large":
    logvar = np.log(np.concatenate([[c["post_var"][1]], betas[1:]]))[t].reshape(-1, 1, 1, 1)
    var = np.exp(logvar)
  else:  # IDDPM eq. 15
    frac = (var_out + 1) / 2
    logvar = frac * np.log(tb(betas, t)) + (1 - frac) * post_logvar
    var = np.exp(logvar)
  np.testing.assert_allclose(got["pred_x0"], px0, rtol=1e-4, atol=2e-4)
  np.testing.assert_allclose(got["mean"], mean, rtol=1e-4, atol=2e-4)
  np.testing.assert_allclose(np.broadcast_to(got["log_variance"], logvar.shape), np.broadcast_to(logvar, logvar.shape),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.broadcast_to(got["variance"], var.shape), var, rtol=1e-4, atol=1e-9)


def test_parameterizations_match_reference_and_round_trip():
  x0, noise, t = sample_data()
  ab = tb(ref_coefs(ref_betas("cosine", T))["ab"], t)
  s = D.make_schedule(D.get_beta_schedule("cosine", T))
  # Salimans & Ho 2022, sec. 4: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0.
  np.testing.assert_allclose(D.get_v(s, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32)),
                             np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0, rtol=1e-5, atol=1e-5)
  x0, noise, t = jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32), jnp.asarray(t)
  xt = D.q_sample(s, x0, t, noise)
  v = D.get_v(s, x0, t, noise)
  np.testing.assert_allclose(D.predict_x0_from_v(s, xt, t, v), x0, atol=1e-4)
  np.testing.assert_allclose(D.predict_eps_from_v(s, xt, t, v), noise, atol=1e-4)
  np.testing.assert_allclose(D.predict_eps_from_x0(s, xt, t[:], x0)[1:], noise[1:], atol=2e-3)
  np.testing.assert_allclose(D.predict_x0_from_eps(s, xt, t, noise)[:3], x0[:3], atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_inputs_keep_their_dtype(dtype):
  x0, noise, t = sample_data()
  s = D.make_schedule(D.get_beta_schedule("linear", T))
  x0, noise, t = jnp.asarray(x0, dtype), jnp.asarray(noise, dtype), jnp.asarray(t)
  xt = D.q_sample(s, x0, t, noise)
  assert xt.dtype == dtype
  out = D.p_mean_variance(s, noise, xt, t)
  assert out["mean"].dtype == dtype and bool(jnp.all(jnp.isfinite(out["mean"].astype(jnp.float32))))
  # The same inputs upcast: low precision costs only the rounding of the output.
  ref = D.p_mean_variance(s, noise.astype(jnp.float32), xt.astype(jnp.float32), t)["mean"]
  tol = 1e-6 if dtype == jnp.float32 else 1e-2  # bfloat16: 8 bits of mantissa
  np.testing.assert_allclose(np.asarray(out["mean"], np.float32), ref, rtol=tol, atol=tol)


def test_p_mean_variance_argument_errors():
  s = D.make_schedule(D.get_beta_schedule("linear", 100))
  x = jnp.zeros((2, 4, 4, 1))
  t = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match=r"unknown prediction 'score'.*eps"):
    D.p_mean_variance(s, x, x, t, prediction="score")
  with pytest.raises(ValueError, match=r"unknown variance 'learned'.*learned_range"):
    D.p_mean_variance(s, x, x, t, variance="learned")
  with pytest.raises(ValueError, match="2\\*C=2 channels"):
    D.p_mean_variance(s, x, x, t, variance="learned_range")
