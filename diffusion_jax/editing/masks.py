"""Masks and canvases for editing, as numpy on the host. A mask is float32 [H,W,1] in {0, 1}, 1 = regenerate
(white in a mask PNG), 0 = keep the input there."""

from __future__ import annotations

import numpy as np

from diffusion_jax.image_condition import centre_box
from diffusion_jax.images import open_file

SIDES = ("left", "right", "top", "bottom", "all")


def parse_box(text: str, height: int, width: int, key: str = "edit.box") -> tuple[int, int, int, int]:
  """'y0,x0,y1,x1' (pixels, end exclusive) inside an HxW image with y0 < y1, x0 < x1; '' = the centre
  quarter (half the height and half the width). ValueError naming `key` otherwise."""
  if not str(text).strip():
    return centre_box(height, width)
  try:
    y0, x0, y1, x1 = (int(v) for v in str(text).split(","))
  except ValueError:
    raise ValueError(f"config.{key}={text!r} is invalid: expected four integers y0,x0,y1,x1 (pixels, end "
                     f"exclusive), e.g. {height // 4},{width // 4},{3 * height // 4},{3 * width // 4}") from None
  if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
    raise ValueError(f"config.{key}={text!r} is invalid: the box must be non-empty and inside the {height}x{width} "
                     f"image (0 <= y0 < y1 <= {height}, 0 <= x0 < x1 <= {width})")
  return y0, x0, y1, x1


def box_mask(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
  """[H,W,1] with 1 inside the box y0,x0,y1,x1 (end exclusive)."""
  y0, x0, y1, x1 = box
  mask = np.zeros((height, width, 1), np.float32)
  mask[y0:y1, x0:x1] = 1.0
  return mask


def load_mask(path: str, height: int, width: int, key: str = "edit.mask") -> np.ndarray:
  """A PNG mask of the image's size, black (0) = keep, white (255) = regenerate (any channels, alpha dropped)
  -> [H,W,1]. ValueError naming `key` for a missing / undecodable file, another size, other values, or a mask
  with nothing to regenerate."""
  from PIL import Image
  try:
    with open_file(path) as file, Image.open(file) as image:  # local or gs://
      pixels = np.asarray(image.convert("L"))
  except FileNotFoundError:
    raise ValueError(f"config.{key}={path!r} is invalid: the file does not exist") from None
  except OSError as e:
    raise ValueError(f"config.{key}={path!r} is invalid: the file does not decode as an image ({e})") from None
  if pixels.shape != (height, width):
    raise ValueError(f"config.{key}={path!r} is invalid: the mask is {pixels.shape[0]}x{pixels.shape[1]}, the "
                     f"images are {height}x{width}: give a mask of the model's image size")
  values = np.unique(pixels)
  if not set(values.tolist()) <= {0, 255}:
    raise ValueError(f"config.{key}={path!r} is invalid: a mask must be binary (0 = keep, 255 = regenerate), it "
                     f"has {len(values)} distinct values {values[:6].tolist()}{'...' if len(values) > 6 else ''}")
  if not values.max(initial=0):
    raise ValueError(f"config.{key}={path!r} is invalid: the mask is all black (nothing to regenerate)")
  return (pixels == 255).astype(np.float32)[..., None]


def outpaint_canvas(images: np.ndarray, extend: int, side: str) -> tuple[np.ndarray, np.ndarray]:
  """(canvas [N,H',W',C] with the images placed inside and mid-gray elsewhere, mask [H',W',1] = 1 on the new
  border): `extend` pixels added on `side` (SIDES; 'all' adds them on every side)."""
  if side not in SIDES:
    raise ValueError(f"config.edit.side={side!r} is invalid: choose one of {SIDES}")
  n, h, w, c = images.shape
  top = extend if side in ("top", "all") else 0
  bottom = extend if side in ("bottom", "all") else 0
  left = extend if side in ("left", "all") else 0
  right = extend if side in ("right", "all") else 0
  canvas = np.full((n, h + top + bottom, w + left + right, c), 128, images.dtype)
  canvas[:, top:top + h, left:left + w] = images
  mask = np.ones((h + top + bottom, w + left + right, 1), np.float32)
  mask[top:top + h, left:left + w] = 0.0
  return canvas, mask


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
  """A pixel mask [..., H, W, 1] on the latent grid [..., H/f, W/f, 1]: a latent cell is regenerated when any
  pixel it covers is (max-pooling, so no hole pixel is left to the known latents)."""
  *lead, h, w, _ = mask.shape
  if h % factor or w % factor:
    raise ValueError(f"a mask of {h}x{w} does not map onto a latent grid of factor {factor}")
  return mask.reshape(*lead, h // factor, factor, w // factor, factor, 1).max(axis=(-4, -2))


def seam_score(images: np.ndarray, mask: np.ndarray) -> float:
  """How visible the border between kept and generated pixels is: the mean absolute difference between
  neighbouring pixels across the border, divided by the same mean over neighbouring pairs away from it (1 = the
  border looks like the rest of the image; larger = a visible seam). images [N,H,W,C] in any range; mask
  [H,W,1]."""
  x = np.asarray(images, np.float64)
  m = mask[..., 0] > 0.5
  scores = []
  for axis in (1, 2):
    diff = np.abs(np.diff(x, axis=axis)).mean(axis=-1)  # [N,H-1,W] or [N,H,W-1]
    a = np.take(m, range(m.shape[axis - 1] - 1), axis=axis - 1)
    b = np.take(m, range(1, m.shape[axis - 1]), axis=axis - 1)
    scores.append((diff[:, a != b], diff[:, a == b]))
  across = np.concatenate([s[0].ravel() for s in scores])
  inside = np.concatenate([s[1].ravel() for s in scores])
  return float(across.mean() / max(inside.mean(), 1e-8))
