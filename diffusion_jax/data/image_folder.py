"""A folder of the user's images as a random-access source (Hugging Face imagefolder's layout, which diffusers'
text-to-image training reads): PNG / JPEG files anywhere below `data_dir`, class labels from the first-level
sub-folder names (sorted), captions from `metadata.jsonl` lines {"file_name": "<path below data_dir>",
"text": "<caption>"}.

Scanning reads each file's header only (cheap). A file that does not open as an image is skipped with one
warning giving the count and the first names; a metadata line naming a missing file, an empty folder, and a
file whose pixels fail to decode later are errors naming the file. Images smaller than `image_size` on their
shorter side are upscaled, with one warning giving the count.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from absl import logging

from diffusion_jax.images import open_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
METADATA_FILE = "metadata.jsonl"


class ImageFolderError(ValueError):
  """An image folder that cannot be used; the message names the folder or file and what to do."""


@dataclasses.dataclass(frozen=True)
class FolderIndex:
  """What a scan found: relative paths, a label per file (-1 without class folders), the class names, a caption
  per file ('' without metadata) and how many files were skipped or will be upscaled."""

  root: str
  files: tuple[str, ...]
  labels: np.ndarray  # int32 [N]
  class_names: tuple[str, ...]
  captions: tuple[str, ...]
  skipped: tuple[str, ...]
  small: int

  @property
  def has_captions(self) -> bool:
    return any(self.captions)


def scan_image_folder(root: str, image_size: int) -> FolderIndex:
  from PIL import Image
  if not os.path.isdir(root):
    raise ImageFolderError(f"config.data.data_dir={root!r} is not a folder: give the folder of your images")
  found = []
  for directory, subdirs, names in os.walk(root):
    subdirs.sort()
    found += [os.path.relpath(os.path.join(directory, n), root) for n in sorted(names)
              if n.lower().endswith(IMAGE_EXTENSIONS)]
  if not found:
    raise ImageFolderError(f"config.data.data_dir={root!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files: put your "
                           "images there (in one sub-folder per class for class labels)")
  files, skipped, small = [], [], 0
  for rel in found:
    try:
      with Image.open(os.path.join(root, rel)) as image:
        width, height = image.size
    except Exception:  # PIL raises several kinds for a file that is not an image
      skipped.append(rel)
      continue
    files.append(rel)
    small += min(width, height) < image_size
  if skipped:
    logging.warning("image folder %s: skipped %d file(s) that do not open as images: %s%s", root, len(skipped),
                    ", ".join(skipped[:5]), " ..." if len(skipped) > 5 else "")
  if not files:
    raise ImageFolderError(f"config.data.data_dir={root!r}: none of its {len(found)} image files opens as an image")
  if small:
    logging.warning("image folder %s: %d image(s) are smaller than data.image_size=%d on their shorter side and "
                    "are upscaled", root, small, image_size)
  tops = [rel.split(os.sep)[0] if os.sep in rel else None for rel in files]
  class_names = tuple(sorted({t for t in tops if t is not None})) if all(tops) else ()
  labels = np.array([class_names.index(t) if class_names else -1 for t in tops], np.int32)
  captions = _read_captions(root, files)
  return FolderIndex(root, tuple(files), labels, class_names, captions, tuple(skipped), small)


def _read_captions(root: str, files: list[str]) -> tuple[str, ...]:
  path = os.path.join(root, METADATA_FILE)
  if not os.path.exists(path):
    return ("",) * len(files)
  by_file = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        name, text = entry["file_name"], entry["text"]
      except (ValueError, KeyError, TypeError):
        raise ImageFolderError(f"{path} line {number} is invalid: expected a JSON object with \"file_name\" and "
                               f"\"text\", got {line.strip()[:100]!r}") from None
      if not os.path.exists(os.path.join(root, name)):
        raise ImageFolderError(f"{path} line {number} names file_name={name!r}, which is not in {root}")
      by_file[os.path.normpath(name)] = str(text)
  return tuple(by_file.get(os.path.normpath(rel), "") for rel in files)


def fit_image(image: "np.ndarray | Image.Image", image_size: int, channels: int) -> np.ndarray:
  """uint8 [S,S,C]: the shorter side resized to S (bicubic, antialiased), centre-cropped, converted to C
  channels (1: luminance, 3: RGB). Takes a PIL image or an array [H,W] / [H,W,C]."""
  from PIL import Image
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
  if image.mode in ("I", "F") or image.mode.startswith("I;16"):
    # 16-bit (and 32-bit) grayscale: Pillow's convert("L") clips at 255 (white); scale 0..65535 to 0..255.
    pixels = np.asarray(image, np.float64)
    if image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
      pixels = pixels / 257.0
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
  image = image.convert("L" if channels == 1 else "RGB")
  width, height = image.size
  if (width, height) != (image_size, image_size):
    scale = image_size / min(width, height)
    size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
  return np.asarray(image, np.uint8).reshape(image_size, image_size, channels)


def load_image(path: str, image_size: int, channels: int) -> np.ndarray:
  """An image file as fit_image's uint8 [S,S,C]; ImageFolderError naming the file when it does not decode."""
  from PIL import Image
  try:
    with open_file(path) as file, Image.open(file) as image:  # local or gs://
      return fit_image(image, image_size, channels)
  except OSError as e:
    raise ImageFolderError(f"image file {path} does not decode ({e}): remove or replace it") from None


class ImageFolderSource:
  """Random access to a scanned folder: record i = {"image": uint8 [S,S,C], "label": int32, "caption": str}.
  Picklable (grain's worker processes each get a copy)."""

  def __init__(self, index: FolderIndex, image_size: int, channels: int):
    self.index, self.image_size, self.channels = index, image_size, channels

  def __len__(self) -> int:
    return len(self.index.files)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    return {"image": load_image(os.path.join(self.index.root, self.index.files[i]), self.image_size, self.channels),
            "label": self.index.labels[i], "caption": self.index.captions[i]}
