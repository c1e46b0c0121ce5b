"""diffusion_jax.diffusion.bpd: bits per dimension, the full variational bound over every timestep."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion as D
from diffusion_refs import ref_betas, ref_coefs, ref_dll, ref_kl


def test_bpd_loop_oracle_model_has_zero_kl_terms():
  """An oracle that returns the true noise makes the model posterior equal q's: L_t = 0 for t >= 1."""
  Tn = 50
  betas = ref_betas("linear", Tn)
  s = D.make_schedule(betas)
  c = ref_coefs(betas)
  rng = np.random.default_rng(5)
  x0 = np.round(rng.uniform(-1, 1, (3, 4, 4, 1)) * 127.5) / 127.5
  key = jax.random.key(7)
  # The loop draws eps at step t from fold_in(key, t); the oracle recovers it exactly from x_t.
  oracle = lambda x, t: (x - jnp.sqrt(s.alphas_cumprod[t])[:, None, None, None] * jnp.asarray(x0, jnp.float32)) \
      / jnp.sqrt(1 - s.alphas_cumprod[t])[:, None, None, None]
  out = D.calc_bpd_loop(s, oracle, jnp.asarray(x0, jnp.float32), key, clip_denoised=False)
  assert out["vb"].shape == (3, Tn) and out["total_bpd"].shape == (3,)
  np.testing.assert_allclose(out["vb"][:, 1:], 0.0, atol=2e-4)
  np.testing.assert_allclose(out["mse"], 0.0, atol=1e-6)
  np.testing.assert_allclose(out["xstart_mse"][:, 1:], 0.0, atol=1e-6)
  # By hand: prior KL(q(x_T|x0) || N(0,1)) and the decoder term with mean = posterior mean at t=0 = x0.
  abT = c["ab"][-1]
  prior = ref_kl(np.sqrt(abT) * x0, np.log(1 - abT), 0, 0).mean(axis=(1, 2, 3)) / np.log(2)
  dec = -ref_dll(x0, x0, 0.5 * c["post_logvar"][0]).mean(axis=(1, 2, 3)) / np.log(2)
  np.testing.assert_allclose(out["prior_bpd"], prior, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out["vb"][:, 0], dec, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(out["total_bpd"], prior + dec, rtol=1e-3, atol=1e-3)
