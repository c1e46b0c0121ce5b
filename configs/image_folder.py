"""Your own images: a folder of PNG / JPEG files (`--config.data.data_dir=PATH`), streamed with grain.

Layout (Hugging Face imagefolder's, as diffusers' text-to-image training reads it):
  PATH/<class name>/<image>.png|.jpg   class labels from the sub-folder names (optional)
  PATH/metadata.jsonl                  optional captions: one {"file_name": "<class>/<image>.png", "text": "..."}
                                       per line
Images are resized (shorter side) and centre-cropped to data.image_size and converted to data.channels.

Variants (comma-separated): 'pixel' (default: a DDPM on the pixels) or 'latent' (a KL autoencoder, then
diffusion on its latents); 'text' (captions from metadata.jsonl through the frozen MiniLM encoder), 'class'
(one class per sub-folder: set --config.model.num_classes to their count) or 'uncond' (default). Sized for a
CPU trial at 32x32; raise image_size, model.ch and num_train_steps on an accelerator. E.g.
  python -m diffusion_jax.main --config=configs/image_folder.py:latent,text --workdir=runs/mine \\
      --config.data.data_dir=/path/to/images --config.data.image_size=64
"""

import os

import ml_collections

from diffusion_jax.config import get_base_config, optim_config, parse_variant

SPACES = ("pixel", "latent")
CONDITIONINGS = ("uncond", "class", "text")


def get_config(variant: str = "pixel"):
  space, conditioning = parse_variant(variant, "configs/image_folder.py", SPACES, CONDITIONINGS)
  config = get_base_config()
  config.data.dataset = "image_folder"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True
  # Decoding processes beside training: on 2 cores they take compute from the step (bench/input_pipeline.py:
  # 0.87x the step's speed at 256x256 with workers, 0.96x without), so only where cores are to spare.
  config.data.num_workers = max(0, min(4, (os.cpu_count() or 1) - 2))
  config.num_train_steps = 5000
  config.batch_size = 32
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.preview_every_steps = 1000
  config.diffusion.schedule = "cosine"
  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.0
  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.999
  config.sample.num_images = 36
  config.sample.num_steps = 250
  config.eval.fid = False  # needs the Inception weights; turn on with internet (eval.download_inception)
  if space == "latent":
    config.autoencoder = a = ml_collections.ConfigDict()
    a.model = ml_collections.ConfigDict(dict(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(),
                                             z_channels=4, conv_impl="auto",
                                             conv_precision="float32",
                                             matmul_precision="float32"))  # f = 4: 32x32x3 -> 8x8x4
    a.optim = optim_config(learning_rate=1e-3, warmup_steps=100)
    a.kl_weight = 1e-6
    a.rec_loss = "l1"
    a.batch_size = 32
    a.num_train_steps = 2000
    a.checkpoint_dir = ml_collections.config_dict.placeholder(str)
    config.model.ch_mult = (1, 2)
    config.model.attn_resolutions = (4,)
    config.sample.clip_denoised = False
  if conditioning == "text":
    config.text.encoder = "minilm"
    config.model.context_dim = 384
    config.model.head_channels = 32
  elif conditioning == "class":
    config.model.num_classes = 2  # the number of class sub-folders: override to yours
  if conditioning != "uncond":
    config.diffusion.p_uncond = 0.1
    config.sample.guidance_scale = 3.0
  return config
