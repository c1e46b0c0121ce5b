"""diffusion_jax.data (idx.py, pipeline.py): the idx reader, load_split and the step-indexed input pipeline."""

import numpy as np
import pytest

from diffusion_jax.data import DataNotFoundError, InMemoryBatches, load_split
from diffusion_jax.data.idx import read_idx, write_idx
from helpers import write_fake_fashion_mnist


def test_idx_round_trip_and_bad_file(tmp_path):
  a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
  for name in ("x.gz", "x"):
    write_idx(str(tmp_path / name), a)
    np.testing.assert_array_equal(read_idx(str(tmp_path / name)), a)
  (tmp_path / "bad").write_bytes(b"hello world")
  with pytest.raises(ValueError, match="not an idx file"):
    read_idx(str(tmp_path / "bad"))


def test_load_split_from_data_dir_and_missing_data_message(tmp_path):
  write_fake_fashion_mnist(str(tmp_path))
  images, labels = load_split("fashion_mnist", "train", str(tmp_path))
  assert images.shape == (64, 16, 16, 1) and images.dtype == np.uint8 and labels.shape == (64,)
  # Each fake image is its label's bright square (helpers.write_fake_fashion_mnist): pixels and labels pair up.
  assert set(np.unique(labels)) <= set(range(10)) and len(np.unique(labels)) > 1
  for image, label in zip(images[..., 0], labels):
    r, col = divmod(int(label), 4)
    expected = np.zeros((16, 16), np.uint8)
    expected[2 + 3 * r:6 + 3 * r, 1 + 3 * col:5 + 3 * col] = 255
    np.testing.assert_array_equal(image, expected)
  test_images, test_labels = load_split("fashion_mnist", "test", str(tmp_path))
  assert test_images.shape == (16, 16, 16, 1) and test_labels.shape == (16,)
  with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
    load_split("fashion_mnist", "train", str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="not an in-memory dataset"):
    load_split("imagenet2012", "train")


def test_batches_deterministic_resumable_and_split_by_process():
  images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * 20
  labels = np.arange(10, dtype=np.int32)
  a = InMemoryBatches(images, labels, global_batch=4, seed=3)
  b = InMemoryBatches(images, labels, global_batch=4, seed=3)
  run = [a.batch(s)["label"] for s in range(6)]
  # A fresh iterator started at step 3 (a resumed run) continues the same stream.
  resumed = [bb["label"] for bb, _ in zip(b.iterate(3), range(3))]
  np.testing.assert_array_equal(np.stack(run[3:]), np.stack(resumed))
  # Each epoch of 10 visits every example once: steps 0..4 cover 20 draws = two epochs.
  flat = np.concatenate(run)[:20]
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
  assert not np.array_equal(flat[:10], flat[10:20])  # a new permutation per epoch
  other = InMemoryBatches(images, labels, global_batch=4, seed=4)
  assert not np.array_equal(np.concatenate([other.batch(s)["label"] for s in range(3)]), np.concatenate(run[:3]))
  # Two processes take disjoint halves that make up the global batch.
  p0 = InMemoryBatches(images, labels, global_batch=4, seed=3, process_index=0, process_count=2)
  p1 = InMemoryBatches(images, labels, global_batch=4, seed=3, process_index=1, process_count=2)
  for s in range(5):
    np.testing.assert_array_equal(np.concatenate([p0.batch(s)["label"], p1.batch(s)["label"]]), run[s])
  x = a.batch(0)["image"]
  assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
  np.testing.assert_allclose(x.ravel(), images[a.batch(0)["label"]].ravel() / 127.5 - 1)
  with pytest.raises(ValueError, match="divisible by the process count"):
    InMemoryBatches(images, labels, global_batch=5, seed=0, process_count=2)


def test_random_flip_flips_about_half():
  images = np.zeros((100, 2, 2, 1), np.uint8)
  images[:, :, 0] = 255  # left column bright
  batches = InMemoryBatches(images, np.zeros(100, np.int32), global_batch=100, seed=0, random_flip=True)
  left_bright = batches.batch(0)["image"][:, 0, 0, 0] > 0
  assert 30 < left_bright.sum() < 70
