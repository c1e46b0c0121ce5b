"""Train a diffusion model: create_train_state, train_step, train_and_evaluate (flax examples style)."""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging

from diffusion_jax import checkpoint, conditioning as C, images as image_io, latent, loop
from diffusion_jax import diffusion as D
from diffusion_jax.data import DATASETS, InMemoryBatches, load_split
from diffusion_jax.models import UNet
from diffusion_jax.models.layers import CONV_IMPLS
from diffusion_jax.parallel.mesh import batch_sharding, global_to_host, host_to_global, make_mesh, replicated

MODES = ("train", "sample", "eval")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  loss_history: D.LossHistory


# ---------------------------------------------------------------- config -> objects

def build_model(config: ml_collections.ConfigDict) -> UNet:
  m = config.model
  channels = config.autoencoder.z_channels if is_latent(config) else config.data.channels
  return UNet(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
              attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout, num_heads=m.num_heads,
              head_channels=m.head_channels, resblock_updown=m.resblock_updown,
              scale_shift_norm=m.scale_shift_norm, conv_impl=m.conv_impl, dtype=DTYPES[m.dtype],
              num_classes=m.num_classes, context_dim=m.context_dim, pooled_context=m.pooled_context,
              concat_channels=m.concat_channels,
              out_channels=2 * channels if config.diffusion.variance == "learned_range" else channels)


def build_schedule(config: ml_collections.ConfigDict) -> D.Schedule:
  return D.make_schedule(D.get_beta_schedule(config.diffusion.schedule, config.diffusion.num_timesteps))


