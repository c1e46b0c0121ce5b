"""Train a diffusion model: create_train_state, train_step, train_and_evaluate (flax examples/imagenet's shape).

One train step (the data flow of `train_step`): key = fold_in(keys.train, step) -> timesteps t and noise ->
the batch's condition with dropout (conditioning.train_condition) -> q_sample -> U-Net -> diffusion_loss ->
AdamW + EMA -> metrics. For latent diffusion the frozen encoder has already turned the batch into scaled
latents in the input pipeline (latent.make_encode_fn).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import build, checkpoint, conditioning as C, image_condition as IC, latent, loop
from diffusion_jax import diffusion as D
from diffusion_jax.config_check import check_config, check_resume, check_workdir
from diffusion_jax.data import make_batches, real_images
from diffusion_jax.keys import RunKeys, data_seed
from diffusion_jax.models import UNet, layers
from diffusion_jax.parallel.mesh import (PartitionRule, all_replicated, batch_sharding, flat_gradient_reduce,
                                         host_to_global, make_mesh, partition_rules_from_config, replicated)
from diffusion_jax.sampling import SampleSettings, make_sample_fn, sample_images, write_samples
from diffusion_jax.train_state import (TrainState, abstract_on_mesh, accumulated_value_and_grad, apply_gradients,
                                      ema_update, guard_nonfinite, init_into, init_on_mesh)

NonFiniteLossError = loop.NonFiniteLossError


# ---------------------------------------------------------------- state and step

def create_train_state(model: UNet, tx: optax.GradientTransformation, key: jax.Array,
                       input_shape: tuple[int, int, int], mesh, num_timesteps: int,
                       partition_rules: Sequence[PartitionRule] = ()) -> tuple[TrainState, Any]:
  """(state, state shardings) for a model on inputs [B,*input_shape] (pixels, or latents); `partition_rules`:
  config.mesh.partition_rules (parallel/mesh.py)."""
  return init_on_mesh(train_state_init_fn(model, tx, input_shape, num_timesteps), key, mesh, partition_rules)


def train_state_init_fn(model: UNet, tx: optax.GradientTransformation, input_shape: tuple[int, int, int],
                        num_timesteps: int) -> Callable[[jax.Array], TrainState]:
  """init(key) -> a fresh TrainState (what create_train_state runs on the mesh; jax.eval_shape of it gives a
  model's state shapes without allocating them, as bench/scaling.py does for an SD-sized U-Net)."""
  def init(key):
    x = jnp.zeros((1, *input_shape), jnp.float32)
    params = model.init(key, x, jnp.zeros((1,), jnp.int32), **example_condition(model, input_shape))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(params), loss_history=D.init_loss_history(num_timesteps))
  return init


def example_condition(model: UNet, input_shape: tuple[int, int, int]) -> dict[str, jax.Array]:
  """Zero conditioning inputs of the model's kinds for one example (what init traces)."""
  cond = {}
  if model.num_classes:
    cond["y"] = jnp.zeros((1,), jnp.int32)
  if model.context_dim:
    cond["context"] = jnp.zeros((1, 1, model.context_dim), jnp.float32)
    cond["context_mask"] = jnp.ones((1, 1), jnp.int32)
  if model.concat_channels:
    cond["concat"] = jnp.zeros((1, *input_shape[:2], model.concat_channels), jnp.float32)
  return cond


