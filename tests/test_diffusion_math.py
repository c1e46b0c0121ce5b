"""The diffusion math against float64 numpy references written independently here."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as D

T = 1000
SCHEDULES = ("linear", "cosine")


# ---- float64 numpy references (from the papers, not from the code under test) ----

def ref_betas(name, T):
  if name == "linear":
    return np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
  f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
  return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])


def ref_coefs(betas):
  ab = np.cumprod(1 - betas)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  post_var = betas * (1 - ab_prev) / (1 - ab)
  return dict(ab=ab, ab_prev=ab_prev, post_var=post_var,
              post_logvar=np.log(np.concatenate([[post_var[1]], post_var[1:]])),
              c1=betas * np.sqrt(ab_prev) / (1 - ab), c2=(1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab))


def ref_kl(m1, lv1, m2, lv2):
  return 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def ref_cdf(x):
  return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def ref_dll(x, mean, log_scale):
  up, lo = ref_cdf((x - mean + 1 / 255) / np.exp(log_scale)), ref_cdf((x - mean - 1 / 255) / np.exp(log_scale))
  p = np.where(x < -0.999, up, np.where(x > 0.999, 1 - lo, up - lo))
  return np.log(np.maximum(p, 1e-12))


def ref_posterior(c, x0, xt, t):
  return c["c1"][t] * x0 + c["c2"][t] * xt, c["post_var"][t], c["post_logvar"][t]


def tb(a, t):  # [B] -> [B,1,1,1]
  return np.asarray(a)[t].reshape(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (4, 4, 4, 3))
  noise = rng.standard_normal(x0.shape)
  t = np.array([0, 1, 500, T - 1])
  return x0, noise, t


# ---- schedules ----

@pytest.mark.parametrize("name", SCHEDULES)
def test_betas_match_reference(name):
  np.testing.assert_allclose(D.get_beta_schedule(name, T), ref_betas(name, T), rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(D.get_beta_schedule(name, 200), ref_betas(name, 200), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", D.BETA_SCHEDULES)
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(name):
  ab = np.asarray(D.make_schedule(D.get_beta_schedule(name, T), dtype=jnp.float32).alphas_cumprod)
  ab64 = np.cumprod(1 - D.get_beta_schedule(name, T))
  assert np.all(np.diff(ab64) < 0) and ab64[0] < 1 and ab64[-1] > 0
  assert np.all((ab > 0) & (ab < 1))


def test_scaled_linear_and_sigmoid_endpoints():
  b = D.get_beta_schedule("scaled_linear", T)
  np.testing.assert_allclose([b[0], b[-1]], [0.00085, 0.012], rtol=1e-12)
  s = D.get_beta_schedule("sigmoid", T)
  ref = 1e-4 + (0.02 - 1e-4) / (1 + np.exp(-np.linspace(-6, 6, T)))  # GeoDiff's sigmoid schedule
  np.testing.assert_allclose(s, ref, rtol=1e-12)
  assert np.all(np.diff(s) > 0)


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


# ---- forward process ----

@pytest.mark.parametrize("name", SCHEDULES)
def test_q_sample_and_q_mean_variance(name, data):
  x0, noise, t = data
  s = D.make_schedule(ref_betas(name, T))
  ab = np.cumprod(1 - ref_betas(name, T))
  ref = np.sqrt(tb(ab, t)) * x0 + np.sqrt(1 - tb(ab, t)) * noise
  np.testing.assert_allclose(D.q_sample(s, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32)),
                             ref, rtol=1e-5, atol=1e-5)
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
def test_q_posterior_mean_variance(name, data):
  x0, noise, t = data
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
  with pytest.raises(ValueError, match=r"unknown prediction 'score'.*eps"):
    D.p_mean_variance(s, x, x, jnp.zeros((2,), jnp.int32), prediction="score")
  with pytest.raises(ValueError, match=r"unknown variance 'learned'.*learned_range"):
    D.p_mean_variance(s, x, x, jnp.zeros((2,), jnp.int32), variance="learned")
  with pytest.raises(ValueError, match="2\\*C=2 channels"):
    D.p_mean_variance(s, x, x, jnp.zeros((2,), jnp.int32), variance="learned_range")


# ---- reverse process ----

def ref_pred_x0(c, xt, t, out, prediction):
  ab = tb(c["ab"], t)
  if prediction == "eps":
    return (xt - np.sqrt(1 - ab) * out) / np.sqrt(ab)
  if prediction == "x0":
    return out
  return np.sqrt(ab) * xt - np.sqrt(1 - ab) * out  # v


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("prediction", D.PREDICTIONS)
@pytest.mark.parametrize("variance", D.VARIANCES)
def test_p_mean_variance(name, prediction, variance, data):
  x0, noise, t = data
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
  np.testing.assert_allclose(np.broadcast_to(got["log_variance"], logvar.shape), np.broadcast_to(logvar, logvar.shape), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.broadcast_to(got["variance"], var.shape), var, rtol=1e-4, atol=1e-9)


def test_parameterizations_round_trip(data):
  x0, noise, t = data
  s = D.make_schedule(D.get_beta_schedule("cosine", T))
  x0, noise, t = jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32), jnp.asarray(t)
  xt = D.q_sample(s, x0, t, noise)
  v = D.get_v(s, x0, t, noise)
  np.testing.assert_allclose(D.predict_x0_from_v(s, xt, t, v), x0, atol=1e-4)
  np.testing.assert_allclose(D.predict_eps_from_v(s, xt, t, v), noise, atol=1e-4)
  np.testing.assert_allclose(D.predict_eps_from_x0(s, xt, t[:], x0)[1:], noise[1:], atol=2e-3)
  np.testing.assert_allclose(D.predict_x0_from_eps(s, xt, t, noise)[:3], x0[:3], atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_inputs_and_finite_gradients(dtype, data):
  x0, noise, t = data
  s = D.make_schedule(D.get_beta_schedule("linear", T))
  x0, noise, t = jnp.asarray(x0, dtype), jnp.asarray(noise, dtype), jnp.asarray(t)
  xt = D.q_sample(s, x0, t, noise)
  assert xt.dtype == dtype
  out = D.p_mean_variance(s, noise, xt, t)
  assert out["mean"].dtype == dtype and bool(jnp.all(jnp.isfinite(out["mean"].astype(jnp.float32))))

  def loss(w):
    return jnp.mean(D.diffusion_loss(s, lambda x, tt: w * x, x0.astype(jnp.float32), t,
                                     noise.astype(jnp.float32), loss_type="vlb")["loss"])
  g = jax.grad(loss)(jnp.float32(0.3))
  assert np.isfinite(float(g))


# ---- losses ----

def test_normal_kl_matches_reference_and_is_zero_for_identical():
  rng = np.random.default_rng(2)
  m1, m2, l1, l2 = (rng.standard_normal(50) for _ in range(4))
  np.testing.assert_allclose(D.normal_kl(m1, l1, m2, l2), ref_kl(m1, l1, m2, l2), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(D.normal_kl(jnp.asarray(m1), jnp.asarray(l1), jnp.asarray(m1), jnp.asarray(l1)), 0, atol=1e-7)


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
def test_vb_terms_match_reference(name, data):
  x0, noise, t = data
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
  ab = tb(np.cumprod(1 - ref_betas("linear", T)), np.asarray(t))
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


def test_timestep_sampling_uniform_and_importance():
  t, w = D.sample_timesteps(jax.random.key(0), 20000, 10)
  counts = np.bincount(np.asarray(t), minlength=10)
  assert counts.min() > 1800 and np.all(np.asarray(w) == 1)
  h = D.init_loss_history(10, 2)
  # Before every timestep has a full history, importance sampling falls back to uniform.
  _, w = D.sample_timesteps(jax.random.key(0), 100, 10, sampler="importance", history=h)
  np.testing.assert_allclose(w, 1.0)
  losses = np.arange(1, 11, dtype=np.float32)
  for _ in range(2):
    h = D.update_loss_history(h, jnp.arange(10), jnp.asarray(losses))
  assert np.all(np.asarray(h.counts) == 2)
  t, w = D.sample_timesteps(jax.random.key(1), 20000, 10, sampler="importance", history=h)
  freq = np.bincount(np.asarray(t), minlength=10) / 20000
  expected = losses / losses.sum() * (1 - 1e-3) + 1e-4
  np.testing.assert_allclose(freq, expected, atol=0.015)
  np.testing.assert_allclose(np.asarray(w), 1 / (10 * expected[np.asarray(t)]), rtol=1e-4)


# ---- bits per dimension ----

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
  # By hand: prior KL(q(x_T|x0) || N(0,1)) and the decoder term with mean = posterior mean at t=0 = x0.
  abT = c["ab"][-1]
  prior = ref_kl(np.sqrt(abT) * x0, np.log(1 - abT), 0, 0).mean(axis=(1, 2, 3)) / np.log(2)
  dec = -ref_dll(x0, x0, 0.5 * c["post_logvar"][0]).mean(axis=(1, 2, 3)) / np.log(2)
  np.testing.assert_allclose(out["prior_bpd"], prior, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out["vb"][:, 0], dec, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(out["total_bpd"], prior + dec, rtol=1e-3, atol=1e-3)


def test_respacing_keeps_alphas_cumprod():
  betas = ref_betas("linear", T)
  use = D.space_timesteps(T, 50)
  assert use[0] == 0 and use[-1] == T - 1 and len(use) == 50
  s = D.respace_schedule(betas, use)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), np.cumprod(1 - betas)[use], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(s.timestep_map), use)
  with pytest.raises(ValueError, match="num_steps must be an int in"):
    D.space_timesteps(T, 0)
