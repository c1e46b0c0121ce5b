"""What an edit starts from: config.edit checked at start-up (`check_edit`), and the images it names
(`load_edit_images`): indices of a dataset split, image files, or a .npz of images."""

from __future__ import annotations

import io
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from diffusion_jax import build
from diffusion_jax.editing.masks import SIDES, load_mask, parse_box
from diffusion_jax.images import open_file

TASKS = ("inpaint", "outpaint", "img2img", "upscale")
# Which image condition (config.image_condition.kind, '' = none) each task can run on.
TASK_MODELS = {"inpaint": ("", "masked"), "outpaint": ("", "masked"), "img2img": ("",), "upscale": ("low_res",)}


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
  if not ok:
    raise ValueError(f"config.{key}={value!r} is invalid: {expected}")


def _int(value: Any, low: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def parse_indices(text: str, key: str = "edit.images") -> list[int]:
  """'3,7,12' / '0-31' / '0-3,9' -> [3, 7, 12] ...; ValueError naming `key` otherwise."""
  out = []
  try:
    for part in text.split(","):
      lo, dash, hi = part.strip().partition("-")
      out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
  except ValueError:
    out = []
  if not out or min(out) < 0:
    raise ValueError(f"config.{key}={text!r} is invalid: expected indices of images such as test:3,7,12 or a range "
                     "test:0-31 (ints >= 0), or image file paths")
  return out


def parse_images(text: str) -> tuple[str, str, list[int] | None]:
  """config.edit.images -> ('split', split, indices) | ('npz', path, indices or None) | ('files', paths, None)."""
  text = str(text or "").strip()
  if not text:
    raise ValueError("config.edit.images='' is invalid: give indices of the test split (test:0-7) or image paths")
  head, colon, tail = text.partition(":")
  if colon and head in ("train", "test", "validation") and not epath.Path(text).exists():
    return "split", head, parse_indices(tail)
  if ".npz" in text:  # path.npz or path.npz:indices
    path, _, tail = text.partition(".npz")
    path += ".npz"
    _require(epath.Path(path).is_file(), "edit.images", text, "the .npz file does not exist")
    _require(tail == "" or tail.startswith(":"), "edit.images", text, "expected PATH.npz or PATH.npz:0-15")
    return "npz", path, parse_indices(tail[1:]) if tail else None
  paths = [p.strip() for p in text.split(",") if p.strip()]
  missing = [p for p in paths if not epath.Path(p).is_file()]
  _require(not missing, "edit.images", text, f"{missing[0] if missing else ''} does not exist: expected image "
           "files (PNG/JPEG), comma-separated, or split indices such as test:0-7")
  return "files", ",".join(paths), None


def check_edit(config: ml_collections.ConfigDict) -> None:
  """Every edit key, before a checkpoint is read: the task and the model it needs, the inputs' syntax and
  files, the box / mask / canvas / strength / RePaint settings."""
  e = config.edit
  _require(e.task in TASKS, "edit.task", e.task, f"mode=edit needs a task: set --config.edit.task to one of {TASKS}")
  kind = build.image_condition_spec(config).kind
  _require(kind in TASK_MODELS[e.task], "edit.task", e.task,
           f"this model (image_condition.kind={kind or None!r}) cannot {e.task}: "
           + ("upscaling needs a super-resolution model (configs/super_resolution.py)" if e.task == "upscale" else
              "a super-resolution model only upscales (edit.task=upscale)" if kind == "low_res" else
              "an inpainting model (image_condition.kind='masked') only inpaints and outpaints"))
  kind, where, indices = parse_images(e.images)
  size = config.data.image_size
  if kind == "split":  # indices in range (the split's length, nothing decoded)
    _check_indices(_split_source(config.data, where)[0], where, indices, config.data.dataset)
  if kind == "files":  # every file decodes
    from diffusion_jax.data.image_folder import load_image
    for path in where.split(","):
      try:
        load_image(path, 8, config.data.channels)
      except ValueError as err:
        raise ValueError(f"config.edit.images={e.images!r} is invalid: {err}") from None
  if e.task == "inpaint":
    if e.mask:
      load_mask(e.mask, size, size)
    else:
      parse_box(e.box, size, size)
  if e.task == "outpaint":
    _require(_int(e.extend, 1), "edit.extend", e.extend, "must be an int >= 1 (pixels added)")
    _require(e.side in SIDES, "edit.side", e.side, f"choose one of {SIDES}")
    autoencoder = build.build_autoencoder(config)
    if autoencoder is not None:
      f = autoencoder.downsample_factor
      _require(e.extend % f == 0, "edit.extend", e.extend,
               f"a latent model's canvas grows in latent cells: use a multiple of the autoencoder's factor {f}")
  if e.task in ("inpaint", "outpaint"):
    _require(_int(e.resample_steps, 1), "edit.resample_steps", e.resample_steps,
             "must be an int >= 1 (RePaint's resamplings; 1 = plain replacement)")
    _require(_int(e.jump, 1), "edit.jump", e.jump, "must be an int >= 1 (RePaint's jump length in steps)")
  if e.task == "img2img":
    _require(isinstance(e.strength, (int, float)) and not isinstance(e.strength, bool) and 0 < e.strength <= 1,
             "edit.strength", e.strength, "must be in (0, 1]: the fraction of the noise schedule the input is pushed "
             "into (small keeps the input, 1 = from pure noise)")
    _require(isinstance(e.invert, bool), "edit.invert", e.invert, "must be True or False")
  if e.task == "upscale":
    low = config.image_condition.low_res_size
    _require(e.downscale == 0 or (_int(e.downscale, 2) and size % e.downscale == 0 and size // e.downscale == low),
             "edit.downscale", e.downscale, f"must be 0 (the inputs are {low}x{low} images) or the factor "
             f"{size // low if size % low == 0 else '?'} that takes data.image_size={size} to the model's "
             f"low_res_size={low}")


def _split_source(data: ml_collections.ConfigDict, split: str):
  """(number of images, fetch(i) -> {"image", "label"}) of a dataset split, without decoding it all."""
  from diffusion_jax.data.datasets import IMAGE_FOLDER, is_streamed, open_source
  from diffusion_jax.data.pipeline import load_split
  if is_streamed(data):
    source = open_source(data, "train" if data.dataset == IMAGE_FOLDER else split)
    return len(source), lambda i: source[i]
  images, labels = load_split(data.dataset, split, data.data_dir)
  return len(images), lambda i: {"image": images[i], "label": labels[i]}


def _check_indices(count: int, split: str, indices: list[int], dataset: str) -> None:
  bad = [i for i in indices if i >= count]
  _require(not bad, "edit.images", f"{split}:{bad[0] if bad else ''}",
           f"the {split} split of {dataset} has {count} images (indices 0..{count - 1})")


def _split_images(data: ml_collections.ConfigDict, split: str, indices: list[int]
                  ) -> tuple[np.ndarray, np.ndarray]:
  count, fetch = _split_source(data, split)
  _check_indices(count, split, indices, data.dataset)
  records = [fetch(i) for i in indices]
  return np.stack([r["image"] for r in records]), np.asarray([r["label"] for r in records], np.int32)


def load_edit_images(config: ml_collections.ConfigDict, size: int) -> tuple[np.ndarray, np.ndarray | None]:
  """(uint8 [N,size,size,C], labels int32 [N] or None): the images config.edit.images names, resized (shorter
  side, bicubic) and centre-cropped to `size` and converted to data.channels where they differ."""
  from diffusion_jax.data.image_folder import fit_image, load_image
  kind, where, indices = parse_images(config.edit.images)
  channels = config.data.channels
  labels = None
  if kind == "split":
    images, labels = _split_images(config.data, where, indices)
  elif kind == "files":
    return np.stack([load_image(p, size, channels) for p in where.split(",")]), None
  else:
    with open_file(where) as file, np.load(io.BytesIO(file.read())) as f:  # local or gs://
      _require("images" in f.files, "edit.images", where, f"the .npz has {f.files}, expected an 'images' array")
      images = f["images"]
      labels = f["labels"] if "labels" in f.files else None
    _require(images.ndim == 4 and images.dtype == np.uint8, "edit.images", where,
             f"its images are {images.dtype} {images.shape}, expected uint8 [N,H,W,C]")
    if indices is not None:
      _require(max(indices) < len(images), "edit.images", config.edit.images, f"the .npz holds {len(images)} images")
      images = images[indices]
      labels = None if labels is None else labels[indices]
  if images.shape[1:] != (size, size, channels):
    images = np.stack([fit_image(image, size, channels) for image in images])
  return images, labels
