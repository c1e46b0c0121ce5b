"""Every config mistake we can see, checked once at start-up before any data is read or anything compiles.

One function per config section, in the order of the config. Each problem is a ValueError naming the key,
its value and what is allowed (`config.sample.num_steps=51 is invalid: must be ...`). Library functions keep
only the argument checks that protect their direct callers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from diffusion_jax import build, conditioning as C
from diffusion_jax import diffusion as D
from diffusion_jax.data import IMAGE_FOLDER, IN_MEMORY, dataset_image_shape, dataset_info, is_streamed
from diffusion_jax.data.datasets import folder_index
from diffusion_jax.loop import NAN_POLICIES
from diffusion_jax.models.layers import ATTENTION_IMPLS, CONV_IMPLS, CONV_PRECISIONS

MODES = ("train", "sample", "eval", "edit")
REC_LOSSES = ("l1", "l2")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ValueError(f"config.{key}={value!r} is invalid: {allowed}")


def _is_int(value: Any, low: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_config(config: ml_collections.ConfigDict) -> None:
  """All checks, section by section; raises the first problem found."""
  check_run(config)
  check_mesh(config)
  check_data(config.data)
  check_diffusion(config.diffusion)
  check_optim(config.optim, "optim", config.batch_size)
  if build.is_latent(config):
    check_autoencoder(config)
  check_image_condition(config)
  check_model(config)
  check_text(config)
  check_sample(config)
  check_eval(config)
  if config.mode == "edit":
    from diffusion_jax.editing.inputs import check_edit  # its own module: it knows the tasks' inputs
    check_edit(config)


def check_run(config: ml_collections.ConfigDict) -> None:
  require(config.mode in MODES, "mode", config.mode, f"choose one of {MODES}")
  require(_is_int(config.seed, 0), "seed", config.seed, "must be an int >= 0")
  require(_is_int(config.num_train_steps, 0), "num_train_steps", config.num_train_steps, "must be an int >= 0")
  for key in ("batch_size", "log_every_steps", "checkpoint_every_steps", "preview_every_steps", "keep_checkpoints"):
    require(_is_int(config[key], 1), key, config[key], "must be an int >= 1")
  _check_batch_size("batch_size", config.batch_size)


def check_mesh(config: ml_collections.ConfigDict) -> None:
  """config.mesh against the devices of every process (parallel.mesh.mesh_shape's one-line errors)."""
  from diffusion_jax.parallel.mesh import mesh_shape, parse_partition_rules
  mesh_shape(config.mesh.data, config.mesh.fsdp, jax.device_count())
  parse_partition_rules(config.mesh.partition_rules)


def _check_batch_size(key: str, value: int) -> None:
  n = jax.device_count()
  require(value % n == 0, key, value, f"must be divisible by the {n} devices (a global batch, split over every "
          "device)")


def check_data(data: ml_collections.ConfigDict) -> None:
  require(isinstance(data.dataset, str) and data.dataset != "", "data.dataset", data.dataset,
          f"give {IN_MEMORY}, {IMAGE_FOLDER!r} or a tensorflow-datasets name")
  require(data.data_dir is None or "://" in data.data_dir or os.path.isdir(data.data_dir), "data.data_dir",
          data.data_dir, "no such folder: give the folder holding the dataset, or unset it for the default location")
  require(_is_int(data.num_workers, 0), "data.num_workers", data.num_workers, "must be an int >= 0")
  if is_streamed(data):  # images are resized and converted to the configured size and channels
    require(_is_int(data.image_size, 4), "data.image_size", data.image_size, "must be an int >= 4")
    require(data.channels in (1, 3), "data.channels", data.channels, "must be 1 (grayscale) or 3 (RGB)")
    if data.dataset == IMAGE_FOLDER:
      require(data.data_dir is not None, "data.data_dir", data.data_dir,
              "dataset 'image_folder' reads your images from a folder: set --config.data.data_dir=PATH")
      folder_index(data)  # ImageFolderError (a ValueError) naming the folder or file
    else:
      from diffusion_jax.data.tfds_source import dataset_features
      dataset_features(data.dataset, data.data_dir)  # an unknown name is one line
    return
  shape = dataset_image_shape(data.dataset, data.data_dir)
  where = f" in {data.data_dir}" if data.data_dir else ""
  require(data.image_size == shape[0] == shape[1], "data.image_size", data.image_size,
          f"dataset {data.dataset!r}{where} has {shape[0]}x{shape[1]} images: set {shape[0]} (square images only)")
  require(data.channels == shape[2], "data.channels", data.channels,
          f"dataset {data.dataset!r}{where} has {shape[2]} channel(s): set {shape[2]}")


def check_diffusion(d: ml_collections.ConfigDict) -> None:
  require(d.loss in D.LOSS_TYPES, "diffusion.loss", d.loss, f"choose one of {D.LOSS_TYPES}")
  require(d.prediction in D.PREDICTIONS, "diffusion.prediction", d.prediction, f"choose one of {D.PREDICTIONS}")
  require(d.variance in D.VARIANCES, "diffusion.variance", d.variance, f"choose one of {D.VARIANCES}")
  require(d.loss != "hybrid" or d.variance == "learned_range", "diffusion.variance", d.variance,
          "loss='hybrid' learns the variance: set diffusion.variance='learned_range'")
  require(d.schedule in D.BETA_SCHEDULES, "diffusion.schedule", d.schedule, f"choose one of {D.BETA_SCHEDULES}")
  require(_is_int(d.num_timesteps, 2), "diffusion.num_timesteps", d.num_timesteps, "must be an int >= 2")
  try:
    D.get_beta_schedule(d.schedule, d.num_timesteps)  # e.g. a linear schedule whose betas exceed max_beta
  except ValueError as e:
    raise ValueError(f"config.diffusion.num_timesteps={d.num_timesteps!r} is invalid: {e}") from None
  require(d.timestep_sampler in D.losses.TIMESTEP_SAMPLERS, "diffusion.timestep_sampler", d.timestep_sampler,
          f"choose one of {D.losses.TIMESTEP_SAMPLERS}")
  require(_is_number(d.snr_gamma) and d.snr_gamma >= 0, "diffusion.snr_gamma", d.snr_gamma,
          "must be >= 0 (0 turns min-SNR weighting off)")
  require(_is_number(d.vlb_weight) and d.vlb_weight >= 0, "diffusion.vlb_weight", d.vlb_weight, "must be >= 0")
  require(_is_number(d.p_uncond) and 0 <= d.p_uncond <= 1, "diffusion.p_uncond", d.p_uncond,
          "must be a probability in [0, 1]")
  _check_fields(build.DiffusionSettings, d, "diffusion")


def check_optim(o: ml_collections.ConfigDict, section: str, batch_size: int) -> None:
  _check_fields(build.OptimSettings, o, section)
  require(_is_int(o.grad_accum_steps, 1), f"{section}.grad_accum_steps", o.grad_accum_steps, "must be an int >= 1")
  n = jax.device_count()
  require(batch_size % (n * o.grad_accum_steps) == 0, f"{section}.grad_accum_steps", o.grad_accum_steps,
          f"the batch of {batch_size} must split into {o.grad_accum_steps} micro-batches of whole rows on each of "
          f"the {n} devices (batch divisible by devices x grad_accum_steps = {n * o.grad_accum_steps})")
  require(_is_number(o.learning_rate) and o.learning_rate > 0, f"{section}.learning_rate", o.learning_rate,
          "must be a number > 0")
  require(_is_int(o.warmup_steps, 0), f"{section}.warmup_steps", o.warmup_steps, "must be an int >= 0")
  require(_is_number(o.grad_clip) and o.grad_clip >= 0, f"{section}.grad_clip", o.grad_clip,
          "must be >= 0 (0 turns clipping off)")
  require(_is_number(o.weight_decay) and o.weight_decay >= 0, f"{section}.weight_decay", o.weight_decay,
          "must be >= 0")
  for key in ("b1", "b2", "ema_decay"):
    require(_is_number(o[key]) and 0 <= o[key] < 1, f"{section}.{key}", o[key], "must be in [0, 1)")
  require(_is_number(o.eps) and o.eps > 0, f"{section}.eps", o.eps, "must be > 0")
  require(o.nan_policy in NAN_POLICIES, f"{section}.nan_policy", o.nan_policy, f"choose one of {NAN_POLICIES}")


def _check_fields(cls, section: ml_collections.ConfigDict, name: str) -> None:
  """A section that maps onto a dataclass has exactly its fields (a misspelt key names itself)."""
  allowed = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(section.keys()) - allowed)
  require(not unknown, f"{name}.{unknown[0] if unknown else ''}", None, f"unknown key; {name} has {sorted(allowed)}")


