"""A small CNN classifier for 28x28 grey images: the offline feature network for Fashion-MNIST / MNIST.

Its 128-d penultimate features give `fd_<dataset>` (a Fréchet distance in its own feature space, never
called FID), KID, and its predictions the class accuracy of conditional samples and an Inception-Score-
style score. Weights: `python -m diffusion_jax.evaluation.classifier --dataset=fashion_mnist` writes
`weights/<dataset>_classifier.npz` beside this file.
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
FEATURE_DIM = 128


class SmallCNN(nn.Module):
  """conv32-conv32-pool-conv64-conv64-pool-dense128-dense10 on [B,28,28,1] in [-1,1]."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    for features in (32, 64):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.Dropout(0.3, deterministic=not train)(x.reshape(x.shape[0], -1))
    features = nn.relu(nn.Dense(FEATURE_DIM)(x))  # [B,128]
    logits = nn.Dense(self.num_classes)(nn.Dropout(0.3, deterministic=not train)(features))
    return features, logits


def weights_path(dataset: str) -> str:
  return os.path.join(WEIGHTS_DIR, f"{dataset}_classifier.npz")


def load_params(dataset: str = "fashion_mnist", path: str | None = None):
  """The trained params; a missing file names the script that makes it."""
  path = path or weights_path(dataset)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no classifier weights at {path}; make them with "
                            f"`python -m diffusion_jax.evaluation.classifier --dataset={dataset}`")
  with np.load(path) as f:
    flat = {tuple(k.split("/")): jnp.asarray(f[k]) for k in f.files if not k.startswith("meta_")}
  return traverse_util.unflatten_dict(flat)


def make_feature_fn(params, batch_size: int = 500):
  """uint8 or [-1,1] float images [N,28,28,1] -> (features [N,128], class probabilities [N,10]) as numpy."""
  apply = jax.jit(lambda x: SmallCNN().apply(params, x))

  def fn(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (28, 28, 1):
      raise ValueError(f"the classifier takes [N,28,28,1] images, got shape {images.shape}")
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 127.5 - 1.0
    elif images.min() < -1.001 or images.max() > 1.001:
      raise ValueError(f"float images must lie in [-1, 1], got [{images.min():.3f}, {images.max():.3f}]")
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
      chunk = images[i:i + batch_size]
      pad = batch_size - len(chunk)  # one compiled shape for every chunk
      f, logits = apply(jnp.asarray(np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0)))))
      feats.append(np.asarray(f)[:len(chunk)])
      probs.append(np.asarray(jax.nn.softmax(logits))[:len(chunk)])
    return np.concatenate(feats), np.concatenate(probs)

  return fn


def train_classifier(images: np.ndarray, labels: np.ndarray, *, epochs: int = 6, batch_size: int = 128,
                     learning_rate: float = 1e-3, seed: int = 0, log=print):
  """Adam on cross-entropy with random 1-pixel shifts; returns params."""
  model = SmallCNN()
  key = jax.random.key(seed)
  params = model.init(key, jnp.zeros((1, 28, 28, 1)))
  steps = epochs * (len(images) // batch_size)
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, key):
    def loss_fn(p):
      _, logits = model.apply(p, x, train=True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  x_all = images.astype(np.float32) / 127.5 - 1.0
  t0 = time.time()
  for epoch in range(epochs):
    perm = rng.permutation(len(images))
    for i in range(len(images) // batch_size):
      idx = perm[i * batch_size:(i + 1) * batch_size]
      dx, dy = rng.integers(-1, 2, 2)
      x = np.roll(x_all[idx], (dx, dy), axis=(1, 2))
      params, opt_state, loss = step(params, opt_state, x, labels[idx], jax.random.fold_in(key, epoch * 100000 + i))
    log(f"epoch {epoch + 1}/{epochs}: loss {float(loss):.4f} ({time.time() - t0:.0f}s)")
  return params


def accuracy(feature_fn, images: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(feature_fn(images)[1].argmax(-1) == labels))


def save_params(params, path: str, **meta) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  np.savez_compressed(path, **flat, **{f"meta_{k}": np.asarray(v) for k, v in meta.items()})


def main():
  from diffusion_jax.data import load_split
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "mnist"))
  parser.add_argument("--epochs", type=int, default=6)
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  train_x, train_y = load_split(args.dataset, "train", args.data_dir)
  test_x, test_y = load_split(args.dataset, "test", args.data_dir)
  params = train_classifier(train_x, train_y, epochs=args.epochs)
  acc = accuracy(make_feature_fn(params), test_x, test_y)
  out = args.out or weights_path(args.dataset)
  save_params(params, out, test_accuracy=acc, epochs=args.epochs)
  print(f"test accuracy {acc:.4f}; wrote {out}")


if __name__ == "__main__":
  main()