def build_optimizer(config: ml_collections.ConfigDict):
  """AdamW with linear warmup (DDPM: 5000 steps) and global-norm clipping (DDPM: 1.0)."""
  o = config.optim
  lr = optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1)),
                             optax.constant_schedule(o.learning_rate)], [max(o.warmup_steps, 1)])
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
                   optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
  return tx, lr


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ValueError(f"config.{key}={value!r} is invalid: {allowed}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Every config mistake we can see, as a ValueError naming key, value and what is allowed, before any compile."""
  _require(config.mode in MODES, "mode", config.mode, f"choose one of {MODES}")
  _require(config.data.dataset in DATASETS, "data.dataset", config.data.dataset, f"choose one of {DATASETS}")
  for key in ("num_train_steps",):
    _require(isinstance(config[key], int) and config[key] >= 0, key, config[key], "must be an int >= 0")
  for key in ("batch_size", "log_every_steps", "checkpoint_every_steps", "sample_every_steps"):
    _require(isinstance(config[key], int) and config[key] >= 1, key, config[key], "must be an int >= 1")
  n = jax.device_count()
  _require(config.batch_size % n == 0, "batch_size", config.batch_size,
           f"must be divisible by the {n} devices (global batch, split over every device)")
  d = config.diffusion
  _require(d.loss in D.LOSS_TYPES, "diffusion.loss", d.loss, f"choose one of {D.LOSS_TYPES}")
  _require(d.prediction in D.PREDICTIONS, "diffusion.prediction", d.prediction, f"choose one of {D.PREDICTIONS}")
  _require(d.variance in D.VARIANCES, "diffusion.variance", d.variance, f"choose one of {D.VARIANCES}")
  _require(d.loss != "hybrid" or d.variance == "learned_range", "diffusion.variance", d.variance,
           "loss='hybrid' learns the variance: set diffusion.variance='learned_range'")
  _require(d.schedule in D.BETA_SCHEDULES, "diffusion.schedule", d.schedule, f"choose one of {D.BETA_SCHEDULES}")
  _require(d.timestep_sampler in D.losses.TIMESTEP_SAMPLERS, "diffusion.timestep_sampler", d.timestep_sampler,
           f"choose one of {D.losses.TIMESTEP_SAMPLERS}")
  _require(d.snr_gamma >= 0, "diffusion.snr_gamma", d.snr_gamma, "must be >= 0 (0 turns min-SNR weighting off)")
  D.get_beta_schedule(d.schedule, d.num_timesteps)  # raises on T < 2 or a bad linear T
  m = config.model
  _require(m.dtype in DTYPES, "model.dtype", m.dtype, f"choose one of {tuple(DTYPES)}")
  _require(m.conv_impl in CONV_IMPLS, "model.conv_impl", m.conv_impl, f"choose one of {CONV_IMPLS}")
  size = config.data.image_size
  what = f"config.data.image_size={size}"
  if is_latent(config):
    a = config.autoencoder
    _require(isinstance(a.num_train_steps, int) and a.num_train_steps >= 0, "autoencoder.num_train_steps",
             a.num_train_steps, "must be an int >= 0")
    _require(a.batch_size % n == 0, "autoencoder.batch_size", a.batch_size, f"must be divisible by the {n} devices")
    _require(a.rec_loss in ("l1", "l2"), "autoencoder.rec_loss", a.rec_loss, "choose one of ('l1', 'l2')")
    _require(not config.sample.clip_denoised, "sample.clip_denoised", True,
             "latents are not in [-1, 1]: set sample.clip_denoised=False for latent diffusion")
    _require(config.eval.bpd_num_images == 0, "eval.bpd_num_images", config.eval.bpd_num_images,
             "bits/dim is a pixel-space bound: set it to 0 for latent diffusion")
    size = latent.build_autoencoder(config).latent_shape((size, size))[0]  # raises when f does not divide
    what = f"the autoencoder's latent size {size}"
  try:
    build_model(config).check_input(size, size)
  except ValueError as e:
    raise ValueError(f"{what} and config.model do not fit: {e}") from None
  s = config.sample
  _require(s.sampler in D.SAMPLERS, "sample.sampler", s.sampler, f"choose one of {D.SAMPLERS}")
  _require(s.num_steps is None or 1 <= s.num_steps <= d.num_timesteps, "sample.num_steps", s.num_steps,
           f"must be unset (all T) or an int in [1, {d.num_timesteps}]")
  _require(isinstance(s.num_images, int) and s.num_images >= 1, "sample.num_images", s.num_images, "must be >= 1")
  k = m.num_classes
  _require(isinstance(k, int) and k >= 0, "model.num_classes", k, "must be an int >= 0 (0: unconditional)")
  _require(0 <= d.p_uncond <= 1, "diffusion.p_uncond", d.p_uncond, "must be a probability in [0, 1]")
  _require(isinstance(m.context_dim, int) and m.context_dim >= 0, "model.context_dim", m.context_dim,
           "must be an int >= 0 (0: no cross-attention)")
  kind = C.condition_kind(config)
  if kind == "text":
    from diffusion_jax.models.text_encoder import TEXT_ENCODERS
    t = config.text
    _require(t.encoder in TEXT_ENCODERS, "text.encoder", t.encoder, f"choose one of {tuple(TEXT_ENCODERS)} or None")
    _require(m.context_dim > 0, "model.context_dim", m.context_dim,
             f"a text-conditional model needs cross-attention: set it to the {t.encoder} encoder's width")
    _require(k == 0, "model.num_classes", k, "text models are conditioned on captions: set it to 0")
    _require(isinstance(t.max_length, int) and t.max_length >= 2, "text.max_length", t.max_length, "must be >= 2")
    C.dataset_captions(config.data.dataset)  # ValueError naming data.dataset when it has no captions
    C.check_prompts(C.parse_prompts(s.prompt), s.num_images)
  else:
    _require(m.context_dim == 0, "model.context_dim", m.context_dim,
             "cross-attention needs a context: set text.encoder (e.g. 'minilm') or model.context_dim=0")
    _require(not C.parse_prompts(s.get("prompt")), "sample.prompt", s.get("prompt"),
             "prompts need a text-conditional model (set text.encoder)")
  num_labels = {"none": 0, "class": k, "text": len(C.CAPTIONS.get(config.data.dataset, ()))}[kind]
  _require(s.class_label == -1 or 0 <= s.class_label < num_labels, "sample.class_label", s.class_label,
           f"must be -1 (every class in turn) or a class in [0, {num_labels}) of a conditional model")
  _require(kind != "none" or not s.class_labels, "sample.class_labels", s.class_labels,
           "labels need a conditional model")
  if kind != "none":
    C.requested_labels(config, s.num_images, num_labels)  # ValueError naming a bad sample.class_labels
  try:
    D.check_guidance_scale(s.guidance_scale)
  except ValueError as e:
    raise ValueError(f"config.sample.guidance_scale: {e}") from None
  e = config.eval
  _require(isinstance(e.bpd_num_images, int) and e.bpd_num_images >= 0, "eval.bpd_num_images", e.bpd_num_images,
           "must be an int >= 0 (0 skips bits/dim)")
  _require(s.spacing is None or s.spacing in D.SPACINGS, "sample.spacing", s.spacing,
           f"must be unset (the sampler's default) or one of {D.SPACINGS}")
  _require(isinstance(s.eta, (int, float)) and not isinstance(s.eta, bool) and s.eta >= 0, "sample.eta", s.eta,
           "must be a number >= 0")


# ---------------------------------------------------------------- state and step

def create_train_state(model: UNet, tx: optax.GradientTransformation, key: jax.Array, image_shape: tuple,
                       mesh, num_timesteps: int) -> tuple[TrainState, Any]:
  """eval_shape -> replicated shardings -> jit(init, out_shardings); returns (state, state shardings)."""
  def init(key):
    x = jnp.zeros((1, *image_shape), jnp.float32)
    params = model.init(key, x, jnp.zeros((1,), jnp.int32), **example_condition(model, image_shape))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(params), loss_history=D.init_loss_history(num_timesteps))

  abstract = jax.eval_shape(init, key)
  shardings = jax.tree.map(lambda _: replicated(mesh), abstract)  # params replicated (FSDP: later issue)
  return jax.jit(init, out_shardings=shardings)(key), shardings