def check_autoencoder(config: ml_collections.ConfigDict) -> None:
  a = config.autoencoder
  require(_is_int(a.num_train_steps, 0), "autoencoder.num_train_steps", a.num_train_steps, "must be an int >= 0")
  require(_is_int(a.batch_size, 1), "autoencoder.batch_size", a.batch_size, "must be an int >= 1")
  _check_batch_size("autoencoder.batch_size", a.batch_size)
  require(a.rec_loss in REC_LOSSES, "autoencoder.rec_loss", a.rec_loss, f"choose one of {REC_LOSSES}")
  require(_is_number(a.kl_weight) and a.kl_weight >= 0, "autoencoder.kl_weight", a.kl_weight, "must be >= 0")
  check_optim(a.optim, "autoencoder.optim", a.batch_size)
  m = a.model
  require(m.conv_impl in CONV_IMPLS, "autoencoder.model.conv_impl", m.conv_impl, f"choose one of {CONV_IMPLS}")
  for key in ("conv_precision", "matmul_precision"):
    require(m.get(key, "float32") in CONV_PRECISIONS, f"autoencoder.model.{key}", m.get(key),
            f"choose one of {CONV_PRECISIONS}")
  for key in ("ch", "num_res_blocks", "z_channels"):
    require(_is_int(m[key], 1), f"autoencoder.model.{key}", m[key], "must be an int >= 1")
  _check_levels("autoencoder.model.ch_mult", m.ch_mult)
  try:
    autoencoder = build.build_autoencoder(config)
  except TypeError as e:  # an unknown key in autoencoder.model
    raise ValueError(f"config.autoencoder.model is invalid: {e}") from None
  try:
    autoencoder.latent_shape(build.image_shape(config))
  except ValueError as e:
    raise ValueError(f"config.autoencoder.model.ch_mult={tuple(m.ch_mult)!r} is invalid: {e}") from None
  require(not config.sample.clip_denoised, "sample.clip_denoised", True,
          "latents are not in [-1, 1]: set sample.clip_denoised=False for latent diffusion")
  require(config.eval.bpd_num_images == 0, "eval.bpd_num_images", config.eval.bpd_num_images,
          "bits/dim is a pixel-space bound: set it to 0 for latent diffusion")


