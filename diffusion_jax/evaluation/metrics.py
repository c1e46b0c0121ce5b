"""Distances between feature sets: Fréchet distance (Heusel et al. 2017) and KID (Binkowski et al. 2018)."""

from __future__ import annotations

import warnings

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D,D]) in float64, sigma with the unbiased (N-1) normalisation as pytorch-fid."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must be [N, D], got shape {features.shape}")
  n, d = features.shape
  if n < 2:
    raise ValueError(f"need at least 2 feature vectors, got {n}")
  if n < d:
    warnings.warn(f"{n} samples for {d}-dimensional features: the covariance is singular, so the "
                  "Fréchet distance is biased; use N >= D (FID uses 2048 features, so N >= 2048)")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017, eq. 6), in float64.

  tr((S1 S2)^(1/2)) is computed as sum sqrt(eig(S1^(1/2) S2 S1^(1/2))): that matrix is symmetric PSD,
  so eigh is stable where sqrtm of the non-symmetric S1 S2 needs pytorch-fid's eps fallback.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
  for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
    if not np.all(np.isfinite(s)):
      raise ValueError(f"{name} has non-finite entries")
  vals, vecs = np.linalg.eigh((sigma1 + sigma1.T) / 2)
  sqrt_sigma1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
  inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
  tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def kid(features1: np.ndarray, features2: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> float:
  """Kernel Inception Distance: unbiased MMD^2 with k(x,y) = (x.y/d + 1)^3, averaged over random subsets."""
  f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f"features must be [N, D] and [M, D], got {f1.shape} and {f2.shape}")
  m = min(subset_size, len(f1), len(f2))
  if m < 2:
    raise ValueError(f"KID needs at least 2 samples in each set, got {len(f1)} and {len(f2)}")
  d = f1.shape[1]
  rng = np.random.default_rng(seed)
  estimates = []
  for _ in range(num_subsets):
    x = f1[rng.choice(len(f1), m, replace=False)]
    y = f2[rng.choice(len(f2), m, replace=False)]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    # Binkowski et al. 2018 eq. 3 (unbiased): diagonal terms of k_xx and k_yy excluded.
    mmd = ((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
           - 2.0 * k_xy.mean())
    estimates.append(mmd)
  return float(np.mean(estimates))


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  sq = np.sum(a ** 2, 1)[:, None] + np.sum(b ** 2, 1)[None, :] - 2.0 * a @ b.T
  return np.sqrt(np.maximum(sq, 0.0))


def _knn_radii(features: np.ndarray, k: int, chunk: int) -> np.ndarray:
  """Distance from each point to its k-th nearest other point [N]."""
  radii = np.empty(len(features))
  for i in range(0, len(features), chunk):
    d = _pairwise_distances(features[i:i + chunk], features)
    radii[i:i + chunk] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself (distance 0)
  return radii


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray, chunk: int) -> float:
  """Fraction of queries inside the union of balls B(manifold_i, radii_i)."""
  inside = np.zeros(len(queries), bool)
  for i in range(0, len(queries), chunk):
    inside[i:i + chunk] = np.any(_pairwise_distances(queries[i:i + chunk], manifold) <= radii[None, :], axis=1)
  return float(inside.mean())


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, *, k: int = 3,
                     chunk: int = 1000) -> dict[str, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1-3) with k-NN balls, k=3."""
  real, fake = np.asarray(real_features, np.float64), np.asarray(fake_features, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"features must be [N, D] and [M, D], got {real.shape} and {fake.shape}")
  if min(len(real), len(fake)) <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, "
                     f"got {len(real)} and {len(fake)}")
  return {"precision": _coverage(real, _knn_radii(real, k, chunk), fake, chunk),
          "recall": _coverage(fake, _knn_radii(fake, k, chunk), real, chunk)}


def psnr(images: np.ndarray, references: np.ndarray, data_range: float = 255.0) -> np.ndarray:
  """Peak signal-to-noise ratio per image [N] in dB: 10 log10(range^2 / MSE), images [N,H,W,C] (inf if equal)."""
  diff = np.asarray(images, np.float64) - np.asarray(references, np.float64)
  mse = np.mean(diff ** 2, axis=tuple(range(1, diff.ndim)))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(data_range ** 2 / mse)


def ssim(images: np.ndarray, references: np.ndarray, data_range: float = 255.0) -> np.ndarray:
  """Structural similarity per image [N] (Wang et al. 2004, eq. 13), the mean SSIM map with an 11x11 Gaussian
  window of sigma 1.5, K1 = 0.01, K2 = 0.03, per channel then averaged; images [N,H,W,C]."""
  from scipy.ndimage import gaussian_filter
  x, y = np.asarray(images, np.float64), np.asarray(references, np.float64)
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f"images and references must be [N,H,W,C] of one shape, got {x.shape} and {y.shape}")
  blur = lambda a: gaussian_filter(a, sigma=(0, 1.5, 1.5, 0), truncate=3.5)  # radius 5: an 11x11 window
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_x, mu_y = blur(x), blur(y)
  var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
  return ssim_map.mean(axis=(1, 2, 3))
