"""Metrics in the offline classifier's feature space for 28x28 datasets, with the real-data floor."""

from __future__ import annotations

import numpy as np

from diffusion_jax.evaluation.classifier import load_params, make_feature_fn
from diffusion_jax.evaluation.metrics import feature_statistics, frechet_distance, kid, precision_recall


def inception_style_score(probs: np.ndarray, eps: float = 1e-12) -> float:
  """exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016, the Inception Score) with the offline classifier."""
  marginal = probs.mean(axis=0, keepdims=True)
  return float(np.exp(np.mean(np.sum(probs * (np.log(probs + eps) - np.log(marginal + eps)), axis=1))))


class OfflineEvaluator:
  """fd/kid/is/precision/recall_<dataset> of generated images against the real test split."""

  def __init__(self, dataset: str, reference_images: np.ndarray, *, weights: str | None = None):
    self.dataset = dataset
    self.features = make_feature_fn(load_params(dataset, weights))
    ref_feats, _ = self.features(reference_images)
    self.ref_features = ref_feats
    self.ref_stats = feature_statistics(ref_feats)

  def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    return self.from_features(*self.features(images), labels)

  def from_features(self, feats: np.ndarray, probs: np.ndarray, labels: np.ndarray | None = None
                    ) -> dict[str, float]:
    """The metrics of images already passed through `self.features` (feats [N,D], class probs [N,K])."""
    out = {f"fd_{self.dataset}": frechet_distance(*feature_statistics(feats), *self.ref_stats),
           f"kid_{self.dataset}": kid(feats, self.ref_features, num_subsets=50, subset_size=min(1000, len(feats))),
           f"is_{self.dataset}": inception_style_score(probs)}
    pr = precision_recall(self.ref_features[:len(feats)], feats)
    out.update({f"{k}_{self.dataset}": v for k, v in pr.items()})
    known = None if labels is None else np.asarray(labels) >= 0  # -1: a free prompt of no class
    if known is not None and known.any():
      out[f"class_acc_{self.dataset}"] = float(np.mean(probs.argmax(-1)[known] == np.asarray(labels)[known]))
    return out