def check_image_condition(config: ml_collections.ConfigDict) -> None:
  """An image concatenated to a pixel model's input: the kind, the low-resolution size, concat_channels."""
  section = config.get("image_condition")
  if section is None:
    return
  from diffusion_jax.image_condition import KINDS
  require(section.get("kind") in KINDS, "image_condition.kind", section.get("kind"), f"choose one of {KINDS}")
  require(not build.is_latent(config), "image_condition.kind", section.kind,
          "image conditions are built for pixel models only (set autoencoder=None)")
  size = config.data.image_size
  if section.kind == "low_res":
    low = section.get("low_res_size")
    require(_is_int(low, 1) and low < size, "image_condition.low_res_size", low,
            f"must be an int in [1, data.image_size={size})")
  require(config.eval.bpd_num_images == 0, "eval.bpd_num_images", config.eval.bpd_num_images,
          "bits/dim of an image-conditioned model is not computed: set it to 0")
  spec = build.image_condition_spec(config)
  want = spec.channels(config.data.channels)
  require(config.model.concat_channels in (0, want), "model.concat_channels", config.model.concat_channels,
          f"image_condition.kind={spec.kind!r} feeds {want} channels: set 0 (derived) or {want}")


def _check_levels(key: str, ch_mult: Any) -> None:
  require(isinstance(ch_mult, (tuple, list)) and len(ch_mult) >= 1 and all(_is_int(c, 1) for c in ch_mult), key,
          ch_mult, "must be a tuple of ints >= 1, one per resolution level, e.g. (1, 2, 2)")