def train_step(state: TrainState, batch: dict[str, jax.Array], base_key: jax.Array,
               text_table: C.TextTable | C.CaptionEncoder | None = None, *, model: UNet,
               tx: optax.GradientTransformation, schedule: D.Schedule, diffusion: build.DiffusionSettings,
               condition: C.ConditionSpec, ema_decay: float, learning_rate_fn, skip_nonfinite: bool = False,
               text_module=None, image_condition: IC.ImageConditionSpec = IC.ImageConditionSpec(),
               grad_accum_steps: int = 1, flat_reduce_mesh: Mesh | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the global batch {"image": [B,H,W,C], "label": [B], "concat": [B,H,W,c],
  "caption_ids" / "caption_mask": [B,L]}; key = fold_in(base_key, step). Text models draw a caption of each
  example's class from `text_table`, or (per-image captions) encode the batch's own with `text_module`.
  An image condition (super-resolution, inpainting) is made from the batch's images here, on device.
  skip_nonfinite (optim.nan_policy='skip'): a step with a NaN/inf loss or gradient keeps the old state.
  grad_accum_steps (optim.grad_accum_steps): the gradient of the whole batch, computed over that many
  micro-batches one after another (train_state.accumulated_value_and_grad); t and noise are drawn for the
  whole batch first, so the step is the unaccumulated one up to float summation order (dropout aside).
  flat_reduce_mesh: each device computes its rows' gradient and they are averaged as one flat vector
  (train_state.flat_reduced_value_and_grad; compile_train_step's choice, parallel.mesh.flat_gradient_reduce)."""
  key = jax.random.fold_in(base_key, state.step)
  key_t, key_noise, key_dropout, key_uncond = jax.random.split(key, 4)
  x_start = batch["image"]
  cond = C.train_condition(condition, key_uncond, batch, text_table, text_module)
  if "concat" in batch:
    cond["concat"] = batch["concat"]
  elif image_condition.kind:
    cond["concat"] = IC.train_concat(image_condition, jax.random.fold_in(key, 4), x_start)
  t, weights = D.sample_timesteps(key_t, x_start.shape[0], schedule.num_timesteps,
                                  method=diffusion.timestep_sampler, history=state.loss_history)
  noise = jax.random.normal(key_noise, x_start.shape, x_start.dtype)
  b = x_start.shape[0]

  def loss_fn(params, micro, dropout_key):  # a dropout key per micro-batch (accumulated_value_and_grad)
    model_fn = lambda x, tt: model.apply(params, x, tt, train=True, rngs={"dropout": dropout_key}, **micro["cond"])
    terms = D.diffusion_loss(schedule, model_fn, micro["x_start"], micro["t"], micro["noise"],
                             loss_type=diffusion.loss, prediction=diffusion.prediction, variance=diffusion.variance,
                             vlb_weight=diffusion.vlb_weight, snr_gamma=diffusion.snr_gamma or None)
    return jnp.mean(terms["loss"] * micro["weights"]), terms

  batched_cond = {k: v for k, v in cond.items() if v.shape[:1] == (b,)}
  if len(batched_cond) != len(cond) and grad_accum_steps > 1:
    raise ValueError(f"conditions {sorted(set(cond) - set(batched_cond))} have no [B] axis to split into micro-batches")
  micro = {"x_start": x_start, "t": t, "noise": noise, "weights": weights, "cond": cond}
  (loss, terms), grads = accumulated_value_and_grad(loss_fn, state.params, micro, key_dropout, grad_accum_steps,
                                                    flat_reduce_mesh)
  params, opt_state = apply_gradients(state.params, state.opt_state, grads, tx)
  history = state.loss_history
  if diffusion.timestep_sampler == "importance":
    history = D.update_loss_history(history, t, jax.lax.stop_gradient(terms["loss"]))
  new_state = TrainState(step=state.step + 1, params=params,
                         ema_params=ema_update(state.ema_params, params, state.step, ema_decay), opt_state=opt_state,
                         loss_history=history)
  new_state, guard = guard_nonfinite(loss, grads, new_state, state, skip_nonfinite)
  metrics = {"loss": loss, "mse": jnp.mean(terms["mse"]), "learning_rate": learning_rate_fn(state.step), **guard}
  if "vb" in terms:
    metrics["vb"] = jnp.mean(terms["vb"])
  return new_state, metrics


def compile_train_step(parts: build.Components, mesh, state_shardings, *, batch_size: int = 0, donate: bool = True,
                       text_module=None, flat_reduce: bool | None = None):
  """jit(state, batch, base_key, text_table) -> (state, metrics): batch sharded over the data axis, state as
  given, the caption table or caption encoder (None unless text-conditional) replicated. `batch_size` (the global
  batch) picks XLA:CPU's convolutions with the model's width (layers.step_compiler_options); 0: by width alone.
  flat_reduce: the gradients averaged as one flat vector (train_state.flat_reduced_value_and_grad); None: where
  parallel.mesh.flat_gradient_reduce says (multi-process CPU, replicated parameters)."""
  if flat_reduce is None:
    flat_reduce = flat_gradient_reduce(state_shardings.params)
  elif flat_reduce and not all_replicated(state_shardings.params):
    raise ValueError("flat_reduce=True needs every parameter replicated (each device reduces the whole gradient); "
                     "these parameters are sharded (config.mesh.fsdp / partition_rules): pass flat_reduce=None")
  step = functools.partial(train_step, model=parts.model, tx=parts.tx, schedule=parts.schedule, text_module=text_module,
                           diffusion=parts.diffusion, condition=parts.condition, ema_decay=parts.optim.ema_decay,
                           learning_rate_fn=parts.learning_rate_fn, skip_nonfinite=parts.optim.nan_policy == "skip",
                           image_condition=parts.image_condition, grad_accum_steps=parts.optim.grad_accum_steps,
                           flat_reduce_mesh=mesh if flat_reduce else None)
  options = layers.model_step_compiler_options(parts.model, batch_size, mesh.size, parts.input_shape)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh), replicated(mesh), replicated(mesh)),
                 out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0 if donate else (),
                 compiler_options=options or None)


