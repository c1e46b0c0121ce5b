"""Shared test fixtures: a tiny config and synthetic Fashion-MNIST-format data."""

import os

import numpy as np

from diffusion_jax.config import get_base_config, optim_config
from diffusion_jax.data.idx import write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_fake_fashion_mnist(directory: str, n_train: int = 64, n_test: int = 16, size: int = 16) -> str:
  """idx.gz files of blocky images (class c: a bright square at a class-dependent place)."""
  rng = np.random.default_rng(0)
  for split, n in (("train", n_train), ("t10k", n_test)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = np.zeros((n, size, size), np.uint8)
    for i, c in enumerate(labels):
      r, col = divmod(int(c), 4)
      images[i, 2 + 3 * r:6 + 3 * r, 1 + 3 * col:5 + 3 * col] = 255
    write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), labels)
  return directory


def tiny_config(data_dir: str):
  config = get_base_config()
  config.data.data_dir = data_dir
  config.data.image_size = 16
  config.num_train_steps = 4
  config.batch_size = 8
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.preview_every_steps = 4
  config.diffusion.num_timesteps = 50
  config.model.ch = 8
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.0
  config.optim.warmup_steps = 1
  config.optim.learning_rate = 1e-3
  config.sample.num_images = 10
  config.sample.batch_size = 8
  config.sample.preview_images = 8
  config.sample.preview_steps = 5
  return config


def tiny_text_config(data_dir: str):
  """tiny_config, text-conditional through the real MiniLM encoder (cross-attention at 8x8), guided w=3."""
  config = tiny_config(data_dir)
  config.text.encoder, config.model.context_dim = "minilm", 384
  config.model.head_channels = 8
  config.sample.guidance_scale = 3.0
  return config


def tiny_latent_config(data_dir: str):
  import ml_collections
  config = tiny_config(data_dir)
  config.autoencoder = a = ml_collections.ConfigDict()
  a.model = ml_collections.ConfigDict(dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=2,
                                           conv_impl="xla"))
  a.optim = optim_config(learning_rate=1e-3, warmup_steps=1)
  a.kl_weight, a.rec_loss, a.batch_size, a.num_train_steps = 1e-6, "l1", 8, 4
  a.checkpoint_dir = ml_collections.config_dict.placeholder(str)
  config.model.attn_resolutions = (4,)  # 8x8x2 latents
  config.sample.clip_denoised = False
  return config


class TraceCounter:
  """Wraps a function and counts how often it runs in Python: under jit, how often it is traced, so a test
  can assert that repeated calls compile once (chex.assert_max_traces' idea, without the dependency)."""

  def __init__(self, fn):
    self.fn, self.count = fn, 0

  def __call__(self, *args, **kwargs):
    self.count += 1
    return self.fn(*args, **kwargs)