def check_model(config: ml_collections.ConfigDict) -> None:
  m = config.model
  require(m.dtype in build.DTYPES, "model.dtype", m.dtype, f"choose one of {tuple(build.DTYPES)}")
  require(m.conv_impl in CONV_IMPLS, "model.conv_impl", m.conv_impl, f"choose one of {CONV_IMPLS}")
  for key in ("conv_precision", "matmul_precision"):
    require(m.get(key, "float32") in CONV_PRECISIONS, f"model.{key}", m.get(key), f"choose one of {CONV_PRECISIONS}")
  require(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl", m.attention_impl,
          f"choose one of {ATTENTION_IMPLS}")
  if m.attention_impl == "cudnn":  # cuDNN's fused attention: NVIDIA GPUs, half-precision inputs only
    require(jax.default_backend() == "gpu", "model.attention_impl", m.attention_impl,
            f"cuDNN attention runs on NVIDIA GPUs and this run's backend is {jax.default_backend()}: use 'xla'")
    require(m.dtype == "bfloat16", "model.attention_impl", m.attention_impl,
            f"cuDNN attention computes in bfloat16: set --config.model.dtype=bfloat16 (model.dtype={m.dtype!r})")
  for key, low in (("ch", 1), ("num_res_blocks", 1), ("num_heads", 1), ("num_classes", 0), ("context_dim", 0),
                   ("concat_channels", 0)):
    require(_is_int(m[key], low), f"model.{key}", m[key], f"must be an int >= {low}")
  require(isinstance(m.remat, bool), "model.remat", m.remat, "must be True or False")
  require(m.head_channels == -1 or _is_int(m.head_channels, 1), "model.head_channels", m.head_channels,
          "must be -1 (num_heads decides) or an int >= 1")
  require(_is_number(m.dropout) and 0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
  _check_levels("model.ch_mult", m.ch_mult)
  if m.num_classes and config.data.dataset == IMAGE_FOLDER:
    classes = dataset_info(config.data).num_classes
    require(m.num_classes == classes, "model.num_classes", m.num_classes,
            f"the image folder {config.data.data_dir} has {classes} class sub-folder(s): set {classes}"
            + (" (or 0, unconditional)" if classes else " (0: it has no class sub-folders)"))
  require(isinstance(m.attn_resolutions, (tuple, list)) and all(_is_int(r, 1) for r in m.attn_resolutions),
          "model.attn_resolutions", m.attn_resolutions, "must be a tuple of ints (resolutions), e.g. (16,)")
  try:
    model = build.build_unet(config)
  except TypeError as e:  # an unknown key in config.model
    raise ValueError(f"config.model is invalid: {e}") from None
  size = build.input_shape(config)[0]
  what = f"the autoencoder's latent size {size}" if build.is_latent(config) else f"config.data.image_size={size}"
  try:
    model.check_input(size, size)
  except ValueError as e:
    raise ValueError(f"{what} and config.model do not fit: {e}") from None
  try:  # trace the model once, without computing: e.g. head_channels that do not divide a level's channels
    from diffusion_jax.train import example_condition
    shape = build.input_shape(config)
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)), jnp.zeros((1,), jnp.int32),
                                      **example_condition(model, shape)))
  except ValueError as e:
    raise ValueError(f"config.model does not fit {what}: {str(e).splitlines()[0]}") from None


