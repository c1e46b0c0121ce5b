"""Stage 1 of latent diffusion (LDM): train the KL autoencoder, measure the latent scale, encode/decode."""

from __future__ import annotations

import functools
import json
import os
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from diffusion_jax import checkpoint, images as image_io
from diffusion_jax.data import InMemoryBatches
from diffusion_jax.loop import run_loop
from diffusion_jax.models.autoencoder import AutoencoderKL, autoencoder_loss
from diffusion_jax.parallel.mesh import batch_sharding, global_to_host, host_to_global, replicated

SCALE_FILE = "latent_scale.json"


@flax.struct.dataclass
class AutoencoderState:
  step: jax.Array
  params: Any
  opt_state: Any


class LatentDecoder(NamedTuple):
  """The frozen decoder a latent sampler ends with: images = decode(latents / scale)."""

  model: AutoencoderKL
  params: Any
  scale: float


def build_autoencoder(config: ml_collections.ConfigDict) -> AutoencoderKL:
  a = config.autoencoder
  return AutoencoderKL(ch=a.ch, ch_mult=tuple(a.ch_mult), num_res_blocks=a.num_res_blocks,
                       attn_resolutions=tuple(a.attn_resolutions), z_channels=a.z_channels,
                       out_channels=config.data.channels, conv_impl=config.model.conv_impl)


def autoencoder_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.autoencoder.checkpoint_dir or os.path.join(workdir, "autoencoder")


def autoencoder_train_step(state: AutoencoderState, batch: dict[str, jax.Array], base_key: jax.Array, *,
                           model: AutoencoderKL, tx, kl_weight: float, rec_loss: str, learning_rate_fn):
  """One step on images [B,H,W,C]: reconstruction + kl_weight * KL (LDM stage 1)."""
  key = jax.random.fold_in(base_key, state.step)

  def loss_fn(params):
    reconstruction, posterior = model.apply(params, batch["image"], key, train=True)
    terms = autoencoder_loss(reconstruction, batch["image"], posterior, kl_weight=kl_weight, rec_loss=rec_loss)
    return terms["loss"], terms

  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  metrics = {**terms, "grad_norm": optax.tree.norm(grads), "learning_rate": learning_rate_fn(state.step)}
  return AutoencoderState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state), metrics


def make_encode_fn(model: AutoencoderKL, mesh):
  """jit(params, images [B,H,W,C], key, scale) -> scale * z, z ~ q(z|x) [B,h,w,z] (LDM sec. 3.3)."""
  sharding = batch_sharding(mesh)

  def encode(params, images, key, scale):
    return scale * model.apply(params, images, method=model.encode).sample(key)

  return jax.jit(encode, out_shardings=sharding)


def decode_latents(model: AutoencoderKL, params, latents: jax.Array, scale) -> jax.Array:
  """Images [B,H,W,C] from scaled latents (the sampler's output) through the frozen decoder."""
  return model.apply(params, latents / scale, method=model.decode)


