"""The DDPM paper's CIFAR-10 setup (Ho et al. 2020, sec. 4 and appendix B) for accelerators."""

from diffusion_jax.config import get_base_config


def get_config():
  config = get_base_config()
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True
  config.diffusion.schedule = "linear"
  config.diffusion.num_timesteps = 1000
  config.diffusion.variance = "fixed_large"
  config.model.ch = 128  # 35.7M parameters
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.grad_clip = 1.0
  config.optim.ema_decay = 0.9999
  config.batch_size = 128
  config.num_train_steps = 800_000
  config.log_every_steps = 1000
  config.checkpoint_every_steps = 10_000
  config.preview_every_steps = 50_000
  config.sample.num_images = 50_000
  config.sample.batch_size = 1000
  config.eval.bpd_num_images = 10_000  # the whole test split, as IDDPM reports
  return config
