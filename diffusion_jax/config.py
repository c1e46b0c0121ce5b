"""The base config every experiment in configs/ starts from, and loading a config file with overrides.

Each section maps onto one typed object, built in `build.py`: `model` holds the U-Net's constructor arguments
(`UNet(**config.model)`), `autoencoder.model` the autoencoder's, `optim` / `autoencoder.optim` an `OptimSettings`,
`diffusion` a `DiffusionSettings` and `sample` a `sampling.SampleSettings`. `config_check.check_config` validates
every section once, at start-up.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import traceback
from typing import Sequence

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # the root of every key and data order (keys.RunKeys)
  config.mode = "train"  # train (then sample and evaluate) | sample | eval | edit (config.edit's task)
  config.num_train_steps = 10_000
  config.batch_size = 64  # global, split over every device of every process
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.preview_every_steps = 2000  # preview sample grids under DIR/samples/ and in TensorBoard
  config.keep_checkpoints = 3

  # The device mesh (parallel/mesh.py): data-parallel replicas x FSDP shards of the parameters, EMA and optimizer
  # state; -1 takes the remaining devices. fsdp > 1 trains models larger than one device's memory.
  # partition_rules: ((regex, spec), ...) placing state arrays by path, first match wins, e.g.
  # (("attn.*/kernel$", "None,None,fsdp"), ("GroupNorm", "")); unmatched arrays: the automatic FSDP rule.
  # shard_optimizer_state: the EMA and Adam's moments split over every device (ZeRO stage 1; a rule's spec "zero"
  # does the same for any path), parameters placed as above: less memory per device for one all-gather per step.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, partition_rules=(), shard_optimizer_state=False))
  config.data = _data()
  config.diffusion = _diffusion()
  config.model = _model()
  # None: diffusion on pixels. Latent configs set a section with `model` (AutoencoderKL's arguments), `optim`
  # and stage 1's schedule (configs/latent.py).
  config.autoencoder = None
  # None: no image condition. A section {kind: 'low_res' (super-resolution, SR3) | 'masked' (an inpainting model),
  # low_res_size} feeds the U-Net that image as extra input channels (image_condition.py, configs/
  # super_resolution.py, configs/inpainting.py).
  config.image_condition = None
  config.text = _text()
  config.optim = optim_config(learning_rate=2e-4, warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999)
  config.sample = _sample()
  config.eval = _eval()
  config.edit = _edit()
  return config


def _data() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  # fashion_mnist (Debian's files, offline) | mnist | image_folder (data_dir: your PNG/JPEG files, class
  # sub-folders, metadata.jsonl captions) | any tensorflow-datasets image dataset (cifar10, celeb_a, ...: streamed)
  data.dataset = "fashion_mnist"
  data.data_dir = config_dict.placeholder(str)  # None: Debian's files, else tfds' default
  data.image_size = 28  # streamed images are resized (shorter side) and centre-cropped to this
  data.channels = 1  # 1 (grayscale) or 3 (RGB); streamed images are converted
  data.random_flip = False
  data.num_workers = 0  # streamed datasets: grain processes decoding images (0: in the training process)
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
  m.conv_impl = "auto"  # auto (winograd_wgrad on CPU for 3x3 convs of >= 128 channels, else xla) | xla | im2col (slower) | winograd (F(2x2,3x3) forward wherever it applies, XLA's gradients: least memory) | winograd_wgrad (its filter gradient too: faster); README lever table
  m.conv_precision = "float32"  # float32 | bfloat16: the convs' operands rounded to bfloat16, their products summed in float32, the result in model.dtype (torch.autocast's convs; 1x1 convs as bfloat16 dots; Winograd's and im2col's keep model.dtype): native AMX kernels for the 3x3 ones on CPUs with AMX (Intel Sapphire Rapids+), XLA's bfloat16 convs elsewhere (slower than float32 on CPUs without AMX); README lever table
  m.matmul_precision = "float32"  # float32 | bfloat16: the Dense layers' operands (timestep embedding, attention projections, feed-forward) rounded to bfloat16, their products summed in float32 (torch.autocast's linear layers; attention's QK^T / softmax / PV stay in model.dtype); with conv_precision=bfloat16 this is torch.autocast's policy
  m.attention_impl = "xla"  # xla | cudnn (cuDNN flash attention: NVIDIA GPUs, with model.dtype=bfloat16)
  m.remat = False  # recompute each block's activations in the backward pass: less memory, ~1/3 more compute
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


def _edit() -> ml_collections.ConfigDict:
  """mode=edit: one task on given images with the trained model (editing/); the condition (sample.prompt,
  class_labels, guidance_scale) and the sampler (sample.sampler, num_steps) come from config.sample."""
  e = ml_collections.ConfigDict()
  e.task = config_dict.placeholder(str)  # inpaint | outpaint | img2img | upscale
  # test:3,7,12 / test:0-31 (the dataset's test split), or comma-separated PNG/JPEG paths, or a .npz of
  # images (e.g. DIR/samples/samples.npz, for a cascade: a base model's samples into a super-resolution model)
  e.images = "test:0-7"
  e.box = ""  # inpaint: the hole y0,x0,y1,x1 in pixels (end exclusive); '' = the centre quarter
  e.mask = ""  # inpaint: a PNG mask (white = regenerate) of the model's image size, instead of box
  e.extend = 8  # outpaint: pixels added ...
  e.side = "all"  # ... on this side: left | right | top | bottom | all
  e.strength = 0.6  # img2img: the fraction of the noise schedule the input is pushed into, in (0, 1]
  e.invert = False  # img2img: DDIM inversion of the input instead of random noise (deterministic)
  e.resample_steps = 1  # inpaint/outpaint: RePaint's resamplings per jump (1 = plain replacement)
  e.jump = 10  # inpaint/outpaint: RePaint's jump length in sampling steps
  e.downscale = 0  # upscale: 0 = the inputs are low-resolution; k = downsample the given images k times first
  return e


def parse_variant(variant: str, config_file: str, *groups: tuple[str, ...]) -> tuple[str, ...]:
  """A config file's comma-separated variant ('latent,text') -> one choice per group of alternatives, the
  group's first where none is given; ValueError naming the unknown parts and every choice."""
  parts = [p for p in variant.split(",") if p]
  unknown = [p for p in parts if not any(p in g for g in groups)]
  if unknown:
    raise ValueError(f"unknown variant {unknown} of {config_file}; choose from " + " and ".join(map(str, groups)))
  return tuple(next((p for p in parts if p in g), g[0]) for g in groups)


