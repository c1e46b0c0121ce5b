"""diffusion_jax.evaluation.metrics (and evaluate.load_reference_stats): FD, KID, precision/recall vs references."""

import numpy as np
import pytest
from scipy import linalg

from diffusion_jax.evaluation import feature_statistics, frechet_distance, kid


def random_cov(rng, d):
  a = rng.standard_normal((d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_scipy_sqrtm_reference():
  rng = np.random.default_rng(0)
  for d in (1, 5, 64):
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8, abs=1e-9)


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(1)
  mu, s = rng.standard_normal(8), random_cov(rng, 8)
  assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
  # A shift by delta with equal covariance costs exactly ||delta||^2.
  delta = rng.standard_normal(8)
  assert frechet_distance(mu, s, mu + delta, s) == pytest.approx(np.sum(delta ** 2), rel=1e-9)
  # Isotropic Gaussians: d (a - b)^2 for std a and b.
  assert frechet_distance(np.zeros(3), 4 * np.eye(3), np.zeros(3), np.eye(3)) == pytest.approx(3.0)


def test_feature_statistics_and_a_set_against_itself():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((4000, 4)) * [1, 2, 3, 4] + 1
  mu, sigma = feature_statistics(x)
  np.testing.assert_allclose(mu, x.mean(0))
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))
  assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
  # Two samples of the same Gaussian: FD ~ 0 up to sampling error; a shifted one: ~ shift^2 * D.
  y = rng.standard_normal((4000, 4)) * [1, 2, 3, 4] + 1
  assert frechet_distance(mu, sigma, *feature_statistics(y)) < 0.05
  assert frechet_distance(mu, sigma, *feature_statistics(y + 0.5)) == pytest.approx(1.0, abs=0.1)
  with pytest.warns(UserWarning, match="covariance is singular"):
    feature_statistics(rng.standard_normal((10, 20)))
  with pytest.raises(ValueError, match="features must be"):
    feature_statistics(np.zeros(5))


def test_kid_unbiased_near_zero_for_same_distribution_and_positive_for_different():
  rng = np.random.default_rng(3)
  a, b = rng.standard_normal((500, 16)), rng.standard_normal((500, 16))
  same = kid(a, b, num_subsets=20, subset_size=200)
  assert abs(same) < 0.01
  assert kid(a, b + 0.5, num_subsets=20, subset_size=200) > 20 * max(abs(same), 1e-3)
  # By hand on tiny sets: unbiased MMD^2 with the cubic kernel.
  x, y = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
  k = lambda p, q: (p @ q / 2 + 1) ** 3
  xx = sum(k(x[i], x[j]) for i in range(3) for j in range(3) if i != j) / 6
  yy = sum(k(y[i], y[j]) for i in range(3) for j in range(3) if i != j) / 6
  xy = sum(k(x[i], y[j]) for i in range(3) for j in range(3)) / 9
  assert kid(x, y, num_subsets=1, subset_size=3) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


def test_precision_recall_by_hand_and_on_mode_dropping():
  from diffusion_jax.evaluation import precision_recall
  # 1-D by hand, k=1: real {0,1,2,10} has 1-NN radii {1,1,1,8}; fakes 0.5 and 30.
  real, fake = np.array([[0.0], [1.0], [2.0], [10.0]]), np.array([[0.5], [30.0], [1.5], [9.0]])
  pr = precision_recall(real, fake, k=1)
  assert pr["precision"] == pytest.approx(0.75)  # 30 lies outside every ball
  # fake 1-NN radii: 0.5->1.0, 30->21, 1.5->1.0, 9->7.5; reals 0,1,2 within 1.0 of 0.5/1.5, 10 within 7.5 of 9.
  assert pr["recall"] == pytest.approx(1.0)
  rng = np.random.default_rng(4)
  centers = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], float)
  real = np.concatenate([c + rng.standard_normal((250, 2)) for c in centers])
  dropped = np.concatenate([c + rng.standard_normal((500, 2)) for c in centers[:2]])  # two modes missing
  full = precision_recall(real, np.concatenate([c + rng.standard_normal((250, 2)) for c in centers]))
  half = precision_recall(real, dropped)
  assert full["precision"] > 0.9 and full["recall"] > 0.9
  assert half["precision"] > 0.9 and 0.4 < half["recall"] < 0.6
  with pytest.raises(ValueError, match="needs more than 3 samples"):
    precision_recall(real[:3], real[:3])


def test_reference_stats_files(tmp_path):
  from diffusion_jax.evaluation.evaluate import load_reference_stats
  good = tmp_path / "good.npz"
  ref_mu, ref_sigma = np.arange(4.0) - 1.5, random_cov(np.random.default_rng(5), 4)
  np.savez(good, mu=ref_mu, sigma=ref_sigma)
  mu, sigma = load_reference_stats(str(good))
  np.testing.assert_array_equal(mu, ref_mu)
  np.testing.assert_array_equal(sigma, ref_sigma)
  (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(ValueError, match="corrupt.npz is not a statistics file with keys 'mu' and 'sigma'"):
    load_reference_stats(str(tmp_path / "corrupt.npz"))
  np.savez(tmp_path / "wrong.npz", mu=np.zeros(4), sigma=np.eye(3))
  with pytest.raises(ValueError, match=r"mu must be \[D\] and sigma \[D,D\], got \(4,\) and \(3, 3\)"):
    load_reference_stats(str(tmp_path / "wrong.npz"))
  np.savez(tmp_path / "keys.npz", mean=np.zeros(4))
  with pytest.raises(ValueError, match="keys 'mu' and 'sigma'"):
    load_reference_stats(str(tmp_path / "keys.npz"))


def test_psnr_and_ssim_are_perfect_for_equal_images_and_fall_with_noise():
  from diffusion_jax.evaluation.metrics import psnr, ssim
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 28, 28, 1)).astype(np.float64)
  assert np.all(np.isinf(psnr(images, images))) and np.allclose(ssim(images, images), 1.0)
  small, large = images + rng.normal(0, 5, images.shape), images + rng.normal(0, 40, images.shape)
  assert np.all(psnr(small, images) > psnr(large, images)) and np.all(ssim(small, images) > ssim(large, images))
  # PSNR by its definition: noise of std 5 has MSE ~25, PSNR ~ 10 log10(255^2 / 25) = 34.2 dB.
  np.testing.assert_allclose(psnr(small, images), 34.15, atol=0.3)
  # SSIM of a constant shift: luminance term only; a shift by the whole range makes it small.
  assert ssim(np.zeros_like(images), np.full_like(images, 255.0)).max() < 0.01
