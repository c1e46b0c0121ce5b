"""Image grids, a dependency-free PNG writer, and opening image files that may be remote."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from etils import epath


def open_file(path: str | os.PathLike, mode: str = "rb"):
  """A file object for `path`: remote ones (gs://, any scheme) through etils.epath, local ones through the builtin
  open, since the image-folder pipeline opens one file per image and epath's local open took 7-13% more per image
  (a 96x96 JPEG fitted to 64x64: 331-339 vs 299-308 us)."""
  text = os.fspath(path)
  return epath.Path(text).open(mode) if "://" in text else open(text, mode)


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255], rounded."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
  """uint8 [N,H,W,C] -> one uint8 [rows*(H+pad)+pad, ncol*(W+pad)+pad, C] tiled image."""
  n, h, w, c = images.shape
  ncol = ncol or int(np.ceil(np.sqrt(n)))
  nrow = -(-n // ncol)
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
  return grid


def write_png(path, image: np.ndarray) -> None:
  """Write uint8 [H,W], [H,W,1], [H,W,3] or [H,W,4] as an 8-bit PNG (RFC 2083)."""
  image = np.asarray(image, np.uint8)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  color = {2: 0, 3: {3: 2, 4: 6}.get(image.shape[-1] if image.ndim == 3 else 0)}[image.ndim]
  if color is None:
    raise ValueError(f"write_png needs [H,W], [H,W,1], [H,W,3] or [H,W,4] uint8, got {image.shape}")
  h, w = image.shape[:2]
  raw = b"".join(b"\x00" + image[r].tobytes() for r in range(h))  # filter type 0 per row

  def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

  with epath.Path(path).open("wb") as f:  # local or remote (gs://) paths alike
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def captioned_grid(images: np.ndarray, captions: np.ndarray, pad: int = 2, max_per_row: int = 16) -> np.ndarray:
  """uint8 [N,H,W,C] + captions [N] -> one image: rows per distinct caption (first-seen order, `max_per_row`
  images a row), the caption written left of its first row."""
  from PIL import Image, ImageDraw, ImageFont
  captions = np.asarray([str(c) for c in captions])
  order = list(dict.fromkeys(captions))
  rows = [(caption if i == 0 else "", group[i:i + max_per_row])
          for caption in order for group in [images[captions == caption]]
          for i in range(0, len(group), max_per_row)]
  n, h, w, c = images.shape
  font = ImageFont.load_default(size=max(9, min(h // 2, 13)))  # Pillow's bundled TrueType font
  text_w = max(int(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(caption, font=font)) for caption in order) + 8
  ncol = max(len(r) for _, r in rows)
  mode = "RGB" if c == 3 else "L"
  canvas = Image.new(mode, (text_w + ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (caption, row) in enumerate(rows):
    top = pad + i * (h + pad)
    draw.text((4, top + h // 2), caption, fill="black", font=font, anchor="lm")
    strip = make_grid(row, ncol=len(row), pad=pad)[pad:pad + h]
    canvas.paste(Image.fromarray(strip if c == 3 else strip[..., 0]), (text_w, top))
  grid = np.asarray(canvas)
  return grid if c == 3 else grid[..., None]
