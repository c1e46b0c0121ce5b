"""Shared defaults: every experiment config starts from `get_base_config()` and overrides what differs."""

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.mode = "train"  # train (then sample and evaluate) | sample | eval
  config.num_train_steps = 10_000
  config.batch_size = 64  # global, split over every device of every process
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.sample_every_steps = 2000  # preview grids under DIR/samples/ and in TensorBoard
  config.keep_checkpoints = 3

  config.data = data = ml_collections.ConfigDict()
  data.dataset = "fashion_mnist"
  data.data_dir = config_dict.placeholder(str)  # None: Debian's files, else tfds' default
  data.image_size = 28
  data.channels = 1
  data.random_flip = False

  config.diffusion = d = ml_collections.ConfigDict()
  d.schedule = "linear"
  d.num_timesteps = 1000
  d.prediction = "eps"  # eps | x0 | v
  d.loss = "simple"  # simple | hybrid | vlb
  d.variance = "fixed_large"  # fixed_small | fixed_large | learned_range
  d.vlb_weight = 1e-3  # IDDPM lambda for the hybrid loss
  d.snr_gamma = 0.0  # min-SNR-gamma weighting; 0 = off
  d.timestep_sampler = "uniform"  # uniform | importance
  d.p_uncond = 0.1  # class-conditional models: label dropout for classifier-free guidance

  config.model = m = ml_collections.ConfigDict()
  m.ch = 128
  m.ch_mult = (1, 2, 2, 2)
  m.num_res_blocks = 2
  m.attn_resolutions = (16,)
  m.dropout = 0.1
  m.num_heads = 1
  m.head_channels = -1
  m.resblock_updown = False
  m.scale_shift_norm = False
  m.dtype = "float32"  # compute dtype; params stay float32
  m.num_classes = 0  # > 0: class-conditional (a learned class embedding; label num_classes = null)
  m.context_dim = 0  # > 0: cross-attention to a text context of this width (the text encoder's: minilm 384)
  m.pooled_context = True  # text models: the mean token also joins the timestep embedding (Imagen)
  m.concat_channels = 0  # > 0: extra input channels for spatially aligned conditions
  m.conv_impl = "xla"  # xla | im2col (9 slices + one matmul; slower here, see README's bench table)

  config.text = t = ml_collections.ConfigDict()
  t.encoder = config_dict.placeholder(str)  # None: no text; minilm | clip (frozen, pretrained)
  t.model_dir = config_dict.placeholder(str)  # None: minilm from its pip wheel, clip from the hub
  t.max_length = 16  # tokens per prompt (longer prompts are truncated with a warning)

  config.optim = o = ml_collections.ConfigDict()
  o.learning_rate = 2e-4
  o.warmup_steps = 5000
  o.grad_clip = 1.0
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.0
  o.ema_decay = 0.9999

  config.sample = s = ml_collections.ConfigDict()
  s.num_images = 64
  s.batch_size = 64
  s.sampler = "ddpm"  # ddpm | ddim | dpmpp_2m | euler | heun
  s.num_steps = config_dict.placeholder(int)  # None: all T steps
  s.spacing = config_dict.placeholder(str)  # None: the sampler's default grid (samplers.DEFAULT_SPACING)
  s.eta = 0.0  # DDIM: 0 deterministic, 1 ~ ancestral
  s.guidance_scale = 1.0  # classifier-free guidance w: out_uncond + w (out_cond - out_uncond); 1 = none
  s.class_label = -1  # conditional sampling without a prompt: -1 cycles through the classes
  s.class_labels = ""  # or several: '0,3,7' (one label, or exactly num_images)
  s.prompt = ""  # text models: '' = every class's caption in turn; 'a | b' = several prompts
  s.clip_denoised = True
  s.checkpoint_step = config_dict.placeholder(int)  # None: latest
  s.preview_images = 36
  s.preview_sampler = "ddpm"
  s.preview_steps = 100

  config.eval = e = ml_collections.ConfigDict()
  e.after_training = True  # mode=train ends with the metrics of the final samples
  e.bpd_num_images = 0  # test images for bits/dim (T network calls each); 0 skips it
  e.bpd_batch_size = 128
  e.fid = True  # FID with pytorch-fid's Inception-v3, where its weight file is present or downloadable
  e.download_inception = True
  e.inception_weights = config_dict.placeholder(str)  # None: ~/.cache/diffusion_jax/pt_inception-...pth
  e.fid_reference_stats = config_dict.placeholder(str)  # None: computed from the test split and cached
  return config
