"""The four edits of a trained model (`mode=edit`), in pixel and latent space:

- inpaint: regenerate a hole (edit.box / edit.mask). Any model: RePaint's replacement with resampling
  (diffusion.inpaint); an inpainting model (image_condition.kind='masked'): its own sampler, conditioned on the
  masked image and the mask. Latent models work on the encoded image with the mask max-pooled to the latent
  grid, and the decoded output is composited with the input, so the kept pixels equal the input exactly.
- outpaint: the same on a larger canvas (edit.extend pixels on edit.side), in one pass: the U-Net is
  convolutional and its attention layers stay at their levels (UNet.for_size).
- img2img: SDEdit (Meng et al. 2022): the input noised to the schedule index a fraction edit.strength down the
  sampler's grid, then denoised under sample.prompt / class_labels; edit.invert=True starts from the input's
  DDIM inversion instead (deterministic, Song et al. 2021 sec. 4.3), and then samples with DDIM (eta=0).
- upscale: a super-resolution model (image_condition.kind='low_res', SR3) samples the full-resolution image
  conditioned on the bilinearly upsampled low-resolution input.

Writes DIR/edits/<task>.npz (inputs, masks (255 = regenerated), outputs, labels / prompts) and <task>.png
(input | mask | output per row).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import build, conditioning as C, diffusion as D, image_condition as IC, images as image_io
from diffusion_jax.diffusion.inpaint import inpaint_loop, repaint_path
from diffusion_jax.diffusion.samplers import respaced_for_ancestral, sample_loop, sampling_grid
from diffusion_jax.editing.inputs import load_edit_images
from diffusion_jax.editing.masks import box_mask, latent_mask, load_mask, outpaint_canvas, parse_box
from diffusion_jax.parallel.mesh import batch_sharding
from diffusion_jax.sampling import SampleSettings, conditional_model_fn, sample_images


@dataclasses.dataclass(frozen=True)
class EditResult:
  """What an edit wrote: uint8 inputs [N,h,w,C], masks [N,H,W,1] (255 = regenerated) or None, outputs
  [N,H,W,C], labels / prompts of the condition (None where unconditional)."""

  task: str
  inputs: np.ndarray
  masks: np.ndarray | None
  outputs: np.ndarray
  labels: np.ndarray | None = None
  prompts: np.ndarray | None = None


def img2img_grid(grid: np.ndarray, strength: float, sampler: str) -> np.ndarray:
  """The tail of a decreasing sampling grid SDEdit walks: its last round(strength * len) indices (diffusers'
  img2img convention), at least one (two for ancestral sampling, whose one-step process has no posterior)."""
  keep = max(1, int(round(len(grid) * strength)))
  if sampler == "ddpm":
    keep = max(keep, min(2, len(grid)))
  return np.asarray(grid)[-keep:]


def _condition(parts: build.Components, config: ml_collections.ConfigDict, num: int, labels: np.ndarray | None,
               text_encoder) -> tuple[Any, Any, dict, dict]:
  """(labels, prompts, cond, null_cond) for N edits: sample.prompt / class_labels where given, else, for class
  models (and class-caption text models) on dataset images, each image's own class."""
  s, spec = config.sample, parts.condition
  class_labels = s.class_labels
  if (not s.prompt and not s.class_labels and labels is not None and spec.kind != "none"
      and not spec.per_image_captions):
    class_labels = ",".join(str(int(k) % max(spec.num_labels, 1)) for k in labels)
  return C.sampling_inputs(spec, num, text_encoder, prompt=s.prompt, class_labels=class_labels)


