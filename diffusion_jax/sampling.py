"""Sampling a trained model: the compiled sample function (model fn -> guidance -> sampler -> decode), batches
over every device, and the files it writes (DIR/samples/<name>.npz and .png).

Every sampling setting is an explicit argument (`SampleSettings`), so a script that compares samplers or
guidance scales builds settings with `dataclasses.replace`, never by mutating the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import diffusion as D
from diffusion_jax import images as image_io
from diffusion_jax.parallel.mesh import batch_sharding, global_to_host


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How to sample: the sampler and its grid (diffusion.samplers), DDIM's eta, clipping of x0, guidance w."""

  sampler: str = "ddpm"
  num_steps: int | None = None  # None: all T steps
  spacing: str | None = None  # None: the sampler's default grid
  eta: float = 0.0
  clip_denoised: bool = True
  guidance_scale: float = 1.0

  @classmethod
  def from_config(cls, sample: Any, *, preview: bool = False) -> "SampleSettings":
    """From config.sample; `preview` takes the preview sampler and step count instead."""
    return cls(sampler=sample.preview_sampler if preview else sample.sampler,
               num_steps=sample.preview_steps if preview else sample.num_steps, spacing=sample.spacing,
               eta=sample.eta, clip_denoised=sample.clip_denoised, guidance_scale=sample.guidance_scale)


class Decoder:
  """What a latent sampler ends with (latent.LatentDecoder satisfies it): decode(params, latents) -> images."""

  params: Any

  def decode(self, params: Any, latents: jax.Array) -> jax.Array: ...


def conditional_model_fn(model, params: Any, cond: dict, null_cond: dict, guidance_scale: float,
                         sharding, guided_channels: int) -> Callable:
  """model_fn(x_t, t) of a trained U-Net: plain, or guided with classifier-free guidance when `cond` is given
  (cond / null_cond: pytrees with a leading [B] axis; an image condition sits in both)."""
  def conditional(x, t, c):
    return model.apply(params, jax.lax.with_sharding_constraint(x, sharding), t, **c)
  if cond:
    return D.guided_model_fn(conditional, cond, null_cond, guidance_scale, guided_channels=guided_channels)
  return lambda x, t: conditional(x, t, {})


def make_sample_fn(model, schedule: D.Schedule, settings: SampleSettings, mesh: Mesh,
                   input_shape: tuple[int, ...], *, prediction: str, variance: str, decoder: Decoder | None = None
                   ) -> Callable:
  """fn(params, key, batch, cond=None, null_cond=None) -> images [batch,H,W,C] in [-1,1], sharded over the
  mesh's data axis. cond / null_cond (conditional models) are pytrees with a leading [batch] axis, guided with
  settings.guidance_scale.

  With a `decoder`, the sampler runs on latents of `input_shape` and the frozen decoder maps them to pixels
  (its params are an argument of the compiled program, not constants baked into it).
  """
  sharding = batch_sharding(mesh)

  def fn(unet_params, key, batch, decoder_params, cond, null_cond):
    model_fn = conditional_model_fn(model, unet_params, cond, null_cond, settings.guidance_scale, sharding,
                                    input_shape[-1])
    x = D.sample(schedule, model_fn, (batch, *input_shape), key, sampler=settings.sampler,
                 num_steps=settings.num_steps, prediction=prediction, eta=settings.eta, variance=variance,
                 clip_denoised=settings.clip_denoised, spacing=settings.spacing)
    return x if decoder is None else decoder.decode(decoder_params, x)

  compiled = jax.jit(fn, static_argnums=2, out_shardings=sharding)
  decoder_params = None if decoder is None else decoder.params
  return lambda params, key, batch, cond=None, null_cond=None: compiled(params, key, batch, decoder_params,
                                                                        cond or {}, null_cond or {})


def device_batch_size(batch_size: int) -> int:
  """The smallest multiple of the device count >= batch_size (each device gets whole rows)."""
  n = jax.device_count()
  return max(n, -(-batch_size // n) * n)


def sample_images(sample_fn: Callable, params: Any, key: jax.Array, num_images: int, batch_size: int,
                  cond: dict | None = None, null_cond: dict | None = None, inputs: dict | None = None
                  ) -> np.ndarray:
  """uint8 [num_images,H,W,C] in batches of `batch_size` (rounded up to the devices), batch i with key
  fold_in(key, i); cond and null_cond are host pytrees with a leading [num_images] axis
  (conditioning.sampling_inputs); `inputs` (editing: the images to edit, their masks), a host pytree with a
  leading [num_images] axis, is passed in the same batches as sample_fn's last argument."""
  batch_size = device_batch_size(batch_size)
  out = []
  for i in tqdm.trange(-(-num_images // batch_size), desc="sampling", unit="batch",
                       disable=jax.process_index() > 0 or num_images <= batch_size):
    # This batch's conditions, padded to the compiled batch size by repetition.
    part = lambda a: jnp.asarray(np.resize(a[i * batch_size:(i + 1) * batch_size], (batch_size, *a.shape[1:])))
    c, u = jax.tree.map(part, cond or {}), jax.tree.map(part, null_cond or {})
    args = () if inputs is None else (jax.tree.map(part, inputs),)
    out.append(image_io.to_uint8(global_to_host(sample_fn(params, jax.random.fold_in(key, i), batch_size, c, u,
                                                          *args))))
  return np.concatenate(out)[:num_images]


def write_samples(workdir: str | epath.Path, images: np.ndarray, name: str = "samples",
                  labels: np.ndarray | None = None, prompts: np.ndarray | None = None) -> tuple[epath.Path, np.ndarray]:
  """DIR/samples/<name>.npz (images uint8 [N,H,W,C], labels int [N], prompts [N]) and a grid .png, one row per
  prompt with its caption for text models; returns (png path, grid image)."""
  directory = epath.Path(workdir) / "samples"
  directory.mkdir(parents=True, exist_ok=True)
  extra = {k: v for k, v in (("labels", labels), ("prompts", prompts)) if v is not None}
  with (directory / f"{name}.npz").open("wb") as f:
    np.savez(f, images=images, **extra)
  path = directory / f"{name}.png"
  grid = image_io.make_grid(images) if prompts is None else image_io.captioned_grid(images, prompts)
  image_io.write_png(path, grid)
  return path, grid
