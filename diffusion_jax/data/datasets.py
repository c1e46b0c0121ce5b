"""Which dataset `config.data` names, what it holds (classes, captions) and its batches for training.

- `fashion_mnist` (the embedded default: Debian's idx files, offline) and `mnist`: held in memory.
- `image_folder`: the user's PNG / JPEG files in `data.data_dir` (data.image_folder), streamed with grain.
- any other name: a tensorflow-datasets image dataset (`cifar10`, `celeb_a`, `imagenet2012`,
  `imagenet_resized/64x64`, `oxford_flowers102`, `coco_captions`, ...), read record by record through
  `tfds.data_source` and streamed with grain, never loaded whole.
Streamed images are resized (shorter side) and centre-cropped to `data.image_size`, converted to `data.channels`.
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections
import numpy as np

from diffusion_jax.data.pipeline import InMemoryBatches, load_split

IN_MEMORY = ("fashion_mnist", "mnist")
IMAGE_FOLDER = "image_folder"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """num_classes (0: no labels); captions: 'classes' (the template captions of data.pipeline's datasets),
  'per_image' (each example has its own) or '' (none); sample_captions: a few of the dataset's own captions,
  the prompts of default samples for per-image captions."""

  num_classes: int
  captions: str
  sample_captions: tuple[str, ...] = ()


def is_streamed(data: ml_collections.ConfigDict) -> bool:
  return data.dataset not in IN_MEMORY


@functools.lru_cache(maxsize=8)
def _folder_index(root: str, image_size: int):
  from diffusion_jax.data.image_folder import scan_image_folder
  return scan_image_folder(root, image_size)


def folder_index(data: ml_collections.ConfigDict):
  """The scanned image folder of `data` (scanned once per process)."""
  return _folder_index(data.data_dir, data.image_size)


def dataset_info(data: ml_collections.ConfigDict) -> DatasetInfo:
  from diffusion_jax.conditioning import CAPTIONS
  if data.dataset in CAPTIONS:
    return DatasetInfo(len(CAPTIONS[data.dataset]), "classes")
  if data.dataset == IMAGE_FOLDER:
    index = folder_index(data)
    distinct = tuple(dict.fromkeys(c for c in index.captions if c))
    return DatasetInfo(len(index.class_names), "per_image" if distinct else "", distinct[:16])
  from diffusion_jax.data.tfds_source import dataset_features
  num_classes, has_captions = dataset_features(data.dataset, data.data_dir)
  if not has_captions:
    return DatasetInfo(num_classes, "")
  source = open_source(data, "train")
  return DatasetInfo(num_classes, "per_image", tuple(dict.fromkeys(source[i]["caption"] for i in range(16))))


def open_source(data: ml_collections.ConfigDict, split: str):
  """A streamed dataset's random-access source of records {"image": uint8 [S,S,C], "label", "caption"}."""
  if data.dataset == IMAGE_FOLDER:
    from diffusion_jax.data.image_folder import ImageFolderSource
    if split != "train":
      raise ValueError(f"an image folder has one split (train), not {split!r}")
    return ImageFolderSource(folder_index(data), data.image_size, data.channels)
  from diffusion_jax.data.tfds_source import TfdsSource
  return TfdsSource(data.dataset, split, data.data_dir, data.image_size, data.channels)


def make_batches(data: ml_collections.ConfigDict, *, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1, split: str = "train"):
  """This process's batches of `split`: `.batch(step)` -> {"image": float32 [b,H,W,C] in [-1, 1], "label": int32
  [b] (+ "caption": str [b] when streamed)}, the same for the same (seed, step) on every run."""
  kwargs = dict(global_batch=global_batch, seed=seed, process_index=process_index, process_count=process_count,
                random_flip=data.random_flip)
  if not is_streamed(data):
    images, labels = load_split(data.dataset, split, data.data_dir)
    return InMemoryBatches(images, labels, **kwargs)
  from diffusion_jax.data.streaming import StreamingBatches
  return StreamingBatches(open_source(data, split), num_workers=data.num_workers, **kwargs)


def real_images(data: ml_collections.ConfigDict, split: str, num_images: int | None = None) -> np.ndarray:
  """uint8 [N,H,W,C] real images of `split` for metrics: all of them (None), or `num_images` drawn without
  replacement with a fixed seed. Streamed datasets decode only those; an image folder's one split serves both."""
  if not is_streamed(data):
    images = load_split(data.dataset, split, data.data_dir)[0]
    if num_images is None or num_images >= len(images):
      return images
    return images[np.random.default_rng(0).choice(len(images), num_images, replace=False)]
  source = open_source(data, "train" if data.dataset == IMAGE_FOLDER else split)
  n = len(source) if num_images is None else min(num_images, len(source))
  chosen = np.sort(np.random.default_rng(0).choice(len(source), n, replace=False))
  return np.stack([source[int(i)]["image"] for i in chosen])