# ---------------------------------------------------------------- the run

@dataclasses.dataclass(frozen=True)
class Run:
  """What the parts of one run share: built once in train_and_evaluate."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  mesh: Any
  keys: RunKeys
  writer: Any
  parts: build.Components
  decoder: latent.LatentDecoder | None  # latent diffusion: the frozen stage-1 decoder
  text_encoder: Any  # text models: the frozen encoder, else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Train (resuming from the workdir's latest checkpoint), sample and evaluate; or only sample / evaluate.

  With `config.autoencoder` (latent diffusion), stage 1 trains the autoencoder first (or reuses a finished
  one) and the diffusion model runs on its scaled latents.
  """
  check_config(config)
  check_workdir(str(workdir))
  check_resume(config, str(workdir))  # before anything is written: config.json still records the trained run
  training = config.mode == "train"
  from clu import metric_writers  # imports TensorFlow: keep it off the library's import paths
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if training and jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  parts, keys = build.build_components(config), RunKeys.from_seed(config.seed)
  mesh = make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
  logging.info("mesh: %s over %d devices", dict(mesh.shape), mesh.size)
  writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
  text_encoder = build.load_text_encoder(config)  # first: a width mismatch stops the run before any training
  decoder = None
  if parts.autoencoder is not None:
    decoder = latent.prepare_autoencoder(config, parts.autoencoder, workdir, mesh, writer, keys, train=training)
  run = Run(config, workdir, mesh, keys, writer, parts, decoder, text_encoder)

  init_fn = train_state_init_fn(parts.model, parts.tx, parts.input_shape, parts.schedule.num_timesteps)
  # Restores go into the abstract state (shapes + shardings): a fresh state is only made when there is none.
  abstract, state_shardings = abstract_on_mesh(init_fn, keys.init, mesh, partition_rules_from_config(config.mesh))
  logging.info("diffusion model: %.2fM parameters on %s inputs",
               sum(x.size for x in jax.tree.leaves(abstract.params)) / 1e6, "x".join(map(str, parts.input_shape)))
  manager = checkpoint.make_manager(workdir, max_to_keep=config.keep_checkpoints)
  if not training:
    state = checkpoint.restore(manager, abstract, config.sample.checkpoint_step)
  else:
    state = checkpoint.restore_latest_good(manager, abstract)  # a damaged newest step falls back to an older one
    if state is not None:
      logging.info("resumed from %s at step %d", manager.directory, int(state.step))
    else:
      state = init_into(init_fn, keys.init, state_shardings)
  if training:
    try:
      state = _train(run, state, state_shardings, manager)
    finally:
      manager.wait_until_finished()  # an in-flight save completes even when training fails
  if config.mode == "edit":
    from diffusion_jax.editing import run_edit
    run_edit(config, workdir, parts=parts, mesh=mesh, params=state.ema_params, key=keys.edit, decoder=decoder,
             text_encoder=text_encoder)
    manager.close()
    return

  step = int(state.step)
  sampler = _sampler(run, SampleSettings.from_config(config.sample), config.sample.num_images,
                     prompt=config.sample.prompt, class_labels=config.sample.class_labels)
  t0 = time.time()
  images, labels = sampler(state.ema_params, keys.sample, "samples", step)
  logging.info("%d samples in %.1fs", len(images), time.time() - t0)
  if config.mode == "eval" or (training and config.eval.after_training):
    from diffusion_jax.evaluation.evaluate import evaluate
    evaluate(config, workdir, step=step, model=parts.model, params=state.ema_params, schedule=parts.schedule,
             mesh=mesh, images=images, labels=labels, writer=writer, key=keys.eval,
             null_cond=C.null_condition(parts.condition, run.text_encoder))
  writer.flush()
  manager.close()


