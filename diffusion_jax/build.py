"""Config -> typed objects: the one place that turns config sections into the model, the schedule, the
optimizer, the conditioning and the input shape. Library code below it takes these objects, never the config.

Decisions made here once: whether the model is latent (`config.autoencoder is not None`), what it is
conditioned on (`condition_spec`), and the shape its inputs have (`input_shape`: pixels or latents).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import ml_collections
import optax

from diffusion_jax import conditioning as C
from diffusion_jax import diffusion as D
from diffusion_jax.image_condition import ImageConditionSpec
from diffusion_jax.models import UNet
from diffusion_jax.models.autoencoder import AutoencoderKL

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
  """config.diffusion, typed: the noise schedule and what the network predicts and is trained on."""

  schedule: str = "linear"
  num_timesteps: int = 1000
  prediction: str = "eps"
  loss: str = "simple"
  variance: str = "fixed_large"
  vlb_weight: float = 1e-3
  snr_gamma: float = 0.0
  timestep_sampler: str = "uniform"
  p_uncond: float = 0.1


@dataclasses.dataclass(frozen=True)
class OptimSettings:
  """config.optim (or config.autoencoder.optim), typed: AdamW with linear warmup, global-norm clipping
  (0 = off) and an EMA of the params (0 = none)."""

  learning_rate: float
  warmup_steps: int
  grad_clip: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  ema_decay: float = 0.0
  nan_policy: str = "stop"  # a NaN/inf loss or gradient: 'stop' the run, or 'skip' the step (keep the state)
  grad_accum_steps: int = 1  # the batch's gradient over this many micro-batches, one at a time (less memory)


@dataclasses.dataclass(frozen=True)
class Components:
  """Everything the diffusion stage is made of; built once by `build_components`."""

  model: UNet
  schedule: D.Schedule
  diffusion: DiffusionSettings
  condition: C.ConditionSpec
  optim: OptimSettings
  tx: optax.GradientTransformation
  learning_rate_fn: Callable[[Any], Any]
  image_shape: tuple[int, int, int]  # pixels (H, W, C)
  input_shape: tuple[int, int, int]  # what the U-Net sees: pixels, or latents (h, w, z) for latent diffusion
  autoencoder: AutoencoderKL | None  # latent diffusion's stage 1, else None
  image_condition: ImageConditionSpec  # an image concatenated to the U-Net's input (SR, inpainting), or kind ''


def build_optimizer(settings: OptimSettings) -> tuple[optax.GradientTransformation, Callable]:
  """(AdamW with linear warmup (DDPM: 5000 steps) and global-norm clipping (DDPM: 1.0), its lr schedule);
  both stages use it (weight_decay=0 and grad_clip=0 make it plain Adam)."""
  warmup = max(settings.warmup_steps, 1)
  lr = optax.join_schedules([optax.linear_schedule(0.0, settings.learning_rate, warmup),
                             optax.constant_schedule(settings.learning_rate)], [warmup])
  tx = optax.chain(optax.clip_by_global_norm(settings.grad_clip) if settings.grad_clip > 0 else optax.identity(),
                   optax.adamw(lr, b1=settings.b1, b2=settings.b2, eps=settings.eps,
                               weight_decay=settings.weight_decay))
  return tx, lr


def build_schedule(settings: DiffusionSettings) -> D.Schedule:
  return D.make_schedule(D.get_beta_schedule(settings.schedule, settings.num_timesteps))


def is_latent(config: ml_collections.ConfigDict) -> bool:
  return config.get("autoencoder") is not None


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, config.data.channels)


def build_autoencoder(config: ml_collections.ConfigDict) -> AutoencoderKL | None:
  """AutoencoderKL(**config.autoencoder.model) decoding to the data's channels; None for pixel models."""
  if not is_latent(config):
    return None
  return AutoencoderKL(**config.autoencoder.model, out_channels=config.data.channels)


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """The diffusion model's input: the image shape, or the autoencoder's latent shape."""
  autoencoder = build_autoencoder(config)
  return image_shape(config) if autoencoder is None else autoencoder.latent_shape(image_shape(config))


def image_condition_spec(config: ml_collections.ConfigDict) -> ImageConditionSpec:
  """config.image_condition typed; kind '' when the section is None."""
  section = config.get("image_condition")
  if section is None:
    return ImageConditionSpec()
  return ImageConditionSpec(kind=section.kind, low_res_size=section.get("low_res_size", 0))


def build_unet(config: ml_collections.ConfigDict) -> UNet:
  """UNet(**config.model); its output is the input's channels, twice that when it learns the variance; an
  image condition sets concat_channels (config_check: model.concat_channels is then 0 or that number)."""
  channels = input_shape(config)[-1]
  out_channels = 2 * channels if config.diffusion.variance == "learned_range" else channels
  concat = image_condition_spec(config).channels(channels) or config.model.concat_channels
  return UNet(**{**config.model, "dtype": DTYPES[config.model.dtype], "concat_channels": concat},
              out_channels=out_channels)


def condition_spec(config: ml_collections.ConfigDict) -> C.ConditionSpec:
  """'text' with a text encoder (captions of the dataset), 'class' with model.num_classes > 0, else 'none'."""
  p_uncond = config.diffusion.p_uncond
  if config.get("text") is not None and config.text.encoder:
    from diffusion_jax.data import dataset_info
    info = dataset_info(config.data)
    if info.captions == "per_image":
      return C.ConditionSpec("text", p_uncond=p_uncond, captions=tuple((c,) for c in info.sample_captions),
                             per_image_captions=True)
    return C.ConditionSpec("text", p_uncond=p_uncond, captions=C.dataset_captions(config.data.dataset))
  if config.model.num_classes:
    return C.ConditionSpec("class", num_classes=config.model.num_classes, p_uncond=p_uncond)
  return C.ConditionSpec("none")


def build_components(config: ml_collections.ConfigDict) -> Components:
  diffusion = DiffusionSettings(**config.diffusion)
  optim = OptimSettings(**config.optim)
  tx, lr_fn = build_optimizer(optim)
  return Components(model=build_unet(config), schedule=build_schedule(diffusion), diffusion=diffusion,
                    condition=condition_spec(config), optim=optim, tx=tx, learning_rate_fn=lr_fn,
                    image_shape=image_shape(config), input_shape=input_shape(config),
                    autoencoder=build_autoencoder(config), image_condition=image_condition_spec(config))


def load_text_encoder(config: ml_collections.ConfigDict):
  """The config's frozen text encoder (text.encoder, text.model_dir, text.max_length), checked against the
  U-Net's cross-attention width; None for models without text."""
  if condition_spec(config).kind != "text":
    return None
  from diffusion_jax.models.text_encoders import load_text_encoder as load
  encoder = load(config.text.encoder, config.text.model_dir, config.text.max_length)
  if encoder.dim != config.model.context_dim:
    raise ValueError(f"config.model.context_dim={config.model.context_dim} does not match the {encoder.name} "
                     f"encoder's width {encoder.dim}: set --config.model.context_dim={encoder.dim}")
  return encoder
