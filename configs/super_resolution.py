"""Super-resolution (SR3, Saharia et al. 2021): a U-Net conditioned on the bilinearly upsampled low-resolution
image (concatenated to x_t) learns the full-resolution image. Upscale with
`--config.mode=edit --config.edit.task=upscale`; a cascade upscales a base model's samples
(`bash launch/cascade.sh BASE_CONFIG BASE_DIR configs/super_resolution.py:7 SR_DIR`).

Variants (the low-resolution side): '7' (7x7 -> 28x28 Fashion-MNIST, default) and '14' (14x14 -> 28x28), the
U-Net and optimizer of configs/fashion_mnist.py's cpu variant, sized for ~10 minutes on 2 CPU cores; '16'
(16x16 -> 32x32 CIFAR-10) and '32' (32x32 -> 64x64 ImageNet 64x64) for accelerators.
"""

import os

import ml_collections

from diffusion_jax.config import get_base_config, load_config_file, parse_variant


def get_config(variant: str = "7"):
  (low,) = parse_variant(variant, "configs/super_resolution.py", ("7", "14", "16", "32"))
  if low in ("7", "14"):
    config = load_config_file(os.path.join(os.path.dirname(__file__), "fashion_mnist.py"), "cpu")
    config.num_train_steps = 2000
    config.sample.num_images = 64
  else:
    config = get_base_config()
    config.data.dataset = "cifar10" if low == "16" else "imagenet_resized/64x64"
    config.data.image_size, config.data.channels = 2 * int(low), 3
    config.data.random_flip = True
    config.num_train_steps = 200_000
    config.batch_size = 128
    config.log_every_steps = 500
    config.checkpoint_every_steps = 5000
    config.preview_every_steps = 10_000
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2) if low == "16" else (1, 1, 2, 2, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (8,)  # SR3: no attention at the high resolutions
    config.model.dropout = 0.1
    config.sample.num_images = 10_000
    config.sample.batch_size = 500
  config.image_condition = ml_collections.ConfigDict(dict(kind="low_res", low_res_size=int(low)))
  config.diffusion.schedule = "cosine"
  # v-prediction (Salimans & Ho 2022), as the super-resolution stages of Imagen Video: on a small budget an eps
  # model's samples lag far behind (tests/test_editing.py's overfit check: eps needs ~10x the steps).
  config.diffusion.prediction = "v"
  config.sample.sampler = "ddim"  # the low-resolution input pins most of the image: few steps suffice
  config.sample.num_steps = 50
  config.sample.preview_sampler = "ddim"
  config.sample.preview_steps = 25
  config.eval.bpd_num_images = 0
  return config