def _train(run: Run, state: TrainState, state_shardings, manager) -> TrainState:
  """Stage 2 (or the only stage): the diffusion model on images, or on scaled latents with a decoder."""
  config, parts, keys, mesh = run.config, run.parts, run.keys, run.mesh
  batches = make_batches(config.data, global_batch=config.batch_size, seed=data_seed(config.seed, "diffusion"),
                         process_index=jax.process_index(), process_count=jax.process_count())
  text_table, text_module, per_image = None, None, parts.condition.per_image_captions
  if per_image:  # the batch carries its captions' tokens; the frozen encoder runs in the step, on device
    text_table, text_module = C.caption_encoder(run.text_encoder), run.text_encoder.module
    logging.info("text conditioning: %s encoder on each batch's own captions (%d tokens)", run.text_encoder.name,
                 run.text_encoder.max_length)
  elif parts.condition.kind == "text":
    text_table = C.build_text_table(run.text_encoder, parts.condition.captions)
    logging.info("text conditioning: %s encoder, %d captions embedded as [%d,%d,%d]", run.text_encoder.name,
                 text_table.context.shape[0] - 1, *text_table.context.shape)
  step_fn = compile_train_step(parts, mesh, state_shardings, batch_size=config.batch_size, text_module=text_module)
  encode = None if run.decoder is None else latent.make_encode_fn(run.decoder.model, mesh)
  keep = {"none": ("image",), "class": ("image", "label"),
          "text": ("image", "caption_ids", "caption_mask") if per_image else ("image", "label")}[parts.condition.kind]

  def host_batch_fn(index):  # in loop.Prefetched's thread: host work only
    host = batches.batch(index)
    if per_image:
      host = {**host, **C.caption_tokens(run.text_encoder, host["caption"])}
    return {k: host[k] for k in keep}

  def device_batch_fn(host, index):
    batch = host_to_global(host, batch_sharding(mesh))
    if encode is not None:  # LDM: the frozen encoder runs in the input pipeline, on device
      batch["image"] = encode(run.decoder.params, batch["image"], jax.random.fold_in(keys.encode, index),
                              run.decoder.scale)
    return batch

  preview = _sampler(run, SampleSettings.from_config(config.sample, preview=True), config.sample.preview_images)
  try:
    return loop.run_loop(state=state, step_fn=step_fn, step_args=(keys.train, text_table), host_batch_fn=host_batch_fn,
                         device_batch_fn=device_batch_fn,
                         num_steps=config.num_train_steps, batch_size=config.batch_size,
                         log_every=config.log_every_steps, checkpoint_every=config.checkpoint_every_steps,
                         preview_every=config.preview_every_steps, manager=manager, writer=run.writer,
                         preview_fn=lambda s, step: preview(s.ema_params, jax.random.fold_in(keys.preview, step),
                                                            f"preview_{step:07d}", step),
                         name="diffusion" if run.decoder is not None else "train", nan_policy=parts.optim.nan_policy)
  finally:
    if hasattr(batches, "close"):
      batches.close()  # stop the streaming workers


def _sampler(run: Run, settings: SampleSettings, num_images: int, *, prompt: str = "", class_labels: str = ""):
  """fn(params, key, name, step) -> (images uint8 [N,H,W,C], labels or None): samples `num_images` (every class
  in turn unless prompts or labels are given), writes DIR/samples/<name>.npz and .png and a TensorBoard grid.
  Compiled once; a preview calls it every preview_every_steps."""
  parts = run.parts
  sample_fn = make_sample_fn(parts.model, parts.schedule, settings, run.mesh, parts.input_shape,
                             prediction=parts.diffusion.prediction, variance=parts.diffusion.variance,
                             decoder=run.decoder)
  labels, prompts, cond, null_cond = C.sampling_inputs(parts.condition, num_images, run.text_encoder,
                                                       prompt=prompt, class_labels=class_labels)
  if parts.image_condition.kind:  # super-resolution / inpainting models sample from test images' conditions
    real = np.resize(real_images(run.config.data, "test", num_images), (num_images, *parts.image_shape))
    concat = IC.sampling_concat(parts.image_condition, real)
    cond, null_cond = {**cond, "concat": concat}, {**null_cond, "concat": concat}

  def sample(params, key, name, step):
    logging.info("%s: %d images with %s (%s steps) from the EMA params of step %d", name, num_images,
                 settings.sampler, settings.num_steps or parts.schedule.num_timesteps, step)
    images = sample_images(sample_fn, params, key, num_images, run.config.sample.batch_size, cond, null_cond)
    if jax.process_index() == 0:
      path, grid = write_samples(run.workdir, images, name, labels=labels, prompts=prompts)
      run.writer.write_images(step, {"preview" if name.startswith("preview") else "samples": grid[None]})
      logging.info("wrote %s", path)
    return images, labels
  return sample
