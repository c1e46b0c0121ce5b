"""diffusion_jax.evaluation.classifier and offline: the committed feature network, its accuracy, the metrics on it."""

import numpy as np
import pytest

from diffusion_jax.data import load_split
from diffusion_jax.evaluation.classifier import load_params, make_feature_fn, weights_path
from diffusion_jax.evaluation.offline import OfflineEvaluator, inception_style_score


@pytest.fixture(scope="module")
def fashion_mnist_test():
  return load_split("fashion_mnist", "test")


def test_committed_classifier_reaches_90_percent(fashion_mnist_test):
  images, labels = fashion_mnist_test
  fn = make_feature_fn(load_params("fashion_mnist"))
  feats, probs = fn(images)
  assert feats.shape == (10000, 128) and probs.shape == (10000, 10)
  acc = float(np.mean(probs.argmax(-1) == labels))
  assert acc >= 0.90, acc
  with np.load(weights_path("fashion_mnist")) as f:
    assert float(f["meta_test_accuracy"]) == pytest.approx(acc, abs=1e-3)  # what its script reported


def test_offline_metrics_floor_and_bad_input(fashion_mnist_test):
  images, labels = fashion_mnist_test
  evaluator = OfflineEvaluator("fashion_mnist", images[:5000])
  real = evaluator(images[5000:6000], labels[5000:6000])
  noise = evaluator(np.random.default_rng(0).integers(0, 256, (1000, 28, 28, 1), dtype=np.uint8))
  assert real["fd_fashion_mnist"] < 0.1 * noise["fd_fashion_mnist"]
  assert real["class_acc_fashion_mnist"] > 0.85
  assert real["is_fashion_mnist"] > 5 > noise["is_fashion_mnist"]
  with pytest.raises(ValueError, match=r"takes \[N,28,28,1\] images, got shape \(2, 32, 32, 3\)"):
    evaluator(np.zeros((2, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
    evaluator(np.full((2, 28, 28, 1), 255.0, np.float32))
  with pytest.raises(FileNotFoundError, match="python -m diffusion_jax.evaluation.classifier --dataset=mnist"):
    load_params("mnist", "/nonexistent/mnist_classifier.npz")


def test_inception_style_score_bounds():
  assert inception_style_score(np.eye(10)) == pytest.approx(10.0, rel=1e-6)
  assert inception_style_score(np.full((5, 10), 0.1)) == pytest.approx(1.0, rel=1e-6)
