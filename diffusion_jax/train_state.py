"""Train states of both stages, and the one way a state is created on the mesh:
eval_shape -> shardings -> jit(init, out_shardings) (big_vision's pattern)."""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec as P

from diffusion_jax import diffusion as D
from diffusion_jax.parallel.mesh import BATCH_AXES, PartitionRule, state_shardings


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


def init_on_mesh(init_fn: Callable[[jax.Array], Any], key: jax.Array, mesh: Mesh,
                 partition_rules: Sequence[PartitionRule] = ()) -> tuple[Any, Any]:
  """(state, state shardings): `init_fn(key)` traced once abstractly, each leaf's sharding chosen (the first
  matching partition rule, else FSDP over the mesh's fsdp axis for large arrays, else replicated:
  parallel.mesh.state_shardings), then run as one jit that writes each leaf straight into its sharding (no device
  ever holds the whole state when it is sharded)."""
  _, shardings = abstract_on_mesh(init_fn, key, mesh, partition_rules)
  return init_into(init_fn, key, shardings), shardings


def init_into(init_fn: Callable[[jax.Array], Any], key: jax.Array, shardings: Any) -> Any:
  """`init_fn(key)` as one jit that writes each leaf straight into its sharding (`abstract_on_mesh`'s)."""
  return jax.jit(init_fn, out_shardings=shardings)(key)


def abstract_on_mesh(init_fn: Callable[[jax.Array], Any], key: jax.Array, mesh: Mesh,
                     partition_rules: Sequence[PartitionRule] = ()) -> tuple[Any, Any]:
  """(abstract state, state shardings): what `init_on_mesh` would make, as jax.ShapeDtypeStructs carrying their
  shardings, with nothing allocated: the target a checkpoint restores into (Orbax reads each shard straight into
  place), so resuming or sampling never holds a freshly initialised state beside the restored one."""
  abstract = jax.eval_shape(init_fn, key)
  shardings = state_shardings(abstract, mesh, partition_rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings), shardings


def accumulated_value_and_grad(loss_fn: Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]], params: Any,
                               batch: Any, key: jax.Array, steps: int, flat_reduce_mesh: Mesh | None = None
                               ) -> tuple[tuple[jax.Array, Any], Any]:
  """`jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)` over `steps` micro-batches, one at a time
  (lax.scan: the activations of one micro-batch live at once), for global batches larger than memory.

  `batch`: a pytree of arrays with a leading [B] axis (B divisible by steps); `loss_fn(params, micro, key)` returns
  (the micro-batch's mean loss, aux with a leading [B/steps] axis). Micro-batch j takes rows j, j+steps, ...,
  so each device keeps contributing its own rows, and its own key fold_in(key, j) (one step: `key` itself). The
  mean of equal-sized micro-batch means is the global mean, so the loss and gradient are the full batch's (up to
  float summation order); aux comes back as [B].
  With `flat_reduce_mesh` (replicated params only: see flat_reduced_value_and_grad) each device takes its own rows
  and the gradients are averaged across the devices as one flat vector.
  """
  if flat_reduce_mesh is not None:
    return flat_reduced_value_and_grad(loss_fn, params, batch, key, steps, flat_reduce_mesh)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if steps == 1:
    return grad_fn(params, batch, key)
  split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)  # [steps,B/steps,...]
  merge = lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])  # back to [B,...] in the original order

  def body(grad_sum, indexed):
    j, micro = indexed
    (loss, aux), grads = grad_fn(params, micro, jax.random.fold_in(key, j))
    return jax.tree.map(jnp.add, grad_sum, grads), (loss, aux)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grad_sum, (losses, aux) = jax.lax.scan(body, zeros, (jnp.arange(steps), jax.tree.map(split, batch)))
  grads = jax.tree.map(lambda g: g / steps, grad_sum)
  return (jnp.mean(losses), jax.tree.map(lambda a: merge(a) if a.ndim > 1 else jnp.mean(a), aux)), grads