def make_edit_fn(task: str, parts: build.Components, config: ml_collections.ConfigDict, mesh, *,
                 canvas_shape: tuple[int, int], decoder=None) -> Callable:
  """jit(params, key, batch, cond, null_cond, inputs) -> pixels [B,H,W,C] in [-1, 1]; inputs: {"image": pixels
  [B,H,W,C] in [-1, 1], "mask": [B,H,W,1] (1 = regenerate), "keep": [B,h,w,1] on the model's input grid}
  (upscale: {"low_res": [B,s,s,C]}). canvas_shape: the output's (H, W) in pixels."""
  e, settings = config.edit, SampleSettings.from_config(config.sample)
  sharding = batch_sharding(mesh)
  schedule, diffusion, spec = parts.schedule, parts.diffusion, parts.image_condition
  factor = 1 if parts.autoencoder is None else parts.autoencoder.downsample_factor
  shape = (canvas_shape[0] // factor, canvas_shape[1] // factor, parts.input_shape[-1])
  model = parts.model.for_size(parts.input_shape[0], shape[0])
  common = dict(prediction=diffusion.prediction, variance=diffusion.variance, clip_denoised=settings.clip_denoised)
  grid = sampling_grid(schedule, settings.num_steps, settings.sampler, settings.spacing)

  def encode(decoder_params, pixels):  # the posterior mean, scaled as the diffusion model was trained on
    if decoder is None:
      return pixels
    return decoder.scale * decoder.model.apply(decoder_params, pixels, method=decoder.model.encode).mean

  def fn(params, key, batch, decoder_params, cond, null_cond, inputs):
    if spec.kind == "masked":
      concat = IC.masked_condition(inputs["image"], inputs["mask"])
    elif spec.kind == "low_res":
      concat = IC.low_res_condition(inputs["low_res"], canvas_shape[0])
    if spec.kind:  # the image condition is the same for the conditional and the unconditional pass
      cond, null_cond = {**cond, "concat": concat}, {**null_cond, "concat": concat}
    model_fn = conditional_model_fn(model, params, cond, null_cond, settings.guidance_scale, sharding, shape[-1])
    key_noise, key_loop = jax.random.split(key)
    noise = jax.random.normal(key_noise, (batch, *shape), jnp.float32)
    sampler = dict(sampler=settings.sampler, eta=settings.eta, **common)
    if task in ("inpaint", "outpaint") and not spec.kind:
      respaced = respaced_for_ancestral(schedule, sampling_grid(schedule, settings.num_steps, "ddpm",
                                                                settings.spacing))
      path = repaint_path(respaced.num_timesteps, min(e.jump, respaced.num_timesteps), e.resample_steps)
      x = inpaint_loop(respaced, model_fn, encode(decoder_params, inputs["image"]), inputs["keep"], key_loop,
                       path=path, **common)
    elif task == "img2img":
      tail = img2img_grid(grid, e.strength, "ddim" if e.invert else settings.sampler)
      x_start = encode(decoder_params, inputs["image"])
      if e.invert:
        x_t = D.ddim_invert(schedule, model_fn, x_start, tail, prediction=diffusion.prediction,
                            variance=diffusion.variance)
        sampler = dict(sampler="ddim", eta=0.0, **common)
      else:
        x_t = D.q_sample(schedule, x_start, jnp.full((batch,), tail[0], jnp.int32), noise)
      x = sample_loop(schedule, model_fn, x_t, key_loop, tail, **sampler)
    else:  # an image-conditioned model: inpainting model or super-resolution, from noise
      x = sample_loop(schedule, model_fn, noise, key_loop, grid, **sampler)
    return x if decoder is None else decoder.decode(decoder_params, x)

  compiled = jax.jit(fn, static_argnums=2, out_shardings=sharding)
  decoder_params = None if decoder is None else decoder.params
  return lambda params, key, batch, cond, null_cond, inputs: compiled(params, key, batch, decoder_params, cond,
                                                                      null_cond, inputs)


def prepare_inputs(task: str, parts: build.Components, config: ml_collections.ConfigDict
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None, dict]:
  """(inputs uint8 [N,h,w,C] as given, canvas uint8 [N,H,W,C] or None, masks [N,H,W,1] (1 = regenerate) or
  None, dataset labels or None, the edit function's inputs)."""
  e, size = config.edit, config.data.image_size
  factor = 1 if parts.autoencoder is None else parts.autoencoder.downsample_factor
  to_float = lambda u: u.astype(np.float32) / 127.5 - 1.0
  if task == "upscale":
    low = parts.image_condition.low_res_size
    if e.downscale:
      full, labels = load_edit_images(config, size)
      images = image_io.to_uint8(IC.downsample(jnp.asarray(to_float(full)), low))
    else:
      images, labels = load_edit_images(config, low)
    return images, None, None, labels, {"low_res": to_float(images)}
  images, labels = load_edit_images(config, size)
  if task == "img2img":
    return images, None, None, labels, {"image": to_float(images)}
  if task == "inpaint":
    canvas = images
    mask = load_mask(e.mask, size, size) if e.mask else box_mask(size, size, parse_box(e.box, size, size))
  else:
    canvas, mask = outpaint_canvas(images, e.extend, e.side)
  masks = np.broadcast_to(mask, (len(images), *mask.shape)).astype(np.float32)
  keep = 1.0 - (masks if factor == 1 else latent_mask(masks, factor))
  return images, canvas, masks, labels, {"image": to_float(canvas), "mask": masks, "keep": keep}


def _method(task: str, e: ml_collections.ConfigDict, image_condition: str) -> str:
  """How make_edit_fn carries out the task, for the log."""
  if image_condition:
    return f"the {image_condition} model's own sampler"
  if task == "img2img":
    return f"SDEdit, strength {e.strength}" + (" from the DDIM inversion" if e.invert else "")
  resampling = f", {e.resample_steps} resamplings every {e.jump} steps" if e.resample_steps > 1 else ""
  return "RePaint replacement" + resampling


def run_edit(config: ml_collections.ConfigDict, workdir: str | epath.Path, *, parts: build.Components, mesh,
             params: Any, key: jax.Array, decoder=None, text_encoder=None) -> EditResult:
  """config.edit.task on config.edit.images with the (EMA) params; writes DIR/edits/<task>.npz and .png."""
  task = config.edit.task
  inputs, canvas, masks, labels, fn_inputs = prepare_inputs(task, parts, config)
  n = len(inputs)
  out_hw = (config.data.image_size,) * 2 if canvas is None else canvas.shape[1:3]
  labels, prompts, cond, null_cond = _condition(parts, config, n, labels, text_encoder)
  logging.info("edit %s: %d images -> %dx%d with %s", task, n, *out_hw, _method(task, config.edit,
                                                                                parts.image_condition.kind))
  fn = make_edit_fn(task, parts, config, mesh, canvas_shape=tuple(out_hw), decoder=decoder)
  outputs = sample_images(fn, params, key, n, config.sample.batch_size, cond, null_cond, fn_inputs)
  if masks is not None:  # the kept pixels are the input's, exactly (latent decoding only approximates them)
    outputs = np.where(masks > 0.5, outputs, canvas)
  result = EditResult(task, inputs, None if masks is None else (masks * 255).astype(np.uint8), outputs,
                      labels, prompts)
  if jax.process_index() == 0:
    path = write_edits(workdir, result)
    logging.info("wrote %s", path)
  return result


def side_by_side(result: EditResult, pad: int = 2) -> np.ndarray:
  """One uint8 image: a row per edit, input | mask | output, each on the output's canvas (an outpainting input
  placed where it sits in the canvas, an upscaling input enlarged by pixel repetition)."""
  n, h, w, c = result.outputs.shape
  rows = []
  for i in range(n):
    shown = result.inputs[i]
    if shown.shape[:2] != (h, w):
      if result.task == "upscale":
        shown = np.repeat(np.repeat(shown, -(-h // shown.shape[0]), 0), -(-w // shown.shape[1]), 1)[:h, :w]
      else:  # outpaint: the original inside the gray canvas
        canvas = np.full((h, w, c), 128, np.uint8)
        top, left = _placement(result.masks[i][..., 0] == 0)
        canvas[top:top + shown.shape[0], left:left + shown.shape[1]] = shown
        shown = canvas
    cells = [shown] + ([np.repeat(result.masks[i], c, -1)] if result.masks is not None else []) + [result.outputs[i]]
    rows.append(np.concatenate([np.pad(x, ((0, 0), (0, pad), (0, 0)), constant_values=255) for x in cells], 1))
  return image_io.make_grid(np.stack(rows), ncol=1 if n <= 8 else 2)


def _placement(keep: np.ndarray) -> tuple[int, int]:
  ys, xs = np.nonzero(keep)
  return int(ys.min()), int(xs.min())


def write_edits(workdir: str | epath.Path, result: EditResult) -> epath.Path:
  """DIR/edits/<task>.npz and <task>.png; returns the png's path."""
  directory = epath.Path(workdir) / "edits"
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {"inputs": result.inputs, "outputs": result.outputs}
  arrays.update({k: v for k, v in (("masks", result.masks), ("labels", result.labels),
                                   ("prompts", result.prompts)) if v is not None})
  with (directory / f"{result.task}.npz").open("wb") as f:
    np.savez(f, **arrays)
  path = directory / f"{result.task}.png"
  image_io.write_png(path, side_by_side(result))
  return path