def optim_config(*, learning_rate: float, warmup_steps: int, grad_clip: float = 0.0, weight_decay: float = 0.0,
                 ema_decay: float = 0.0) -> ml_collections.ConfigDict:
  """An optimizer section (build.OptimSettings): AdamW, linear warmup, global-norm clipping (0 = off), EMA
  of the params (0 = none); nan_policy: a NaN/inf loss or gradient 'stop's the run (the last good checkpoint
  kept) or 'skip's the step; grad_accum_steps: the batch's gradient computed over that many micro-batches one
  after another (one optimizer update per batch: a global batch larger than memory)."""
  return ml_collections.ConfigDict(dict(learning_rate=learning_rate, warmup_steps=warmup_steps, grad_clip=grad_clip,
                                        b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, ema_decay=ema_decay,
                                        nan_policy="stop", grad_accum_steps=1))


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`configs/latent.py:full` (a path, or a name under configs/) with `a.b=value` overrides, parsed exactly as
  main's `--config.a.b=value` flags are (ml_collections' config_flags), so scripts and the CLI agree. A file or
  override that cannot be used raises ConfigError with one line (as main prints it)."""
  from absl import flags
  from ml_collections import config_flags
  path, sep, variant = spec.partition(":")
  if not path.endswith(".py"):
    path = os.path.join(CONFIGS_DIR, path + ".py")
  argv = ["load_config", f"--config={path}{sep}{variant}", *(f"--config.{o}" for o in overrides)]
  flag_values = flags.FlagValues()
  # config_flags finds the override flags in the argv it is given at definition time.
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  parse_config_flags(flag_values, argv)
  return flag_values.config


# ---------------------------------------------------------------- one line for a config that cannot load

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(ValueError):
  """A config file or `--config.*` override that cannot be used; the message is one line naming it."""


def parse_config_flags(flag_values, argv: Sequence[str]) -> list[str]:
  """`flag_values(argv)`, with any failure to load the config file or apply an override raised as ConfigError:
  one line naming the file and line, the unknown key and the closest valid key path, or the bad value. Of a
  `--config.key=value` given more than once the last wins (see last_override_wins)."""
  try:
    args = flag_values(last_override_wins(argv))
    # config_flags defers some load errors (a missing file) to the config's first use: surface them now.
    if "config" in flag_values and not isinstance(flag_values.config, ml_collections.ConfigDict):
      raise OSError(f"config file not loaded: {flag_values['config'].serialize()}")
    return args
  except Exception as e:  # config_flags raises KeyError, AttributeError, OSError, SyntaxError, flags.Error
    raise ConfigError(explain_config_error(e, argv)) from None


def last_override_wins(argv: Sequence[str]) -> list[str]:
  """argv without the earlier occurrences of a `--config.key=value` (or `--config.key value`) whose key is given
  again: the last wins, as absl does for any other flag (an earlier value is then never parsed). Why:
  config_flags, given a tuple-valued key twice, merged the two (`--config.model.ch_mult=(1,2,2)` then `=(1,)` gave
  (1,2,2,1)), which a launch script adding its own override to a shared list would meet. Overrides inside a
  --flagfile are left as they are."""
  spans = []  # (key, first index, one past the last) of each override in argv
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config.") and "=" in arg:
      spans.append((arg.partition("=")[0], i, i + 1))
    elif arg.startswith("--config.") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
      spans.append((arg, i, i + 2))  # the two-token form
      i += 1
    i += 1
  last = {key: start for key, start, _ in spans}
  dropped = {j for key, start, end in spans if last[key] != start for j in range(start, end)}
  return [arg for j, arg in enumerate(argv) if j not in dropped]


def explain_config_error(error: BaseException, argv: Sequence[str]) -> str:
  spec = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("--config=")), None)
  if spec is None:
    return _first_line(error)
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    shipped = ", ".join(sorted(f"configs/{f}" for f in os.listdir(CONFIGS_DIR) if f.endswith(".py")))
    return f"config file {path!r} does not exist (--config={spec}); the shipped configs are {shipped}"
  try:
    config = load_config_file(path, variant)
  except SyntaxError as e:
    return f"config file {path} line {e.lineno}: {e.msg}: {(e.text or '').strip()!r}"
  except Exception as e:  # raised by get_config, e.g. an unknown variant
    # Frames of <frozen importlib...> are not files: compare absolute paths, never stat them.
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
             if os.path.abspath(f.filename) == os.path.abspath(path)]
    where = f" line {lines[-1]}" if lines else ""
    return f"config file {path}{where} (--config={spec}): {type(e).__name__}: {_first_line(e)}"
  for key, value in _overrides(argv):
    problem = _unknown_key_problem(config, key)
    if problem:
      return f"--config.{key}={value}: {problem}"
  return _first_line(error).replace("flag --config.", "--config.", 1)


def _first_line(error: BaseException) -> str:
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def load_config_file(path: str, variant: str = "") -> ml_collections.ConfigDict:
  """What config_flags does with `--config=path[:variant]`: import the file and call get_config (no
  overrides). A config file builds on another with load_config_file(os.path.join(os.path.dirname(__file__),
  'fashion_mnist.py'), variant)."""
  spec = importlib.util.spec_from_file_location("_config_under_check", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def _overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
  """(key, value) of each `--config.key=value` / `--config.key value` / `--[no]config.flag` in argv."""
  out = []
  for i, arg in enumerate(argv):
    for prefix in ("--config.", "--noconfig."):
      if arg.startswith(prefix):
        key, eq, value = arg[len(prefix):].partition("=")
        if not eq:
          value = argv[i + 1] if i + 1 < len(argv) and prefix == "--config." else str(prefix == "--config.")
        out.append((key, value))
  return out


def leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every key path of a config, 'model.ch' style (sections themselves excluded)."""
  paths = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      paths += leaf_paths(value, f"{prefix}{key}.")
    else:
      paths.append(prefix + key)
  return paths


def _unknown_key_problem(config: ml_collections.ConfigDict, key: str) -> str | None:
  """None when `key` is a path of `config`, else what is wrong and the closest valid key path."""
  node, walked = config, []
  for part in key.split("."):
    if node is None:
      return (f"config.{'.'.join(walked)} is None in this config, so it has no key {part!r} "
              f"(set by a config that uses it, e.g. autoencoder in configs/latent.py)")
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      close = difflib.get_close_matches(key, leaf_paths(config), n=1, cutoff=0.6)
      hint = f"did you mean {close[0]!r}?" if close else (
          f"config.{'.'.join(walked)} has {sorted(node.keys())}" if isinstance(node, ml_collections.ConfigDict)
          else f"config.{'.'.join(walked)} is a value, not a section")
      return f"unknown config key {key!r}; {hint}"
    node = node[part]
    walked.append(part)
  return None