def check_text(config: ml_collections.ConfigDict) -> None:
  """Text models: a known encoder, cross-attention of its width, captions for the dataset."""
  m, t = config.model, config.text
  if not t.encoder:
    require(m.context_dim == 0, "model.context_dim", m.context_dim,
            "cross-attention needs a context: set text.encoder (e.g. 'minilm') or model.context_dim=0")
    return
  from diffusion_jax.models.text_encoders import TEXT_ENCODERS
  require(t.encoder in TEXT_ENCODERS, "text.encoder", t.encoder, f"choose one of {tuple(TEXT_ENCODERS)} or None")
  # The encoder's exact width is checked when it loads (build.load_text_encoder), first thing in a run.
  require(m.context_dim > 0, "model.context_dim", m.context_dim,
          f"a text-conditional model needs cross-attention: set it to the {t.encoder} encoder's width")
  require(m.num_classes == 0, "model.num_classes", m.num_classes, "text models are conditioned on captions: set it to 0")
  require(_is_int(t.max_length, 2), "text.max_length", t.max_length, "must be an int >= 2")
  require(dataset_info(config.data).captions != "", "data.dataset", config.data.dataset,
          "text conditioning needs captions: class templates (fashion_mnist, mnist, cifar10), a metadata.jsonl with "
          "\"file_name\" and \"text\" in an image folder, or a tfds dataset with a caption feature")


def check_sample(config: ml_collections.ConfigDict) -> None:
  """The final samples' settings and the previews' (checked here, not first at a preview after training)."""
  s, T = config.sample, config.diffusion.num_timesteps
  for sampler_key, steps_key in (("sampler", "num_steps"), ("preview_sampler", "preview_steps")):
    require(s[sampler_key] in D.SAMPLERS, f"sample.{sampler_key}", s[sampler_key], f"choose one of {D.SAMPLERS}")
    steps = s[steps_key]
    require(steps is None or (_is_int(steps, 1) and steps <= T), f"sample.{steps_key}", steps,
            f"must be unset (all T) or an int in [1, diffusion.num_timesteps={T}]")
  for key in ("num_images", "batch_size", "preview_images"):
    require(_is_int(s[key], 1), f"sample.{key}", s[key], "must be an int >= 1")
  require(s.spacing is None or s.spacing in D.SPACINGS, "sample.spacing", s.spacing,
          f"must be unset (the sampler's default) or one of {D.SPACINGS}")
  require(_is_number(s.eta) and s.eta >= 0, "sample.eta", s.eta, "must be a number >= 0")
  require(s.checkpoint_step is None or _is_int(s.checkpoint_step, 0), "sample.checkpoint_step", s.checkpoint_step,
          "must be unset (the latest) or an int >= 0")
  try:
    D.check_guidance_scale(s.guidance_scale)
  except ValueError as e:
    raise ValueError(f"config.sample.guidance_scale={s.guidance_scale!r} is invalid: {e}") from None
  # Prompts and labels: count, format and range, with the same function sampling uses.
  C.sample_prompts_and_labels(build.condition_spec(config), s.num_images, prompt=s.prompt,
                              class_labels=s.class_labels)


# What a checkpoint's meaning depends on: resuming a workdir with other values is an error (other keys, such as
# num_train_steps, the learning rate, sampling and logging, may change between runs).
IDENTITY_KEYS = ("data.image_size", "data.channels", "diffusion.schedule", "diffusion.num_timesteps",
                 "diffusion.prediction", "diffusion.loss", "diffusion.variance", "model", "autoencoder.model",
                 "text.encoder", "image_condition")
