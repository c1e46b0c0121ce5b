"""Per-process batches [b,H,W,C] in [-1, 1], derived from (seed, step) so a resumed run continues exactly."""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from diffusion_jax.data.idx import idx_image_shape, load_idx_split

DEBIAN_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
# Datasets small enough to hold in memory: the batch for a step is indexed directly, so resuming is exact.
IN_MEMORY = ("fashion_mnist", "mnist", "cifar10")
DATASETS = IN_MEMORY  # celeb_a / imagenet2012 need a streaming tf.data path (not built yet)
IMAGE_SHAPES = {"fashion_mnist": (28, 28, 1), "mnist": (28, 28, 1), "cifar10": (32, 32, 3)}  # (H, W, C)


class DataNotFoundError(RuntimeError):
  pass


def _load_tfds(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow_datasets as tfds  # imports TensorFlow: only on this path
  try:
    ds = tfds.load(name, split=split, batch_size=-1, as_supervised=True, data_dir=data_dir)
  except Exception as e:  # tfds raises many kinds of errors for "no network" and "no files"
    hint = (f" Offline, install the Debian package: apt-get install dataset-fashion-mnist "
            f"(files go to {DEBIAN_DIRS['fashion_mnist']}), or set config.data.data_dir to a directory "
            "holding the idx files." if name == "fashion_mnist" else
            " tfds downloads it on first use with internet, or prepare it into config.data.data_dir.")
    raise DataNotFoundError(f"could not load dataset {name!r} split {split!r} through tensorflow-datasets "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).{hint}") from None
  images, labels = tfds.as_numpy(ds)
  return images.astype(np.uint8), labels.astype(np.int32)


def load_split(name: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N,H,W,C], labels int32 [N]); Fashion-MNIST/MNIST read idx files when present."""
  if name not in IN_MEMORY:
    raise ValueError(f"dataset {name!r} is not an in-memory dataset; those are {IN_MEMORY}")
  if name in ("fashion_mnist", "mnist"):
    # An explicit data_dir is honoured (idx files, or a tfds data dir); otherwise Debian's files come first.
    directory = data_dir or DEBIAN_DIRS.get(name)
    found = load_idx_split(directory, split) if directory else None
    if found is not None:
      return found
    if data_dir and not os.path.isdir(os.path.join(data_dir, name)):
      raise DataNotFoundError(
          f"no {name} idx files ({split}) in config.data.data_dir={data_dir!r}. "
          + ("Install the Debian package: apt-get install dataset-fashion-mnist, or " if name == "fashion_mnist" else "")
          + "unset data_dir to let tensorflow-datasets download it (needs internet).")
  return _load_tfds(name, split, data_dir)


def dataset_image_shape(name: str, data_dir: str | None = None) -> tuple[int, int, int]:
  """(H, W, C) of a dataset's images without loading it: the idx header where load_split would read idx
  files, else the dataset's published shape."""
  directory = data_dir or DEBIAN_DIRS.get(name)
  if name in ("fashion_mnist", "mnist") and directory:
    shape = idx_image_shape(directory, "train")
    if shape is not None:
      return shape
  return IMAGE_SHAPES[name]


def scale_images(images: np.ndarray) -> np.ndarray:
  """uint8 [0,255] -> float32 [-1,1] (DDPM sec. 3.3: data scaled linearly to [-1, 1])."""
  return images.astype(np.float32) / 127.5 - 1.0


def process_rows(step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Positions in the endless stream of examples of this process's rows of the global batch of `step`:
  [s*G + p*b, s*G + (p+1)*b) with b = G / P, so the processes' rows are disjoint and together make the batch."""
  local = global_batch // process_count
  start = step * global_batch + process_index * local
  return np.arange(start, start + local)


def flip_images(images: np.ndarray, flip: np.ndarray) -> np.ndarray:
  """Left-right flip of images [b,H,W,C] where flip [b] is True."""
  return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


class InMemoryBatches:
  """The batch of step s: stream positions process_rows(s) of an endless stream of per-epoch permutations."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1, random_flip: bool = False):
    if global_batch % process_count:
      raise ValueError(f"batch_size={global_batch} must be divisible by the process count {process_count}")
    self.images, self.labels = images, labels
    self.global_batch, self.local_batch = global_batch, global_batch // process_count
    self.seed, self.process_index, self.process_count, self.random_flip = (seed, process_index, process_count,
                                                                           random_flip)
    self._epoch, self._perm = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
    return self._perm

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of `step`: image float32 [b,H,W,C], label int32 [b]."""
    n = len(self.images)
    flat = process_rows(step, self.global_batch, self.process_index, self.process_count)
    epochs, offsets = flat // n, flat % n
    idx = np.array([self._permutation(int(e))[o] for e, o in zip(epochs, offsets)])
    images = scale_images(self.images[idx])
    if self.random_flip:
      images = flip_images(images, np.random.default_rng([self.seed, step, 1 + self.process_index]).random(len(idx))
                           < 0.5)
    return {"image": images, "label": self.labels[idx]}

  def iterate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    step = start_step
    while True:
      yield self.batch(step)
      step += 1
