"""Float64 numpy references for the diffusion math tests, written from the papers, not from diffusion_jax."""

import numpy as np

T = 1000
SCHEDULES = ("linear", "cosine")


def cosine_f(t, T):
  """IDDPM eq. 17: f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008; alpha_bar(t) = f(t) / f(0)."""
  return np.cos((np.asarray(t, np.float64) / T + 0.008) / 1.008 * np.pi / 2) ** 2


def ref_betas(name, T):
  scale = 1000 / T
  if name == "linear":  # DDPM sec. 4, rescaled by 1000/T as IDDPM does
    return np.linspace(1e-4 * scale, 0.02 * scale, T)
  if name == "cosine":  # IDDPM eq. 17 turned into betas, clipped at 0.999
    return np.array([min(1 - cosine_f(i + 1, T) / cosine_f(i, T), 0.999) for i in range(T)])
  if name == "sigmoid":  # GeoDiff: a sigmoid over [-6, 6] between the linear endpoints
    return 1e-4 * scale + (0.02 - 1e-4) * scale / (1 + np.exp(-np.linspace(-6, 6, T)))
  if name == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
    return np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T) ** 2
  raise KeyError(name)


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


def ref_pred_x0(c, xt, t, out, prediction):
  ab = tb(c["ab"], t)
  if prediction == "eps":
    return (xt - np.sqrt(1 - ab) * out) / np.sqrt(ab)
  if prediction == "x0":
    return out
  return np.sqrt(ab) * xt - np.sqrt(1 - ab) * out  # v


def tb(a, t):  # [B] -> [B,1,1,1]
  return np.asarray(a)[t].reshape(-1, 1, 1, 1)


def sample_data():
  """x0 [4,4,4,3] in [-1,1], noise, and timesteps at both ends and the middle of T=1000."""
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (4, 4, 4, 3))
  noise = rng.standard_normal(x0.shape)
  t = np.array([0, 1, 500, T - 1])
  return x0, noise, t
