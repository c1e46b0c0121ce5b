"""The base config every experiment in configs/ starts from, and loading a config file with overrides.

Each section maps onto one typed object, built in `build.py`: `model` holds the U-Net's constructor arguments
(`UNet(**config.model)`), `autoencoder.model` the autoencoder's, `optim` / `autoencoder.optim` an `OptimSettings`,
`diffusion` a `DiffusionSettings` and `sample` a `sampling.SampleSettings`. `config_check.check_config` validates
every section once, at start-up.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # the root of every key and data order (keys.RunKeys)
  config.mode = "train"  # train (then sample and evaluate) | sample | eval
  config.num_train_steps = 10_000
  config.batch_size = 64  # global, split over every device of every process
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.preview_every_steps = 2000  # preview sample grids under DIR/samples/ and in TensorBoard
  config.keep_checkpoints = 3

  config.data = _data()
  config.diffusion = _diffusion()
  config.model = _model()
  # None: diffusion on pixels. Latent configs set a section with `model` (AutoencoderKL's arguments), `optim`
  # and stage 1's schedule (configs/latent.py).
  config.autoencoder = None
  config.text = _text()
  config.optim = optim_config(learning_rate=2e-4, warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999)
  config.sample = _sample()
  config.eval = _eval()
  return config


def _data() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  data.dataset = "fashion_mnist"
  data.data_dir = config_dict.placeholder(str)  # None: Debian's files, else tfds' default
  data.image_size = 28
  data.channels = 1
  data.random_flip = False
  return data


def _diffusion() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.schedule = "linear"
  d.num_timesteps = 1000
  d.prediction = "eps"  # eps | x0 | v
  d.loss = "simple"  # simple | hybrid | vlb
  d.variance = "fixed_large"  # fixed_small | fixed_large | learned_range
  d.vlb_weight = 1e-3  # IDDPM lambda for the hybrid loss
  d.snr_gamma = 0.0  # min-SNR-gamma weighting; 0 = off
  d.timestep_sampler = "uniform"  # uniform | importance
  d.p_uncond = 0.1  # conditional models: condition dropout for classifier-free guidance
  return d


def _model() -> ml_collections.ConfigDict:
  """The U-Net's constructor arguments (models.UNet), all of them; its output channels follow from the data."""
  m = ml_collections.ConfigDict()
  m.ch = 128
  m.ch_mult = (1, 2, 2, 2)
  m.num_res_blocks = 2
  m.attn_resolutions = (16,)
  m.dropout = 0.1
  m.num_heads = 1
  m.head_channels = -1
  m.resblock_updown = False
  m.scale_shift_norm = False
  m.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  m.num_classes = 0  # > 0: class-conditional (a learned class embedding; label num_classes = null)
  m.context_dim = 0  # > 0: cross-attention to a text context of this width (the text encoder's: minilm 384)
  m.pooled_context = True  # text models: the mean token also joins the timestep embedding (Imagen)
  m.concat_channels = 0  # > 0: extra input channels for spatially aligned conditions
  m.conv_impl = "xla"  # xla | im2col (9 slices + one matmul; slower here, see README's bench table)
  return m


def _text() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.encoder = config_dict.placeholder(str)  # None: no text; minilm | clip (frozen, pretrained)
  t.model_dir = config_dict.placeholder(str)  # None: minilm from its pip wheel, clip from the hub
  t.max_length = 16  # tokens per prompt (longer prompts are truncated with a warning)
  return t


def _sample() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.num_images = 64
  s.batch_size = 64
  s.sampler = "ddpm"  # ddpm | ddim | dpmpp_2m | euler | heun
  s.num_steps = config_dict.placeholder(int)  # None: all T steps
  s.spacing = config_dict.placeholder(str)  # None: the sampler's default grid (samplers.DEFAULT_SPACING)
  s.eta = 0.0  # DDIM: 0 deterministic, 1 ~ ancestral
  s.guidance_scale = 1.0  # classifier-free guidance w: out_uncond + w (out_cond - out_uncond); 1 = none
  s.class_labels = ""  # conditional models: '' = every class in turn, '3' = class 3, '0,3,7' = one per image
  s.prompt = ""  # text models: '' = every class's caption in turn; 'a | b' = several prompts
  s.clip_denoised = True
  s.checkpoint_step = config_dict.placeholder(int)  # None: latest
  s.preview_images = 36
  s.preview_sampler = "ddpm"
  s.preview_steps = 100
  return s


def _eval() -> ml_collections.ConfigDict:
  e = ml_collections.ConfigDict()
  e.after_training = True  # mode=train ends with the metrics of the final samples
  e.bpd_num_images = 0  # test images for bits/dim (T network calls each); 0 skips it
  e.bpd_batch_size = 128
  e.fid = True  # FID with pytorch-fid's Inception-v3, where its weight file is present or downloadable
  e.download_inception = True
  e.inception_weights = config_dict.placeholder(str)  # None: ~/.cache/diffusion_jax/pt_inception-...pth
  e.fid_reference_stats = config_dict.placeholder(str)  # None: computed from the test split and cached
  return e


def optim_config(*, learning_rate: float, warmup_steps: int, grad_clip: float = 0.0, weight_decay: float = 0.0,
                 ema_decay: float = 0.0) -> ml_collections.ConfigDict:
  """An optimizer section (build.OptimSettings): AdamW, linear warmup, global-norm clipping (0 = off), EMA
  of the params (0 = none)."""
  return ml_collections.ConfigDict(dict(learning_rate=learning_rate, warmup_steps=warmup_steps, grad_clip=grad_clip,
                                        b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, ema_decay=ema_decay))


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`configs/latent.py:full` (a path, or a name under configs/) with `a.b=value` overrides, parsed exactly as
  main's `--config.a.b=value` flags are (ml_collections' config_flags), so scripts and the CLI agree."""
  import os

  from absl import flags
  from ml_collections import config_flags
  path, sep, variant = spec.partition(":")
  if not path.endswith(".py"):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", path + ".py")
  argv = ["load_config", f"--config={path}{sep}{variant}", *(f"--config.{o}" for o in overrides)]
  flag_values = flags.FlagValues()
  # config_flags finds the override flags in the argv it is given at definition time.
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config
