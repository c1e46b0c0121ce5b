"""diffusion_jax.diffusion.schedules: beta schedules, the Schedule's coefficients and respacing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as D
from diffusion_refs import SCHEDULES, T, cosine_f, ref_betas, ref_coefs


@pytest.mark.parametrize("name", SCHEDULES)
def test_betas_match_reference(name):
  np.testing.assert_allclose(D.get_beta_schedule(name, T), ref_betas(name, T), rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(D.get_beta_schedule(name, 200), ref_betas(name, 200), rtol=1e-12, atol=1e-15)


def ref_alphas_cumprod(name, T):
  """alpha_bar_t for t = 0..T-1 from each paper's own formula, in float64."""
  if name == "cosine":
    # IDDPM eq. 17 directly: alpha_bar = f(t+1) / f(0) (index t is the (t+1)-th step); only the last beta
    # reaches the 0.999 clip, so there alpha_bar_{T-1} = alpha_bar_{T-2} * (1 - 0.999).
    ab = cosine_f(np.arange(1, T + 1), T) / cosine_f(0, T)
    assert 1 - ab[-1] / ab[-2] > 0.999 and np.all(1 - ab[1:-1] / ab[:-2] < 0.999)
    ab[-1] = ab[-2] * (1 - 0.999)
    return ab
  # DDPM sec. 2: alpha_bar_t = prod_{s <= t} (1 - beta_s), summed in log space here.
  return np.exp(np.cumsum(np.log1p(-ref_betas(name, T))))


@pytest.mark.parametrize("name", D.BETA_SCHEDULES)
def test_alphas_cumprod_match_reference_and_decrease_in_unit_interval(name):
  ref = ref_alphas_cumprod(name, T)
  assert np.all(np.diff(ref) < 0) and ref[0] < 1 and ref[-1] > 0
  ab = np.asarray(D.make_schedule(D.get_beta_schedule(name, T), dtype=jnp.float32).alphas_cumprod)
  np.testing.assert_allclose(ab, ref, rtol=1e-6, atol=0)
  assert np.all(np.diff(ab) < 0) and np.all((ab > 0) & (ab < 1))


def test_scaled_linear_and_sigmoid_endpoints():
  b = D.get_beta_schedule("scaled_linear", T)
  np.testing.assert_allclose([b[0], b[-1]], [0.00085, 0.012], rtol=1e-12)
  s = D.get_beta_schedule("sigmoid", T)
  ref = 1e-4 + (0.02 - 1e-4) / (1 + np.exp(-np.linspace(-6, 6, T)))  # GeoDiff's sigmoid schedule
  np.testing.assert_allclose(s, ref, rtol=1e-12)
  assert np.all(np.diff(s) > 0)
  for name in ("scaled_linear", "sigmoid"):
    np.testing.assert_allclose(D.get_beta_schedule(name, 200), ref_betas(name, 200), rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_fields_match_reference(name):
  betas = ref_betas(name, T)
  s = D.make_schedule(betas, dtype=jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  c = ref_coefs(betas)
  for field, ref in [("alphas_cumprod", c["ab"]), ("alphas_cumprod_prev", c["ab_prev"]),
                     ("posterior_variance", c["post_var"]), ("posterior_log_variance_clipped", c["post_logvar"]),
                     ("posterior_mean_coef1", c["c1"]), ("posterior_mean_coef2", c["c2"])]:
    np.testing.assert_allclose(np.asarray(getattr(s, field)), ref, rtol=2e-6, atol=1e-7, err_msg=field)


def test_bad_schedule_inputs():
  with pytest.raises(ValueError, match=r"unknown beta schedule 'quadratic'.*linear"):
    D.get_beta_schedule("quadratic", T)
  with pytest.raises(ValueError, match="num_timesteps must be an int >= 2, got 1"):
    D.get_beta_schedule("linear", 1)
  with pytest.raises(ValueError, match="num_timesteps"):
    D.make_schedule([0.1])
  with pytest.raises(ValueError, match="linear schedule at T=10 reaches beta=2"):
    D.get_beta_schedule("linear", 10)


def test_respacing_keeps_alphas_cumprod():
  betas = ref_betas("linear", T)
  use = D.space_timesteps(T, 50)
  assert use[0] == 0 and use[-1] == T - 1 and len(use) == 50
  np.testing.assert_array_equal(D.space_timesteps(T, 5), [0, 250, 500, 749, 999])  # round(linspace(0, 999, 5))
  s = D.respace_schedule(betas, use)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref_alphas_cumprod("linear", T)[use], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(s.timestep_map), use)
  with pytest.raises(ValueError, match="num_steps must be an int in"):
    D.space_timesteps(T, 0)
