"""diffusion_jax.train_state: the state helper both stages use, the optimizer update and the EMA."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax.build import OptimSettings, build_optimizer
from diffusion_jax.parallel.mesh import make_mesh
from diffusion_jax.train_state import apply_gradients, ema_update, init_on_mesh


def test_init_on_mesh_places_every_leaf_on_every_device():
  state, shardings = init_on_mesh(lambda k: {"w": jax.random.normal(k, (3, 4)), "n": jnp.zeros((), jnp.int32)},
                                  jax.random.key(0), make_mesh())
  assert state["w"].sharding.is_fully_replicated and len(state["w"].sharding.device_set) == jax.device_count()
  np.testing.assert_array_equal(state["w"], jax.random.normal(jax.random.key(0), (3, 4)))
  assert set(shardings) == {"w", "n"}


def test_optimizer_is_adam_with_linear_warmup_and_clipping():
  settings = OptimSettings(learning_rate=0.1, warmup_steps=4, grad_clip=1.0)
  tx, lr = build_optimizer(settings)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 2, 4, 9)], [0.0, 0.05, 0.1, 0.1], rtol=1e-6)
  params, grads = {"w": jnp.ones(3)}, {"w": jnp.asarray([30.0, 40.0, 0.0])}  # norm 50: clipped to 1
  new, opt_state = params, tx.init(params)
  for _ in range(3):
    new, opt_state = apply_gradients(new, opt_state, grads, tx)
  ref_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
  ref_params, ref_state = params, ref_tx.init(params)
  for _ in range(3):
    updates, ref_state = ref_tx.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
  np.testing.assert_allclose(new["w"], ref_params["w"], rtol=1e-6)


def test_ema_update_follows_its_warmup_formula():
  ema, params = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
  for step, decay in ((0, 0.9999), (100, 0.9999), (10**6, 0.9)):
    d = min(decay, (1 + step) / (10 + step))
    np.testing.assert_allclose(ema_update(ema, params, jnp.asarray(step), decay)["w"], 1 - d, rtol=1e-6)


def test_accumulated_value_and_grad_is_the_whole_batchs_and_keeps_row_order():
  from diffusion_jax.train_state import accumulated_value_and_grad
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(12, 3)), jnp.float32), "y": jnp.asarray(rng.normal(size=(12,)),
                                                                                      jnp.float32)}
  params = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32), "b": jnp.zeros(())}

  def loss_fn(p, micro, key):
    per_row = (micro["x"] @ p["w"] + p["b"] - micro["y"]) ** 2  # [b]
    return per_row.mean(), {"per_row": per_row, "mean": per_row.mean()}

  (loss1, aux1), g1 = accumulated_value_and_grad(loss_fn, params, batch, jax.random.key(0), 1)
  for steps in (2, 3, 4):
    (loss, aux), g = accumulated_value_and_grad(loss_fn, params, batch, jax.random.key(0), steps)
    np.testing.assert_allclose(loss, loss1, rtol=1e-6)
    np.testing.assert_allclose(aux["per_row"], aux1["per_row"], rtol=1e-6)  # [B] back in the batch's order
    np.testing.assert_allclose(aux["mean"], aux1["mean"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g1)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_flat_reduced_value_and_grad_is_the_whole_batchs_over_every_device():
  """Each of the 8 devices on its own rows, the gradients averaged as one flat vector: the whole batch's loss,
  scalar aux, [B] aux in row order and gradient, accumulated or not; one all-reduce in the compiled program."""
  from diffusion_jax.train_state import accumulated_value_and_grad, flat_reduced_value_and_grad
  rng = np.random.default_rng(1)
  batch = {"x": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32), "y": jnp.asarray(rng.normal(size=(16,)),
                                                                                      jnp.float32)}
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.asarray([0.5, -1.0], jnp.float32)}

  def loss_fn(p, micro, key):
    noise = 0.0 * jax.random.normal(key, micro["y"].shape)  # the key is drawn from, never changes the values
    per_row = ((micro["x"] @ p["w"] + p["b"]).sum(-1) - micro["y"] + noise) ** 2  # [b]
    return per_row.mean(), {"per_row": per_row, "mean": per_row.mean()}

  mesh = make_mesh()
  (loss1, aux1), g1 = accumulated_value_and_grad(loss_fn, params, batch, jax.random.key(0), 1)
  for steps in (1, 2):
    fn = jax.jit(lambda p, b: flat_reduced_value_and_grad(loss_fn, p, b, jax.random.key(0), steps, mesh))
    (loss, aux), g = fn(params, batch)
    np.testing.assert_allclose(loss, loss1, rtol=1e-6)
    np.testing.assert_allclose(aux["per_row"], aux1["per_row"], rtol=1e-6)
    np.testing.assert_allclose(aux["mean"], aux1["mean"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g1)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert g["w"].sharding.is_fully_replicated
    # XLA's own partitioning reduces f32[2] and f32[3,2] (one tuple all-reduce, a buffer each); here one f32[8] (and
    # the loss's scalar, which XLA's combiner puts beside it).
    hlo = fn.lower(params, batch).compile().as_text()
    reduced = [shape for line in hlo.splitlines() if re.search(r" all-reduce(-start)?\(", line)
               for shape in re.findall(r"f32\[([\d,]+)\]", line.split(" all-reduce")[0])]
    assert reduced == ["8"], reduced
