"""Image conditions concatenated to the U-Net's input channels (`model.concat_channels`), set by
`config.image_condition`:

- `low_res` (super-resolution, SR3: Saharia et al. 2021, sec. 2.2-2.3): the image downsampled to
  `low_res_size` and bilinearly upsampled back, [B,H,W,C]; sampling turns a low-resolution image into a
  full-resolution one.
- `masked` (a dedicated inpainting model, as Stable Diffusion's inpainting U-Net / LDM sec. 4.5 / Palette):
  the image with its masked region zeroed and the mask, [B,H,W,C+1]; training draws random boxes and strokes.

Pure functions over arrays; keys are passed in.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("low_res", "masked")


@dataclasses.dataclass(frozen=True)
class ImageConditionSpec:
  """config.image_condition, typed (build.image_condition_spec); kind '' = none."""

  kind: str = ""
  low_res_size: int = 0  # low_res: the side of the low-resolution input

  def channels(self, image_channels: int) -> int:
    """The U-Net's concat_channels for images of `image_channels`."""
    return {"": 0, "low_res": image_channels, "masked": image_channels + 1}[self.kind]


def centre_box(height: int, width: int) -> tuple[int, int, int, int]:
  """The default hole (y0, x0, y1, x1), end exclusive: the centre quarter, half the height and half the width."""
  return height // 4, width // 4, height // 4 + height // 2, width // 4 + width // 2


def downsample(images: jax.Array, size: int) -> jax.Array:
  """[B,H,W,C] -> [B,size,size,C], area-weighted (antialiased linear): the low-resolution input."""
  return jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]), "linear", antialias=True)


def upsample(images: jax.Array, size: int) -> jax.Array:
  """[B,h,w,C] -> [B,size,size,C] bilinear (SR3 sec. 2.3 conditions on the upsampled low-resolution image)."""
  return jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]), "linear")


def low_res_condition(low_res: jax.Array, size: int) -> jax.Array:
  """The concat input of a `low_res` model [B,size,size,C] from low-resolution images [B,h,w,C] in [-1, 1]."""
  return upsample(low_res, size)


def masked_condition(images: jax.Array, mask: jax.Array) -> jax.Array:
  """The concat input of a `masked` model: [image * (1 - mask), mask] [B,H,W,C+1]; mask [B,H,W,1], 1 = hole."""
  mask = mask.astype(images.dtype)
  return jnp.concatenate([images * (1.0 - mask), mask], axis=-1)


def random_masks(key: jax.Array, batch: int, height: int, width: int) -> jax.Array:
  """Training holes [B,H,W,1] in {0, 1} (1 = regenerate): per example, a box (side 1/4 .. 3/4 of the image,
  anywhere), a thick stroke (a line segment of width ~H/6 between two random points), or both; the mix of
  LaMa's "wide" masks (Suvorov et al. 2022, sec. 3.3) at this scale, plus a few fully masked examples so the
  model also learns plain generation (an outpainting canvas is mostly hole)."""
  keys = jax.random.split(key, 6)
  ys, xs = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
  # Boxes: corner and size uniform.
  size = jax.random.uniform(keys[0], (batch, 2), minval=0.25, maxval=0.75) * jnp.asarray([height, width])
  corner = jax.random.uniform(keys[1], (batch, 2)) * (jnp.asarray([height, width]) - size)
  y0, x0 = corner[:, 0, None, None], corner[:, 1, None, None]
  box = (ys >= y0) & (ys < y0 + size[:, 0, None, None]) & (xs >= x0) & (xs < x0 + size[:, 1, None, None])
  # Strokes: the points within distance r of a segment p-q.
  p = jax.random.uniform(keys[2], (batch, 2)) * jnp.asarray([height, width])
  q = jax.random.uniform(keys[3], (batch, 2)) * jnp.asarray([height, width])
  d = q - p
  rel_y, rel_x = ys - p[:, 0, None, None], xs - p[:, 1, None, None]
  s = jnp.clip((rel_y * d[:, 0, None, None] + rel_x * d[:, 1, None, None])
               / jnp.maximum(jnp.sum(d * d, -1), 1e-6)[:, None, None], 0.0, 1.0)
  dist2 = (rel_y - s * d[:, 0, None, None]) ** 2 + (rel_x - s * d[:, 1, None, None]) ** 2
  stroke = dist2 <= (max(height, width) / 12.0) ** 2
  kind = jax.random.randint(keys[4], (batch, 1, 1), 0, 3)  # 0 box, 1 stroke, 2 both
  mask = jnp.where(kind == 0, box, jnp.where(kind == 1, stroke, box | stroke))
  full = jax.random.bernoulli(keys[5], 0.1, (batch, 1, 1))
  return (mask | full).astype(jnp.float32)[..., None]


def train_concat(spec: ImageConditionSpec, key: jax.Array, images: jax.Array) -> jax.Array:
  """The concat input a training batch of images [B,H,W,C] in [-1, 1] is conditioned on."""
  b, h, w, _ = images.shape
  if spec.kind == "low_res":
    return low_res_condition(downsample(images, spec.low_res_size), h)
  if spec.kind == "masked":
    return masked_condition(images, random_masks(key, b, h, w))
  raise ValueError(f"image condition kind {spec.kind!r} is invalid: choose one of {KINDS}")


def sampling_concat(spec: ImageConditionSpec, images: np.ndarray) -> np.ndarray:
  """The concat input for samples of an image-conditioned model (previews, final samples, mode=sample) from
  real images uint8 [N,H,W,C]: their low-resolution versions (super-resolution), or the images with the
  centre quarter masked (inpainting)."""
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  n, h, w, _ = x.shape
  if spec.kind == "low_res":
    return np.asarray(low_res_condition(downsample(x, spec.low_res_size), h))
  y0, x0, y1, x1 = centre_box(h, w)
  mask = jnp.zeros((n, h, w, 1)).at[:, y0:y1, x0:x1].set(1.0)
  return np.asarray(masked_condition(x, mask))