def prepare_autoencoder(config: ml_collections.ConfigDict, workdir: str, mesh, writer, *, train: bool,
                        batches: InMemoryBatches | None = None) -> tuple[AutoencoderKL, Any, float]:
  """(model, params, latent scale): restored when stage 1 finished, else trained now (if `train`)."""
  a = config.autoencoder
  model = build_autoencoder(config)
  directory = autoencoder_dir(config, workdir)
  if a.checkpoint_dir and not os.path.isdir(os.path.join(a.checkpoint_dir, "checkpoints")):
    raise FileNotFoundError(f"config.autoencoder.checkpoint_dir={a.checkpoint_dir!r} holds no autoencoder "
                            "checkpoint (expected a checkpoints/ folder written by a latent run's stage 1)")
  lr = optax.join_schedules([optax.linear_schedule(0.0, a.learning_rate, max(a.warmup_steps, 1)),
                             optax.constant_schedule(a.learning_rate)], [max(a.warmup_steps, 1)])
  tx = optax.adam(lr)
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)

  def init(key):
    params = model.init(key, jnp.zeros((1, *image_shape)), jax.random.key(0))
    return AutoencoderState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init, jax.random.key(config.seed))
  shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
  state = jax.jit(init, out_shardings=shardings)(jax.random.fold_in(jax.random.key(config.seed), 1))
  manager = checkpoint.make_manager(directory, max_to_keep=1)
  scale_path = os.path.join(directory, SCALE_FILE)
  if manager.latest_step() is not None:
    state = checkpoint.restore(manager, state)
  finished = int(state.step) >= a.num_train_steps and os.path.exists(scale_path)
  if finished:
    logging.info("stage 1: reusing the finished autoencoder in %s (step %d)", directory, int(state.step))
  elif not train:
    raise FileNotFoundError(f"no finished autoencoder in {directory}; run config.mode='train' first")
  else:
    state = _train_autoencoder(config, directory, state, shardings, model, tx, lr, mesh, manager, writer, batches)
    scale = _latent_scale(config, model, state.params, mesh, batches)
    if jax.process_index() == 0:
      with open(scale_path, "w") as f:
        json.dump({"scale_factor": scale, "step": int(state.step)}, f)
    logging.info("stage 1: latent scale factor 1/std = %.4f", scale)
  manager.close()
  with open(scale_path) as f:
    scale = float(json.load(f)["scale_factor"])
  return model, state.params, scale


def _train_autoencoder(config, directory, state, shardings, model, tx, lr, mesh, manager, writer, batches):
  a = config.autoencoder
  sharding = batch_sharding(mesh)
  base_key = jax.random.fold_in(jax.random.key(config.seed), 2)
  step = jax.jit(functools.partial(autoencoder_train_step, model=model, tx=tx, kl_weight=a.kl_weight,
                                   rec_loss=a.rec_loss, learning_rate_fn=lr),
                 in_shardings=(shardings, sharding, replicated(mesh)), out_shardings=(shardings, replicated(mesh)),
                 donate_argnums=0)
  fixed = host_to_global({"image": batches.batch(0)["image"][:8]}, replicated(mesh))
  reconstruct = jax.jit(lambda p, x: model.apply(p, x, jax.random.key(0))[0])

  def preview(state, step_index):
    rec = global_to_host(reconstruct(state.params, fixed["image"]))
    grid = image_io.make_grid(image_io.to_uint8(np.concatenate([np.asarray(fixed["image"]), rec])), ncol=8)
    if jax.process_index() == 0:
      os.makedirs(os.path.join(directory, "samples"), exist_ok=True)
      image_io.write_png(os.path.join(directory, "samples", f"reconstruction_{step_index:07d}.png"), grid)
      writer.write_images(step_index, {"autoencoder/reconstruction": grid[None]})

  ae_batches = InMemoryBatches(batches.images, batches.labels, global_batch=a.batch_size, seed=config.seed + 1,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               random_flip=config.data.random_flip)
  return run_loop(state=state, step_fn=lambda s, b: step(s, b, base_key),
                  batch_fn=lambda i: host_to_global({"image": ae_batches.batch(i)["image"]}, sharding),
                  num_steps=a.num_train_steps, batch_size=a.batch_size, log_every=config.log_every_steps,
                  checkpoint_every=config.checkpoint_every_steps, preview_every=config.sample_every_steps,
                  manager=manager, writer=writer, preview_fn=preview, name="autoencoder")


def _latent_scale(config, model, params, mesh, batches, num_batches: int = 10) -> float:
  """1 / std of the latents over a few batches (LDM sec. 4.3.2; Stable Diffusion's 0.18215 is this)."""
  encode = make_encode_fn(model, mesh)
  sharding = batch_sharding(mesh)
  latents = [global_to_host(encode(params, host_to_global({"image": batches.batch(10_000 + i)["image"]}, sharding)["image"],
                                   jax.random.key(i), 1.0)) for i in range(num_batches)]
  return float(1.0 / np.std(np.concatenate(latents)))
