"""A reader of the idx(.gz) files MNIST and Fashion-MNIST ship as (LeCun et al.'s format)."""

from __future__ import annotations

import gzip
import os

import numpy as np

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str) -> np.ndarray:
  """The array stored in an idx file (gzipped or not)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an idx file (bad magic number {data[:4]!r})")
  ndim = data[3]
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  expected = int(np.prod(dims)) * dtype.itemsize
  body = data[4 + 4 * ndim:]
  if len(body) != expected:
    raise ValueError(f"{path} holds {len(body)} data bytes, its header {dims} promises {expected}")
  return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def find_idx_file(directory: str, stem: str) -> str | None:
  for name in (stem + ".gz", stem):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


def load_idx_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray] | None:
  """(images uint8 [N,H,W,1], labels int32 [N]) of a split from `directory`, or None if absent."""
  if split not in SPLIT_FILES:
    raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLIT_FILES)}")
  paths = [find_idx_file(directory, stem) for stem in SPLIT_FILES[split]]
  if None in paths:
    return None
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels")
  return images[..., None].astype(np.uint8), labels.astype(np.int32)


def idx_image_shape(directory: str, split: str) -> tuple[int, int, int] | None:
  """(H, W, 1) of a split's images from its idx header alone (16 bytes), or None if the file is absent."""
  path = find_idx_file(directory, SPLIT_FILES[split][0])
  if path is None:
    return None
  with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
    header = f.read(16)
  if len(header) < 16 or header[:3] != bytes([0, 0, 0x08]) or header[3] != 3:
    raise ValueError(f"{path} is not an idx file of uint8 images [N,H,W] (header {header[:4]!r})")
  return int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big"), 1


def write_idx(path: str, array: np.ndarray) -> None:
  """Write a uint8 array as an idx file (gzipped when the path ends in .gz); used to make test data."""
  array = np.ascontiguousarray(array, dtype=np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.tobytes())
