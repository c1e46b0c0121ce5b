"""diffusion_jax.diffusion.samplers: every sampler on Gaussian data (analytic denoiser and ODE flow), timestep grids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import diffusion as D
from diffusion_jax.parallel.mesh import batch_sharding, make_mesh

MU, STD = 0.3, 0.2  # data x0 ~ N(MU, STD^2) in each of 2 dimensions
N = 2000
SCHED = D.make_schedule(D.get_beta_schedule("linear", 1000))
ODE_SAMPLERS = ("ddim", "dpmpp_2m", "euler", "heun")


def exact_eps(x, t):
  """E[eps | x_t] for Gaussian data: x_t ~ N(sqrt(a) MU, a STD^2 + 1 - a)."""
  a = SCHED.alphas_cumprod[t][:, None, None, None]
  return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * STD ** 2 + 1 - a)


def exact_ode_solution(key):
  """The probability-flow ODE maps x_T to MU + STD * (x_ve - MU) / sqrt(STD^2 + sigma_max^2) (VE view)."""
  x_T = jax.random.normal(jax.random.split(key)[0], (N, 1, 1, 2))
  a_T = float(SCHED.alphas_cumprod[-1])
  x_ve = np.asarray(x_T) / np.sqrt(a_T)
  return MU + STD * (x_ve - MU) / np.sqrt(STD ** 2 + (1 - a_T) / a_T)


def run(sampler, num_steps, key=jax.random.key(0), **kw):
  return np.asarray(jax.jit(lambda k: D.sample(SCHED, exact_eps, (N, 1, 1, 2), k, sampler=sampler,
                                               num_steps=num_steps, clip_denoised=False, **kw))(key))


@pytest.mark.parametrize("sampler", ODE_SAMPLERS)
def test_ode_samplers_converge_to_the_exact_flow(sampler):
  target = exact_ode_solution(jax.random.key(0))
  errors = [np.abs(run(sampler, k) - target).mean() for k in (5, 20, 100)]
  assert errors[2] < errors[1] < errors[0], errors
  second_order = sampler in ("dpmpp_2m", "heun")
  assert errors[2] < (1e-3 if second_order else 1.5e-2), errors
  out = run(sampler, 100)
  assert abs(out.mean() - MU) < 0.02 and abs(out.std() - STD) < 0.02
  assert stats.kstest((out.ravel() - MU) / STD, "norm").pvalue > 1e-3


def test_ancestral_ddpm_matches_the_data_distribution():
  out = run("ddpm", None)
  assert abs(out.mean() - MU) < 0.02 and abs(out.std() - STD) < 0.02, (out.mean(), out.std())
  assert stats.kstest((out.ravel() - MU) / STD, "norm").pvalue > 1e-3


def test_respaced_ddpm_variances_bracket_the_truth():
  """On 100 respaced steps beta_tilde is too small and beta too large (IDDPM sec. 3.1): the truth lies between."""
  small, large = run("ddpm", 100, variance="fixed_small"), run("ddpm", 100, variance="fixed_large")
  assert abs(small.mean() - MU) < 0.02 and abs(large.mean() - MU) < 0.02
  assert small.std() < STD < large.std(), (small.std(), large.std())


def test_ddim_is_euler_on_the_same_grid():
  """DDIM (eta=0) is Euler's method on x / sqrt(alpha_bar) over sigma (Karras et al. 2022, sec. 4)."""
  np.testing.assert_allclose(run("ddim", 20, spacing="karras"), run("euler", 20), atol=1e-4)


def test_ddim_eta_one_is_stochastic_and_matches_the_distribution():
  a, b = run("ddim", None, eta=1.0), run("ddim", None, jax.random.key(1), eta=1.0)
  assert not np.allclose(a, b)
  assert abs(a.mean() - MU) < 0.02 and abs(a.std() - STD) < 0.02


def test_ddim_eta_zero_is_deterministic_and_inversion_round_trips():
  np.testing.assert_array_equal(run("ddim", 20), run("ddim", 20))
  x0 = MU + STD * jax.random.normal(jax.random.key(3), (64, 1, 1, 2))
  errors = []
  for k in (100, 250):
    grid = D.timestep_grid(SCHED, k)
    x_T = D.ddim_invert(SCHED, exact_eps, x0, grid)
    assert float(jnp.std(x_T)) > 0.9  # it really went to noise
    back = D.ddim_sample_loop(SCHED, exact_eps, x_T, jax.random.key(0), grid, clip_denoised=False)
    errors.append(float(jnp.abs(back - x0).mean()))
  # Inversion approximates eps(x_t) by eps(x_{t-1}): first order, so the error falls with the steps.
  assert errors[1] < 0.01 and errors[1] < errors[0], errors


