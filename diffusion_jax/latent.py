"""Stage 1 of latent diffusion (LDM): train the KL autoencoder (or reuse a finished one), measure the latent
scale, and the encode / decode functions stage 2 uses. It trains through the same state helper, optimizer
builder and loop as stage 2 (train_state, build, loop) on its own data stream."""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import checkpoint, images as image_io
from diffusion_jax.build import OptimSettings, build_optimizer, image_shape as config_image_shape
from diffusion_jax.data import make_batches
from diffusion_jax.keys import RunKeys, data_seed
from diffusion_jax.loop import run_loop
from diffusion_jax.models import layers
from diffusion_jax.models.autoencoder import AutoencoderKL, autoencoder_loss
from diffusion_jax.parallel.mesh import (PartitionRule, batch_sharding, flat_gradient_reduce, global_to_host,
                                         host_to_global, partition_rules_from_config, replicated)
from diffusion_jax.train_state import (AutoencoderState, abstract_on_mesh, accumulated_value_and_grad,
                                      apply_gradients, guard_nonfinite, init_into, init_on_mesh)

SCALE_FILE = "latent_scale.json"


class LatentDecoder(NamedTuple):
  """The frozen decoder a latent sampler ends with: images = decode(latents / scale)."""

  model: AutoencoderKL
  params: Any
  scale: float

  def decode(self, params: Any, latents: jax.Array) -> jax.Array:
    """Images [B,H,W,C] from scaled latents [B,h,w,z] (the sampler's output)."""
    return self.model.apply(params, latents / self.scale, method=self.model.decode)


