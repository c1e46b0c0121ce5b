"""Train states of both stages, and the one way a state is created on the mesh:
eval_shape -> shardings -> jit(init, out_shardings) (big_vision's pattern)."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from diffusion_jax import diffusion as D
from diffusion_jax.parallel.mesh import replicated


@flax.struct.dataclass
class TrainState:
  """The diffusion model's state: EMA params for sampling, the loss history for importance-sampled t."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  loss_history: D.LossHistory


@flax.struct.dataclass
class AutoencoderState:
  """Stage 1 (latent diffusion): the autoencoder's state (no EMA)."""

  step: jax.Array
  params: Any
  opt_state: Any


def init_on_mesh(init_fn: Callable[[jax.Array], Any], key: jax.Array, mesh: Mesh) -> tuple[Any, Any]:
  """(state, state shardings): `init_fn(key)` traced once abstractly, its shardings chosen (replicated; FSDP
  rules would go here), then run as one jit that writes each leaf straight into its sharding."""
  abstract = jax.eval_shape(init_fn, key)
  shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
  return jax.jit(init_fn, out_shardings=shardings)(key), shardings


def apply_gradients(params: Any, opt_state: Any, grads: Any, tx) -> tuple[Any, Any]:
  """One optimizer update: (new params, new optimizer state)."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def keep_if_finite(finite: jax.Array, new_state: Any, old_state: Any) -> Any:
  """optim.nan_policy='skip': the new state where the step's loss and gradient were finite, else the old one
  (with its step counter advanced by the caller, so the next step draws new keys and a new batch)."""
  return jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)


def ema_update(ema_params: Any, params: Any, step: jax.Array, decay: float) -> Any:
  """EMA of the params (DDPM: 0.9999) with the usual warm-up min(decay, (1+step)/(10+step)), so that short
  runs are not dominated by the initialisation."""
  decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
