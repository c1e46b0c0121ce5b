"""Text-conditional latent diffusion (LDM) on Fashion-MNIST: a KL autoencoder with f=4 (28x28x1 -> 7x7x4),
then a DDPM on its scaled latents that reads captions through a frozen MiniLM encoder (cross-attention) with
classifier-free guidance. Variants (comma-separated): size 'cpu' (default: both stages on 2 CPU cores) or
'full' (an accelerator); conditioning 'text' (default), 'class' (class labels) or 'uncond'.
E.g. --config=configs/latent.py:full,class"""

import ml_collections

from diffusion_jax.config import get_base_config, optim_config, parse_variant


SIZES = ("cpu", "full")
CONDITIONINGS = ("text", "class", "uncond")


def get_config(variant: str = "cpu"):
  size, conditioning = parse_variant(variant, "configs/latent.py", SIZES, CONDITIONINGS)
  config = get_base_config()
  config.data.dataset = "fashion_mnist"
  config.data.image_size = 28
  config.data.channels = 1

  # Stage 1: the KL autoencoder. `model` is AutoencoderKL's arguments (out_channels follow the data).
  config.autoencoder = a = ml_collections.ConfigDict()
  a.model = ml_collections.ConfigDict(dict(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(),
                                           z_channels=4, conv_impl="auto",
                                           conv_precision="float32", matmul_precision="float32"))  # f = 4; as model's
  a.optim = optim_config(learning_rate=1e-3, warmup_steps=100)  # Adam, no clipping, no EMA
  a.kl_weight = 1e-6  # LDM's KL-reg weight
  a.rec_loss = "l1"
  a.batch_size = 32
  a.num_train_steps = 1500
  a.checkpoint_dir = ml_collections.config_dict.placeholder(str)  # reuse a finished stage 1 from elsewhere

  config.diffusion.schedule = "linear"
  config.diffusion.prediction = "eps"
  config.model.ch = 32
  config.model.ch_mult = (1, 2)  # 7x7 latents, padded to 8x8
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.0
  if conditioning == "text":
    config.model.head_channels = 32  # 2 heads of 32 at 4x4 (class/uncond: 1 head, as their README rows used)
    config.text.encoder = "minilm"  # captions -> frozen all-MiniLM-L6-v2 tokens [B,16,384]
    config.model.context_dim = 384
  elif conditioning == "class":
    config.model.num_classes = 10
  if conditioning != "uncond":
    config.diffusion.p_uncond = 0.1  # the null condition 10% of the time, for guidance
    config.sample.guidance_scale = 3.0
  config.sample.clip_denoised = False  # latents are not in [-1, 1]
  config.eval.bpd_num_images = 0  # bits/dim is a pixel-space bound
  if size == "cpu":
    config.num_train_steps = 3000
    config.batch_size = 64
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.preview_every_steps = 2000
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200
    config.optim.ema_decay = 0.999
    config.sample.num_images = 256
    config.sample.sampler = "ddpm"
    config.sample.num_steps = 250
  else:
    a.model.ch, a.model.ch_mult, a.model.num_res_blocks = 64, (1, 2, 2), 2
    a.num_train_steps, a.batch_size = 50_000, 64
    a.optim.learning_rate = 4.5e-6 * 64  # LDM: base lr 4.5e-6 scaled by the batch size
    config.model.ch = 128
    config.model.num_res_blocks = 2
    config.num_train_steps = 200_000
    config.batch_size = 128
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 1000
    config.log_every_steps = 500
    config.checkpoint_every_steps = 5000
    config.preview_every_steps = 10_000
    config.sample.num_images = 10_000
    config.sample.batch_size = 500
  return config