def autoencoder_dir(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> epath.Path:
  return epath.Path(config.autoencoder.checkpoint_dir or epath.Path(workdir) / "autoencoder")


def autoencoder_train_step(state: AutoencoderState, batch: dict[str, jax.Array], base_key: jax.Array, *,
                           model: AutoencoderKL, tx, kl_weight: float, rec_loss: str, learning_rate_fn,
                           skip_nonfinite: bool = False, grad_accum_steps: int = 1,
                           flat_reduce_mesh: Mesh | None = None
                           ) -> tuple[AutoencoderState, dict[str, jax.Array]]:
  """One step on images [B,H,W,C]: reconstruction + kl_weight * KL (LDM stage 1); key = fold_in(base, step).
  skip_nonfinite (nan_policy='skip'): a step with a NaN/inf loss or gradient keeps the old state.
  grad_accum_steps: the gradient over that many micro-batches (train_state.accumulated_value_and_grad);
  flat_reduce_mesh: averaged across the devices as one flat vector (as train.train_step's)."""
  key = jax.random.fold_in(base_key, state.step)

  def loss_fn(params, micro, posterior_key):  # a posterior key per micro-batch (accumulated_value_and_grad)
    reconstruction, posterior = model.apply(params, micro["image"], posterior_key, train=True)
    terms = autoencoder_loss(reconstruction, micro["image"], posterior, kl_weight=kl_weight, rec_loss=rec_loss)
    return terms["loss"], terms

  (_, terms), grads = accumulated_value_and_grad(loss_fn, state.params, {"image": batch["image"]}, key,
                                                 grad_accum_steps, flat_reduce_mesh)
  params, opt_state = apply_gradients(state.params, state.opt_state, grads, tx)
  new_state = AutoencoderState(step=state.step + 1, params=params, opt_state=opt_state)
  new_state, guard = guard_nonfinite(terms["loss"], grads, new_state, state, skip_nonfinite)
  metrics = {**terms, "learning_rate": learning_rate_fn(state.step), **guard}
  return new_state, metrics


def create_autoencoder_state(model: AutoencoderKL, tx, key: jax.Array, image_shape: tuple[int, int, int], mesh,
                             partition_rules: Sequence[PartitionRule] = ()) -> tuple[AutoencoderState, Any]:
  return init_on_mesh(autoencoder_state_init_fn(model, tx, image_shape), key, mesh, partition_rules)


def autoencoder_state_init_fn(model: AutoencoderKL, tx, image_shape: tuple[int, int, int]
                              ) -> Callable[[jax.Array], AutoencoderState]:
  """init(key) -> a fresh AutoencoderState (run on the mesh by create_autoencoder_state; abstract for restores)."""
  def init(key):
    params = model.init(key, jnp.zeros((1, *image_shape)), jax.random.key(0))
    return AutoencoderState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def make_encode_fn(model: AutoencoderKL, mesh):
  """jit(params, images [B,H,W,C], key, scale) -> scale * z, z ~ q(z|x) [B,h,w,z] (LDM sec. 3.3)."""
  def encode(params, images, key, scale):
    return scale * model.apply(params, images, method=model.encode).sample(key)
  return jax.jit(encode, out_shardings=batch_sharding(mesh))


def prepare_autoencoder(config: ml_collections.ConfigDict, model: AutoencoderKL, workdir: str | epath.Path, mesh,
                        writer, keys: RunKeys, train: bool = True) -> LatentDecoder:
  """The finished stage 1 (restored), else trained now on the config's dataset (the same stream stage 2
  reads, in its own order); without `train` (sample / eval modes) a missing stage 1 is a FileNotFoundError."""
  a = config.autoencoder
  directory = autoencoder_dir(config, workdir)
  if a.checkpoint_dir and not (directory / "checkpoints").is_dir():
    raise FileNotFoundError(f"config.autoencoder.checkpoint_dir={a.checkpoint_dir!r} holds no autoencoder "
                            "checkpoint (expected a checkpoints/ folder written by a latent run's stage 1)")
  optim = OptimSettings(**a.optim)
  tx, lr = build_optimizer(optim)
  init_fn = autoencoder_state_init_fn(model, tx, config_image_shape(config))
  # As stage 2: a checkpoint restores into the abstract state; a fresh state only when there is none.
  abstract, shardings = abstract_on_mesh(init_fn, keys.autoencoder_init, mesh, partition_rules_from_config(config.mesh))
  manager = checkpoint.make_manager(directory, max_to_keep=config.keep_checkpoints)
  scale_path = directory / SCALE_FILE
  state = checkpoint.restore_latest_good(manager, abstract)  # a damaged newest step falls back to an older one
  if state is None:
    state = init_into(init_fn, keys.autoencoder_init, shardings)
  if int(state.step) >= a.num_train_steps and scale_path.exists():
    logging.info("stage 1: reusing the finished autoencoder in %s (step %d)", directory, int(state.step))
    scale = float(json.loads(scale_path.read_text())["scale_factor"])
  elif not train:
    raise FileNotFoundError(f"no finished autoencoder in {directory}; run config.mode='train' first")
  else:
    batches = make_batches(config.data, global_batch=a.batch_size, seed=data_seed(config.seed, "autoencoder"),
                           process_index=jax.process_index(), process_count=jax.process_count())
    step_fn = jax.jit(functools.partial(autoencoder_train_step, model=model, tx=tx, kl_weight=a.kl_weight,
                                        rec_loss=a.rec_loss, learning_rate_fn=lr,
                                        skip_nonfinite=optim.nan_policy == "skip",
                                        grad_accum_steps=optim.grad_accum_steps,
                                        flat_reduce_mesh=mesh if flat_gradient_reduce(shardings.params) else None),
                      in_shardings=(shardings, batch_sharding(mesh), replicated(mesh)),
                      out_shardings=(shardings, replicated(mesh)), donate_argnums=0,
                      compiler_options=layers.model_step_compiler_options(
                          model, a.batch_size, mesh.size, config_image_shape(config)) or None)
    try:
      state = run_loop(state=state, step_fn=step_fn, step_args=(keys.autoencoder_train,),
                       host_batch_fn=lambda i: {"image": batches.batch(i)["image"]},
                       device_batch_fn=lambda host, i: host_to_global(host, batch_sharding(mesh)),
                       num_steps=a.num_train_steps, batch_size=a.batch_size, log_every=config.log_every_steps,
                       checkpoint_every=config.checkpoint_every_steps, preview_every=config.preview_every_steps,
                       manager=manager, writer=writer, name="autoencoder", nan_policy=optim.nan_policy,
                       preview_fn=_reconstruction_preview(model, batches, mesh, directory, writer))
      scale = latent_scale(model, state.params, mesh, batches, keys.latent_scale)
    finally:
      if hasattr(batches, "close"):
        batches.close()  # stop the streaming workers, also when training stops on a signal or an error
    if jax.process_count() > 1:  # one value everywhere, from process 0 (no process reads a file another writes)
      from jax.experimental import multihost_utils
      scale = float(multihost_utils.broadcast_one_to_all(np.float32(scale)))
    if jax.process_index() == 0:
      scale_path.write_text(json.dumps({"scale_factor": scale, "step": int(state.step)}))
    logging.info("stage 1: latent scale factor 1/std = %.4f", scale)
  manager.close()
  return LatentDecoder(model, state.params, float(scale))


def _reconstruction_preview(model: AutoencoderKL, batches, mesh, directory: epath.Path, writer):
  """preview_fn(state, step): 8 fixed train images over their reconstructions, as a PNG and in TensorBoard."""
  fixed = batches.batch(0)["image"][:8]
  # A global array on every device (every process passes its rows), as the jitted function of a multi-process
  # mesh needs; a plain local array would not be one.
  fixed_global = host_to_global({"image": fixed}, replicated(mesh))["image"]
  reconstruct = jax.jit(lambda p, x: model.apply(p, x, jax.random.key(0))[0])

  def preview(state, step):
    rec = global_to_host(reconstruct(state.params, fixed_global))
    grid = image_io.make_grid(image_io.to_uint8(np.concatenate([fixed, rec])), ncol=8)
    if jax.process_index() == 0:
      (directory / "samples").mkdir(parents=True, exist_ok=True)
      image_io.write_png(directory / "samples" / f"reconstruction_{step:07d}.png", grid)
      writer.write_images(step, {"autoencoder/reconstruction": grid[None]})
  return preview


def latent_scale(model: AutoencoderKL, params: Any, mesh, batches, key: jax.Array,
                 num_batches: int = 10) -> float:
  """1 / std of the latents over a few batches (LDM sec. 4.3.2; Stable Diffusion's 0.18215 is this)."""
  encode = make_encode_fn(model, mesh)
  sharding = batch_sharding(mesh)
  latents = [global_to_host(encode(params, host_to_global({"image": batches.batch(10_000 + i)["image"]},
                                                          sharding)["image"], jax.random.fold_in(key, i), 1.0))
             for i in range(num_batches)]
  return float(1.0 / np.std(np.concatenate(latents)))
