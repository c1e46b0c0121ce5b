"""diffusion_jax.diffusion.forward: q(x_t | x_0), its posterior q(x_{t-1} | x_t, x_0) and the input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as D
from diffusion_refs import SCHEDULES, T, ref_betas, ref_coefs, ref_posterior, sample_data, tb


@pytest.mark.parametrize("name", SCHEDULES)
def test_q_sample_and_q_mean_variance(name):
  x0, noise, t = sample_data()
  s = D.make_schedule(ref_betas(name, T))
  ab = ref_coefs(ref_betas(name, T))["ab"]
  ref = np.sqrt(tb(ab, t)) * x0 + np.sqrt(1 - tb(ab, t)) * noise
  got = D.q_sample(s, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  mean, var, logvar = D.q_mean_variance(s, jnp.asarray(x0, jnp.float32), jnp.asarray(t))
  np.testing.assert_allclose(mean, np.sqrt(tb(ab, t)) * x0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, 1 - tb(ab, t), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(logvar, np.log(1 - tb(ab, t)), rtol=1e-4, atol=1e-5)


def test_q_sample_at_T_is_standard_normal():
  s = D.make_schedule(D.get_beta_schedule("linear", T))
  x0 = jax.random.uniform(jax.random.key(0), (256, 8, 8, 1), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  xt = D.q_sample(s, x0, jnp.full((256,), T - 1), noise)
  assert abs(float(xt.mean())) < 0.02 and abs(float(xt.var()) - 1) < 0.02


@pytest.mark.parametrize("name", SCHEDULES)
def test_q_posterior_mean_variance(name):
  x0, noise, t = sample_data()
  betas = ref_betas(name, T)
  c = ref_coefs(betas)
  xt = np.sqrt(tb(c["ab"], t)) * x0 + np.sqrt(1 - tb(c["ab"], t)) * noise
  mean, var, logvar = D.q_posterior_mean_variance(D.make_schedule(betas), jnp.asarray(x0, jnp.float32),
                                                  jnp.asarray(xt, jnp.float32), jnp.asarray(t))
  rm, rv, rlv = ref_posterior(c, x0, xt, t.reshape(-1, 1, 1, 1))
  np.testing.assert_allclose(mean, rm, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(var, rv, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(logvar, rlv, rtol=1e-5, atol=1e-5)


def test_shape_errors():
  s = D.make_schedule(D.get_beta_schedule("linear", 100))
  x = jnp.zeros((2, 4, 4, 1))
  with pytest.raises(ValueError, match=r"t must be \[B\]=\[2\]"):
    D.q_sample(s, x, jnp.zeros((3,), jnp.int32), x)
  with pytest.raises(ValueError, match=r"x_start must be \[B,H,W,C\], got shape \(2, 4\)"):
    D.q_sample(s, jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="integer"):
    D.q_sample(s, x, jnp.zeros((2,)), x)
  with pytest.raises(ValueError, match=r"noise shape \(2, 4, 4, 2\) must equal x_start shape \(2, 4, 4, 1\)"):
    D.q_sample(s, x, jnp.zeros((2,), jnp.int32), jnp.zeros((2, 4, 4, 2)))
  with pytest.raises(ValueError, match=r"x_start shape \(2, 4, 4, 2\) must equal x_t shape \(2, 4, 4, 1\)"):
    D.q_posterior_mean_variance(s, jnp.zeros((2, 4, 4, 2)), x, jnp.zeros((2,), jnp.int32))
