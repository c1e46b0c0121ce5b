"""DDPM on Fashion-MNIST. Default: sized for ~15 minutes on 2 CPU cores; ':full' for an accelerator."""

from diffusion_jax.config import get_base_config


def get_config(variant: str = "cpu"):
  config = get_base_config()
  config.data.dataset = "fashion_mnist"
  config.data.image_size = 28
  config.data.channels = 1
  config.diffusion.schedule = "cosine"  # IDDPM: better than linear at low resolution
  if variant == "cpu":
    config.num_train_steps = 2500
    config.batch_size = 32
    config.log_every_steps = 100
    config.checkpoint_every_steps = 500
    config.preview_every_steps = 1000
    config.model.ch = 16
    config.model.ch_mult = (1, 2, 4)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (7,)
    config.model.dropout = 0.0
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200
    config.optim.ema_decay = 0.999
    config.sample.num_images = 256  # enough for the metrics to mean something (fd over 128-d features)
    config.sample.sampler = "ddpm"
    config.sample.num_steps = 250  # respaced ancestral (IDDPM sec. 4): a quarter of the sampling time
    config.eval.bpd_num_images = 32
  elif variant == "full":
    config.num_train_steps = 200_000
    config.batch_size = 128
    config.log_every_steps = 500
    config.checkpoint_every_steps = 5000
    config.preview_every_steps = 10_000
    config.model.ch = 64
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (14, 7)
    config.model.dropout = 0.1
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 1000
    config.sample.num_images = 10_000
    config.sample.batch_size = 500
    config.eval.bpd_num_images = 10_000
  else:
    raise ValueError(f"unknown variant {variant!r} of configs/fashion_mnist.py; choose 'cpu' or 'full'")
  return config