# ... except how it is computed: the compute dtype, the convolution and attention lowerings and dropout may
# change (e.g. sample a float32-trained model in bfloat16, or fine-tune with dropout).
COMPUTE_KEYS = ("model.dtype", "model.conv_impl", "model.conv_precision", "model.matmul_precision",
                "model.attention_impl", "model.dropout", "model.remat", "autoencoder.model.conv_impl",
                "autoencoder.model.conv_precision", "autoencoder.model.matmul_precision")


# Packages a remote workdir needs beyond epath's: Orbax (0.12.8) lists a gs:// folder's checkpoint steps through
# google-cloud-storage (gcs_utils.is_hierarchical_namespace_enabled), and fails with an ImportError without it.
REMOTE_WORKDIR_PACKAGES = {"gs": ("google.cloud.storage", "google-cloud-storage", "diffusion_jax[gcs]")}


def missing_remote_package(workdir: str) -> str | None:
  """What a remote workdir's scheme still needs here ("<package> ...: pip install ..."), None when nothing is
  missing."""
  import importlib.util
  module, package, extra = REMOTE_WORKDIR_PACKAGES.get(workdir.split("://")[0], (None, None, None))
  if module is None:
    return None
  try:
    if importlib.util.find_spec(module) is not None:
      return None
  except ModuleNotFoundError:  # a parent package (google.cloud) is missing
    pass
  return (f"{package} for its checkpoints (Orbax lists them through it): pip install {package} "
          f"(or pip install '{extra}')")


def check_workdir(workdir: str) -> None:
  """A workdir is a folder (new, or an earlier run's) that can be written; remote ones must be reachable, with the
  packages their checkpoints need."""
  if "://" in workdir:
    try:
      epath.Path(workdir).exists()
    except Exception as e:  # no credentials, no network, an unknown scheme
      raise ValueError(f"--workdir={workdir!r} cannot be reached: {type(e).__name__}: "
                       f"{(str(e).strip().splitlines() or [''])[0][:200]}") from None
    missing = missing_remote_package(workdir)
    if missing:
      raise ValueError(f"--workdir={workdir!r} needs {missing}")
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--workdir={workdir!r} is a file: expected a folder (a new one, or an earlier run's)")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"--workdir={workdir!r} cannot be created: {existing} is a file")
  try:  # create it and write a scratch file: permission bits say nothing for root or a read-only filesystem
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise ValueError(f"--workdir={workdir!r} is not writable: {e.strerror or e} ({e.filename or existing})") from None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
  return {prefix.rstrip("."): tree}


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir with checkpoints was trained with the config in its config.json: another model, autoencoder or
  diffusion process (IDENTITY_KEYS) is one error listing the keys that differ, raised before anything is
  written."""
  root = epath.Path(workdir)
  record = root / "config.json"
  trained = any(p.name.isdigit() for d in (root / "checkpoints", root / "autoencoder" / "checkpoints")
                if d.is_dir() for p in d.iterdir())
  if not trained or not record.exists():
    return
  try:
    before = _flatten(json.loads(record.read_text()))
  except ValueError:
    return  # an unreadable record cannot be compared; the checkpoint's shapes are still checked at restore
  now = _flatten(json.loads(config.to_json_best_effort()))
  differ = [key for key in sorted(set(before) | set(now)) if any(key == k or key.startswith(k + ".")
                                                                 for k in IDENTITY_KEYS)
            and key not in COMPUTE_KEYS and before.get(key) != now.get(key)]
  if differ:
    changes = "; ".join(f"{k}={before.get(k)!r} there, {now.get(k)!r} now" for k in differ)
    raise ValueError(f"--workdir={str(workdir)!r} holds a run trained with another model or diffusion process "
                     f"({changes}): use a new --workdir to start fresh, or drop these overrides to resume")


def check_eval(config: ml_collections.ConfigDict) -> None:
  e = config.eval
  require(_is_int(e.bpd_num_images, 0), "eval.bpd_num_images", e.bpd_num_images, "must be an int >= 0 (0 skips it)")
  require(_is_int(e.bpd_batch_size, 1), "eval.bpd_batch_size", e.bpd_batch_size, "must be an int >= 1")
