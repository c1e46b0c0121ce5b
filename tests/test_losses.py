"""diffusion_jax.diffusion.losses: KL and decoder likelihood, VLB terms, the training losses, timestep sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as D
from diffusion_refs import (SCHEDULES, T, ref_betas, ref_coefs, ref_dll, ref_kl, ref_posterior, ref_pred_x0,
                            sample_data, tb)


def test_normal_kl_matches_reference_and_is_zero_for_identical():
  rng = np.random.default_rng(2)
  m1, m2, l1, l2 = (rng.standard_normal(50) for _ in range(4))
  np.testing.assert_allclose(D.normal_kl(m1, l1, m2, l2), ref_kl(m1, l1, m2, l2), rtol=1e-5, atol=1e-6)
  same = D.normal_kl(jnp.asarray(m1), jnp.asarray(l1), jnp.asarray(m1), jnp.asarray(l1))
  np.testing.assert_allclose(same, 0, atol=1e-7)


def test_discretized_likelihood_matches_reference_and_sums_to_one():
  x = np.linspace(-1, 1, 256)
  for mean, log_scale in [(0.0, -1.0), (0.3, -3.0), (-0.9, -5.0), (0.5, 0.5)]:
    got = np.asarray(D.discretized_gaussian_log_likelihood(jnp.asarray(x, jnp.float32), mean, log_scale))
    ref = ref_dll(x, mean, log_scale)
    # float32 differences of CDFs near 1 lose digits for bins of mass < 1e-4; compare those as probabilities.
    big = ref > np.log(1e-4)
    np.testing.assert_allclose(got[big], ref[big], rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(np.exp(got[~big]), np.exp(ref[~big]), atol=1e-6)
    np.testing.assert_allclose(np.exp(got.astype(np.float64)).sum(), 1.0, atol=1e-4)


@pytest.mark.parametrize("name", SCHEDULES)
def test_vb_terms_match_reference(name):
  x0, noise, t = sample_data()
  x0 = np.round((x0 + 1) * 127.5) / 127.5 - 1  # 8-bit data
  betas = ref_betas(name, T)
  c = ref_coefs(betas)
  ab = tb(c["ab"], t)
  xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
  eps_hat = noise + 0.1 * np.random.default_rng(3).standard_normal(x0.shape)
  got = D.vb_terms_bpd(D.make_schedule(betas), jnp.asarray(eps_hat, jnp.float32), jnp.asarray(x0, jnp.float32),
                       jnp.asarray(xt, jnp.float32), jnp.asarray(t), clip_denoised=False)["output"]
  t4 = t.reshape(-1, 1, 1, 1)
  tm, _, tlv = ref_posterior(c, x0, xt, t4)
  pm, _, plv = ref_posterior(c, ref_pred_x0(c, xt, t, eps_hat, "eps"), xt, t4)
  kl = ref_kl(tm, tlv, pm, plv).mean(axis=(1, 2, 3)) / np.log(2)
  nll = -ref_dll(x0, pm, 0.5 * plv).mean(axis=(1, 2, 3)) / np.log(2)
  np.testing.assert_allclose(got, np.where(t == 0, nll, kl), rtol=2e-3, atol=1e-4)


def test_loss_types_and_min_snr():
  s = D.make_schedule(D.get_beta_schedule("linear", T))
  rng = np.random.default_rng(4)
  x0 = jnp.asarray(rng.uniform(-1, 1, (4, 4, 4, 1)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  t = jnp.array([0, 10, 500, 999])
  zero = lambda x, tt: jnp.zeros_like(x)
  out = D.diffusion_loss(s, zero, x0, t, noise)
  np.testing.assert_allclose(out["loss"], np.mean(np.asarray(noise) ** 2, axis=(1, 2, 3)), rtol=1e-5)
  # v target: v = sqrt(ab) eps - sqrt(1-ab) x0
  ab = tb(ref_coefs(ref_betas("linear", T))["ab"], np.asarray(t))
  v = np.sqrt(ab) * np.asarray(noise) - np.sqrt(1 - ab) * np.asarray(x0)
  np.testing.assert_allclose(D.diffusion_loss(s, zero, x0, t, noise, prediction="v")["loss"],
                             np.mean(v ** 2, axis=(1, 2, 3)), rtol=1e-4)
  snr = ab.ravel() / (1 - ab.ravel())
  np.testing.assert_allclose(D.min_snr_weight(s, t, 5.0, "eps"), np.minimum(snr, 5) / snr, rtol=1e-4)
  w = D.diffusion_loss(s, zero, x0, t, noise, snr_gamma=5.0)["loss"]
  np.testing.assert_allclose(w, out["loss"] * np.minimum(snr, 5) / snr, rtol=1e-4)
  # hybrid = mse + 1e-3 * T * L_t, and its vb term must not send gradient to the mean output.
  two = lambda x, tt: jnp.concatenate([x * 0.1, jnp.zeros_like(x)], -1)
  h = D.diffusion_loss(s, two, x0, t, noise, loss_type="hybrid", variance="learned_range")
  np.testing.assert_allclose(h["loss"], h["mse"] + 1e-3 * h["vb"], rtol=1e-6)

  def vb_only(a):
    f = lambda x, tt: jnp.concatenate([a * x, jnp.zeros_like(x)], -1)
    return jnp.sum(D.diffusion_loss(s, f, x0, t, noise, loss_type="hybrid", variance="learned_range")["vb"])
  assert float(jax.grad(vb_only)(0.1)) == 0.0
  with pytest.raises(ValueError, match="learned_range"):
    D.diffusion_loss(s, zero, x0, t, noise, loss_type="hybrid")
  with pytest.raises(ValueError, match=r"unknown loss_type 'l1'"):
    D.diffusion_loss(s, zero, x0, t, noise, loss_type="l1")


def test_vlb_loss_gradient_is_finite():
  x0, noise, t = (jnp.asarray(a) for a in sample_data())
  x0, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
  s = D.make_schedule(D.get_beta_schedule("linear", T))

  def loss(w):
    return jnp.mean(D.diffusion_loss(s, lambda x, tt: w * x, x0, t, noise, loss_type="vlb")["loss"])
  g = jax.grad(loss)(jnp.float32(0.3))
  assert np.isfinite(float(g)) and float(g) != 0.0


def test_timestep_sampling_uniform_and_importance():
  t, w = D.sample_timesteps(jax.random.key(0), 20000, 10)
  counts = np.bincount(np.asarray(t), minlength=10)
  assert counts.min() > 1800 and np.all(np.asarray(w) == 1)
  h = D.init_loss_history(10, 2)
  # Before every timestep has a full history, importance sampling falls back to uniform.
  _, w = D.sample_timesteps(jax.random.key(0), 100, 10, method="importance", history=h)
  np.testing.assert_allclose(w, 1.0)
  losses = np.arange(1, 11, dtype=np.float32)
  for _ in range(2):
    h = D.update_loss_history(h, jnp.arange(10), jnp.asarray(losses))
  assert np.all(np.asarray(h.counts) == 2)
  t, w = D.sample_timesteps(jax.random.key(1), 20000, 10, method="importance", history=h)
  freq = np.bincount(np.asarray(t), minlength=10) / 20000
  expected = losses / losses.sum() * (1 - 1e-3) + 1e-4
  np.testing.assert_allclose(freq, expected, atol=0.015)
  np.testing.assert_allclose(np.asarray(w), 1 / (10 * expected[np.asarray(t)]), rtol=1e-4)


def test_loss_history_keeps_the_last_k_losses_per_timestep():
  h = D.update_loss_history(D.init_loss_history(3, 2), jnp.array([0, 0, 0, 2]), jnp.array([1.0, 2.0, 3.0, 7.0]))
  np.testing.assert_array_equal(np.asarray(h.losses), [[2, 3], [0, 0], [0, 7]])  # oldest first, 1 dropped
  np.testing.assert_array_equal(np.asarray(h.counts), [2, 0, 1])  # saturating at K=2


def test_timestep_sampling_argument_errors():
  with pytest.raises(ValueError, match=r"unknown timestep sampling method 'ddim'; choose one of \('uniform'"):
    D.sample_timesteps(jax.random.key(0), 4, 10, method="ddim")
  with pytest.raises(ValueError, match=r"method='importance' needs a LossHistory"):
    D.sample_timesteps(jax.random.key(0), 4, 10, method="importance")
  with pytest.raises(TypeError, match="sampler"):
    D.sample_timesteps(jax.random.key(0), 4, 10, sampler="uniform")  # the old keyword is gone