@pytest.mark.parametrize("sampler", D.SAMPLERS)
@pytest.mark.parametrize("num_steps", [3, 10])
def test_nfe_matches_the_promise(sampler, num_steps):
  calls = []

  def counting(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return exact_eps(x, t)

  jax.block_until_ready(D.sample(SCHED, counting, (2, 1, 1, 1), jax.random.key(0), sampler=sampler,
                                 num_steps=num_steps))
  jax.effects_barrier()
  assert len(calls) == D.num_function_evals(sampler, num_steps)


@pytest.mark.parametrize("spacing", D.SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 2, 7, 50, 1000])
def test_timestep_grids(spacing, num_steps):
  g = D.timestep_grid(SCHED, num_steps, spacing)
  assert len(g) == num_steps and g[0] == 999 and np.all(np.diff(g) < 0) and g[-1] >= 0
  if num_steps == 1000:
    np.testing.assert_array_equal(g, np.arange(999, -1, -1))


def test_timestep_grid_values():
  """Each spacing against its formula, written here in float64 from the papers."""
  expected = {("uniform", 5): [999, 749, 500, 250, 0],  # round(linspace(0, T-1, K)) (IDDPM)
              ("trailing", 4): [999, 749, 499, 249],  # round(arange(T, 0, -T/K)) - 1 (Lin et al. 2024 table 2)
              ("quadratic", 5): [999, 562, 250, 62, 0]}  # round(linspace(0, sqrt(T-1), K)^2) (DDIM sec. 5)
  for (spacing, k), grid in expected.items():
    np.testing.assert_array_equal(D.timestep_grid(SCHED, k, spacing), grid, err_msg=spacing)
  alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # DDPM's linear schedule
  log_sigma = 0.5 * np.log((1 - alphas_cumprod) / alphas_cumprod)  # EDM table 1: sigma = sqrt((1-ab)/ab)
  nearest = lambda target: np.abs(log_sigma[None] - target[:, None]).argmin(axis=1)
  for k in (5, 20):
    ramp, rho = np.linspace(0, 1, k), 7.0
    lo, hi = np.exp(log_sigma[0]) ** (1 / rho), np.exp(log_sigma[-1]) ** (1 / rho)
    karras = nearest(rho * np.log(hi + ramp * (lo - hi)))  # EDM eq. 5, quantised to the nearest discrete sigma
    logsnr = nearest(np.linspace(log_sigma[-1], log_sigma[0], k))  # uniform in log-SNR (DPM-Solver sec. 3.3)
    np.testing.assert_array_equal(D.timestep_grid(SCHED, k, "karras"), karras)
    np.testing.assert_array_equal(D.timestep_grid(SCHED, k, "logsnr"), logsnr)
    assert karras[0] == 999 and karras[-1] == 0 and len(set(karras)) == k


def test_sharded_sampling_equals_unsharded():
  outs = []
  for devices in (jax.devices()[:1], jax.devices()):
    sharding = batch_sharding(make_mesh(devices))
    fn = jax.jit(lambda k: D.sample(SCHED, lambda x, t: exact_eps(jax.lax.with_sharding_constraint(x, sharding), t),
                                    (16, 2, 2, 1), k, sampler="dpmpp_2m", num_steps=10), out_shardings=sharding)
    outs.append(np.asarray(fn(jax.random.key(5))))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_bad_sampler_arguments():
  kw = dict(shape=(2, 1, 1, 1), key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"unknown sampler 'plms'; choose one of \('ddpm', 'ddim'"):
    D.sample(SCHED, exact_eps, sampler="plms", **kw)
  for bad in (0, 1001, 2.5):
    with pytest.raises(ValueError, match=f"num_steps must be None or an int in \\[1, 1000\\], got {bad}"):
      D.sample(SCHED, exact_eps, num_steps=bad, **kw)
  with pytest.raises(ValueError, match="eta must be a number >= 0, got 'high'"):
    D.sample(SCHED, exact_eps, sampler="ddim", eta="high", **kw)
  with pytest.raises(ValueError, match=r"unknown spacing 'log'"):
    D.sample(SCHED, exact_eps, spacing="log", **kw)