def flat_reduced_value_and_grad(loss_fn: Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]], params: Any,
                                batch: Any, key: jax.Array, steps: int, mesh: Mesh
                                ) -> tuple[tuple[jax.Array, Any], Any]:
  """accumulated_value_and_grad over `mesh`, each device on its own rows of the batch (shard_map), then the
  gradients averaged across the devices as ONE flat vector (ravel, pmean, unravel): a single all-reduce of one
  buffer instead of the tuple of one buffer per parameter that XLA's partitioner and all-reduce combiner make.

  Why: XLA:CPU's collectives over gloo (multi-process CPU) reduce a tuple one buffer at a time, a gloo round trip
  each: fmnist_small's 184 gradient tensors took 55.9-274.5 ms against 5.4-8.6 ms as one array of the same 1.1M
  floats (bench/xla_cpu_repros.py, 2 local processes). PyTorch's DistributedDataParallel buckets its gradients for
  the same reason (Li et al. 2020, "PyTorch Distributed", sec. 3.2.3). `params` must be replicated (their gradient
  is reduced to every device whole); `batch` leaves with a leading [B] axis are split over the mesh's batch axes,
  others replicated.

  The loss and aux are the global ones: each device's scalar aux (its rows' mean) averaged over the devices (equal
  row counts: the global mean), [B] aux gathered back in row order. Each device's key is fold_in(key, its index)
  so its rows draw their own dropout or posterior noise: the same distribution as the partitioned step's one draw
  over the global batch, not the same bits."""
  # The batch size: the leading size most leaves share (a condition without a [B] axis is replicated).
  b = collections.Counter(x.shape[0] for x in jax.tree.leaves(batch) if x.ndim).most_common(1)[0][0]
  batch_specs = jax.tree.map(lambda x: P(BATCH_AXES) if x.ndim and x.shape[0] == b else P(), batch)

  def per_device(params, rows, key):
    key = jax.random.fold_in(key, jax.lax.axis_index(BATCH_AXES))
    values, grads = accumulated_value_and_grad(loss_fn, params, rows, key, steps)
    flat, unravel = ravel_pytree(grads)
    # [1, ...] per device: out_specs gather every device's loss and aux along a new leading device axis.
    return jax.tree.map(lambda v: v[None], values), unravel(jax.lax.pmean(flat, BATCH_AXES))

  # check_vma=False: with it, autodiff inside shard_map psums the gradient of a replicated input per parameter (the
  # transpose of its implicit broadcast to the devices), the very tuple of all-reduces this function avoids.
  per_device_values, grads = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), batch_specs, P()),
                                           out_specs=(P(BATCH_AXES), P()), check_vma=False)(params, batch, key)
  # [devices] -> the mean of the devices' means; [devices, B/devices, ...] -> [B, ...] (the batch's device order).
  values = jax.tree.map(lambda v: jnp.mean(v, 0) if v.ndim == 1 else v.reshape(-1, *v.shape[2:]), per_device_values)
  return values, grads


def apply_gradients(params: Any, opt_state: Any, grads: Any, tx) -> tuple[Any, Any]:
  """One optimizer update: (new params, new optimizer state)."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def keep_if_finite(finite: jax.Array, new_state: Any, old_state: Any) -> Any:
  """optim.nan_policy='skip': the new state where the step's loss and gradient were finite, else the old one
  (with its step counter advanced by the caller, so the next step draws new keys and a new batch)."""
  return jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)


def guard_nonfinite(loss: jax.Array, grads: Any, new_state: Any, old_state: Any, skip_nonfinite: bool
                    ) -> tuple[Any, dict[str, jax.Array]]:
  """(state, {"grad_norm", "nonfinite"}) at the end of either stage's step: `nonfinite` is 1 when the loss or
  the gradient norm is NaN/inf; with skip_nonfinite (optim.nan_policy='skip') such a step keeps the old state,
  its step counter advanced (keep_if_finite)."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    new_state = keep_if_finite(finite, new_state, old_state).replace(step=old_state.step + 1)
  return new_state, {"grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32)}


def ema_update(ema_params: Any, params: Any, step: jax.Array, decay: float) -> Any:
  """EMA of the params (DDPM: 0.9999) with the usual warm-up min(decay, (1+step)/(10+step)), so that short
  runs are not dominated by the initialisation."""
  decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