def example_condition(model: UNet, image_shape: tuple) -> dict[str, jax.Array]:
  """Zero conditioning inputs of the model's kinds for one example (what init traces)."""
  cond = {}
  if model.num_classes:
    cond["y"] = jnp.zeros((1,), jnp.int32)
  if model.context_dim:
    cond["context"] = jnp.zeros((1, 1, model.context_dim), jnp.float32)
    cond["context_mask"] = jnp.ones((1, 1), jnp.int32)
  if model.concat_channels:
    cond["concat"] = jnp.zeros((1, *image_shape[:2], model.concat_channels), jnp.float32)
  return cond


def model_condition_kind(model: UNet) -> str:
  return "text" if model.context_dim else "class" if model.num_classes else "none"


def train_step(state: TrainState, batch: dict[str, jax.Array], base_key: jax.Array,
               text_table: C.TextTable | None = None, *, model: UNet, tx: optax.GradientTransformation,
               schedule: D.Schedule, diffusion: dict, ema_decay: float,
               learning_rate_fn) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the global batch [B,H,W,C]; key = fold_in(base_key, step).

  Conditional models read batch["label"] (a class, or the class whose captions a text model draws from
  `text_table`) and batch["concat"] when the model has concat channels.
  """
  key = jax.random.fold_in(base_key, state.step)
  key_t, key_noise, key_dropout, key_uncond = jax.random.split(key, 4)
  x_start = batch["image"]
  cond = C.train_condition(model_condition_kind(model), key_uncond, batch.get("label"), diffusion["p_uncond"],
                           model.num_classes, text_table)
  if model.concat_channels:
    cond["concat"] = batch["concat"]
  t, weights = D.sample_timesteps(key_t, x_start.shape[0], schedule.num_timesteps,
                                  sampler=diffusion["timestep_sampler"], history=state.loss_history)
  noise = jax.random.normal(key_noise, x_start.shape, x_start.dtype)

  def loss_fn(params):
    model_fn = lambda x, tt: model.apply(params, x, tt, train=True, rngs={"dropout": key_dropout}, **cond)
    terms = D.diffusion_loss(schedule, model_fn, x_start, t, noise, loss_type=diffusion["loss"],
                             prediction=diffusion["prediction"], variance=diffusion["variance"],
                             vlb_weight=diffusion["vlb_weight"], snr_gamma=diffusion["snr_gamma"] or None)
    return jnp.mean(terms["loss"] * weights), terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # EMA of params (DDPM: 0.9999), with the usual warm-up so short runs are not dominated by init.
  decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  history = state.loss_history
  if diffusion["timestep_sampler"] == "importance":
    history = D.update_loss_history(history, t, jax.lax.stop_gradient(terms["loss"]))
  metrics = {"loss": loss, "mse": jnp.mean(terms["mse"]), "grad_norm": optax.tree.norm(grads),
             "learning_rate": learning_rate_fn(state.step)}
  if "vb" in terms:
    metrics["vb"] = jnp.mean(terms["vb"])
  return TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
                    loss_history=history), metrics


def compile_train_step(config: ml_collections.ConfigDict, model: UNet, tx: optax.GradientTransformation, lr_fn,
                       schedule: D.Schedule, mesh, state_shardings, *, donate: bool = True):
  """jit(state, batch, base_key, text_table) -> (state, metrics): batch sharded over the data axis, state as
  given, the caption table (None unless text-conditional) replicated."""
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, diffusion=config.diffusion.to_dict(),
                        ema_decay=config.optim.ema_decay, learning_rate_fn=lr_fn),
      in_shardings=(state_shardings, batch_sharding(mesh), replicated(mesh), replicated(mesh)),
      out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0 if donate else ())


# ---------------------------------------------------------------- sampling

def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, config.data.channels)


def make_sample_fn(model: UNet, schedule: D.Schedule, config: ml_collections.ConfigDict, mesh, *,
                   sampler: str, num_steps: int | None, decoder=None):
  """jit(params, key, batch, cond, null_cond) -> images [batch,H,W,C] in [-1,1], sharded over the mesh's data
  axis; cond / null_cond (conditional models) are pytrees with a leading [batch] axis, guided by
  sample.guidance_scale.

  With a `decoder` (latent.LatentDecoder), the sampler runs in latent space and the frozen decoder maps
  its output back to pixels (its params are an argument of the compiled program, not constants).
  """
  sharding = batch_sharding(mesh)
  shape_tail = image_shape(config) if decoder is None else decoder.model.latent_shape(image_shape(config))
  d = config.diffusion

  def fn(unet_params, key, batch, decoder_params, cond, null_cond):
    def conditional(x, t, c):
      return model.apply(unet_params, jax.lax.with_sharding_constraint(x, sharding), t, **c)
    if cond:
      model_fn = D.guided_model_fn(conditional, cond, null_cond, config.sample.guidance_scale,
                                   guided_channels=shape_tail[-1])
    else:
      model_fn = lambda x, t: conditional(x, t, {})
    x = D.sample(schedule, model_fn, (batch, *shape_tail), key, sampler=sampler, num_steps=num_steps,
                 prediction=d.prediction, eta=config.sample.eta, variance=d.variance,
                 clip_denoised=config.sample.clip_denoised, spacing=config.sample.spacing)
    if decoder is not None:
      x = latent.decode_latents(decoder.model, decoder_params, x, decoder.scale)
    return x

  compiled = jax.jit(fn, static_argnums=2, out_shardings=sharding)
  decoder_params = None if decoder is None else decoder.params
  return lambda params, key, batch, cond=None, null_cond=None: compiled(params, key, batch, decoder_params,
                                                                        cond or {}, null_cond or {})


def sample_images(sample_fn, params, key: jax.Array, num_images: int, batch_size: int,
                  cond: dict | None = None, null_cond: dict | None = None) -> np.ndarray:
  """uint8 [num_images,H,W,C]: batches of `batch_size` (a multiple of the device count), gathered; cond and
  null_cond are host pytrees with a leading [num_images] axis (see conditioning.sample_condition)."""
  n = jax.device_count()
  batch_size = max(n, -(-batch_size // n) * n)
  out = []
  for i in tqdm.trange(-(-num_images // batch_size), desc="sampling", unit="batch",
                       disable=jax.process_index() > 0 or num_images <= batch_size):
    # This batch's conditions, padded to the compiled batch size by repetition.
    part = lambda a: jnp.asarray(np.resize(a[i * batch_size:(i + 1) * batch_size], (batch_size, *a.shape[1:])))
    c, u = jax.tree.map(part, cond or {}), jax.tree.map(part, null_cond or {})
    out.append(image_io.to_uint8(global_to_host(sample_fn(params, jax.random.fold_in(key, i), batch_size, c, u))))
  return np.concatenate(out)[:num_images]


def write_samples(workdir: str, images: np.ndarray, name: str = "samples", labels: np.ndarray | None = None,
                  prompts: np.ndarray | None = None) -> tuple[str, np.ndarray]:
  """DIR/samples/<name>.npz (images uint8 [N,H,W,C], labels int [N], prompts [N]) and a grid .png, one row per
  prompt with its caption for text models; returns (png path, grid image)."""
  directory = os.path.join(workdir, "samples")
  os.makedirs(directory, exist_ok=True)
  extra = {k: v for k, v in (("labels", labels), ("prompts", prompts)) if v is not None}
  np.savez(os.path.join(directory, f"{name}.npz"), images=images, **extra)
  path = os.path.join(directory, f"{name}.png")
  grid = image_io.make_grid(images) if prompts is None else image_io.captioned_grid(images, prompts)
  image_io.write_png(path, grid)
  return path, grid


# ---------------------------------------------------------------- the loop

NonFiniteLossError = loop.NonFiniteLossError


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Train (resuming from the workdir's latest checkpoint), sample and evaluate; or only sample / evaluate.

  With `config.autoencoder` (latent diffusion), stage 1 trains the autoencoder first (or reuses a finished
  one) and the diffusion model runs on its scaled latents.
  """
  validate_config(config)
  from clu import metric_writers  # imports TensorFlow: keep it off import paths of the library
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = make_mesh()
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  training = config.mode == "train"
  batches = _train_batches(config) if training else None

  decoder = encode = None
  shape = image_shape(config)
  if is_latent(config):
    ae_model, ae_params, scale = latent.prepare_autoencoder(config, workdir, mesh, writer, train=training,
                                                            batches=batches)
    shape = ae_model.latent_shape(shape)
    decoder = latent.LatentDecoder(ae_model, ae_params, scale)
    encode_fn = latent.make_encode_fn(ae_model, mesh)
    encode = lambda key, images: encode_fn(ae_params, images, key, scale)

  kind = C.condition_kind(config)
  encoder = C.load_encoder(config) if kind == "text" else None  # frozen; runs once per distinct prompt
  text_table = None
  if kind == "text" and training:
    text_table = C.build_text_table(encoder, C.dataset_captions(config.data.dataset))
    logging.info("text conditioning: %s encoder, %d captions embedded as [%d,%d,%d]", encoder.name,
                 text_table.context.shape[0] - 1, *text_table.context.shape)
  model, schedule = build_model(config), build_schedule(config)
  tx, lr_fn = build_optimizer(config)
  init_key, train_key, sample_key = jax.random.split(jax.random.key(config.seed), 3)
  state, state_shardings = create_train_state(model, tx, init_key, shape, mesh, schedule.num_timesteps)
  logging.info("diffusion model: %.2fM parameters on %s inputs", sum(x.size for x in jax.tree.leaves(state.params)) / 1e6,
               "x".join(map(str, shape)))
  manager = checkpoint.make_manager(workdir, max_to_keep=config.keep_checkpoints)

  if not training:
    state = checkpoint.restore(manager, state, config.sample.checkpoint_step)
  elif manager.latest_step() is not None:
    state = checkpoint.restore(manager, state)
    logging.info("resumed from %s at step %d", manager.directory, int(state.step))

  if training:
    try:
      state = _train(config, workdir, state, state_shardings, mesh, model, tx, lr_fn, schedule, train_key,
                     manager, writer, batches, encode, decoder, text_table, encoder)
    finally:
      manager.wait_until_finished()  # an in-flight save completes even when training fails

  step = int(state.step)
  sample_fn = make_sample_fn(model, schedule, config, mesh, sampler=config.sample.sampler,
                             num_steps=config.sample.num_steps, decoder=decoder)
  t0 = time.time()
  logging.info("sampling %d images with %s (%s steps) from the EMA params of step %d", config.sample.num_images,
               config.sample.sampler, config.sample.num_steps or schedule.num_timesteps, step)
  labels, prompts, cond, null_cond = C.sampling_inputs(config, config.sample.num_images, encoder)
  images = sample_images(sample_fn, state.ema_params, sample_key, config.sample.num_images, config.sample.batch_size,
                         cond, null_cond)
  if jax.process_index() == 0:
    path, grid = write_samples(workdir, images, labels=labels, prompts=prompts)
    writer.write_images(step, {"samples": grid[None]})
    logging.info("wrote %d samples in %.1fs: %s", len(images), time.time() - t0, path)
  if config.mode == "eval" or (training and config.eval.after_training):
    from diffusion_jax.evaluation.evaluate import evaluate
    evaluate(config, workdir, step=step, model=model, params=state.ema_params, schedule=schedule, mesh=mesh,
             images=images, labels=labels, writer=writer)
  writer.flush()
  manager.wait_until_finished()
  manager.close()


def is_latent(config: ml_collections.ConfigDict) -> bool:
  return "autoencoder" in config and config.autoencoder is not None


def _train_batches(config: ml_collections.ConfigDict) -> InMemoryBatches:
  images, labels = load_split(config.data.dataset, "train", config.data.data_dir)
  if images.shape[1:] != image_shape(config):
    raise ValueError(f"dataset {config.data.dataset!r} has images of shape {images.shape[1:]}, but config.data "
                     f"says image_size={config.data.image_size}, channels={config.data.channels}")
  return InMemoryBatches(images, labels, global_batch=config.batch_size, seed=config.seed,
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         random_flip=config.data.random_flip)


def _train(config, workdir, state, state_shardings, mesh, model, tx, lr_fn, schedule, train_key, manager,
           writer, batches, encode, decoder, text_table=None, encoder=None) -> TrainState:
  """Stage 2 (or the only stage): the diffusion model on images, or on scaled latents when `encode`."""
  data_sharding = batch_sharding(mesh)
  step_fn = compile_train_step(config, model, tx, lr_fn, schedule, mesh, state_shardings)
  preview_sample = make_sample_fn(model, schedule, config, mesh, sampler=config.sample.preview_sampler,
                                  num_steps=config.sample.preview_steps, decoder=decoder)
  preview_key = jax.random.fold_in(train_key, 2**31 - 1)  # never a train step's key
  encode_key = jax.random.fold_in(train_key, 2**31 - 2)

  def batch_fn(index):
    host = batches.batch(index)
    batch = host_to_global({"image": host["image"], "label": host["label"]} if model_condition_kind(model) != "none"
                           else {"image": host["image"]}, data_sharding)
    if encode is not None:  # LDM: the frozen encoder runs in the input pipeline, on device
      batch["image"] = encode(jax.random.fold_in(encode_key, index), batch["image"])
    return batch

  labels, prompts, cond, null_cond = C.sampling_inputs(config, config.sample.preview_images, encoder, every_class=True)

  def preview(state, step):
    grid_images = sample_images(preview_sample, state.ema_params, jax.random.fold_in(preview_key, step),
                                config.sample.preview_images, config.sample.batch_size, cond, null_cond)
    if jax.process_index() == 0:
      _, grid = write_samples(workdir, grid_images, name=f"preview_{step:07d}", labels=labels, prompts=prompts)
      writer.write_images(step, {"preview": grid[None]})

  return loop.run_loop(state=state, step_fn=lambda s, b: step_fn(s, b, train_key, text_table), batch_fn=batch_fn,
                       num_steps=config.num_train_steps, batch_size=config.batch_size,
                       log_every=config.log_every_steps, checkpoint_every=config.checkpoint_every_steps,
                       preview_every=config.sample_every_steps, manager=manager, writer=writer, preview_fn=preview,
                       name="diffusion" if encode is not None else "train")
