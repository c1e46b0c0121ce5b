"""Train-step benchmark: compile time, median step time, images/s and model FLOPs utilisation.

python bench/train_step.py [--configs fashion_mnist,cifar10_ddpm] [--steps 10] [--batch N]
Prints a markdown table; MFU = XLA cost-analysis FLOPs per step / measured step time / measured peak.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import apply_overrides, load_config, print_table  # noqa: E402
from diffusion_jax import conditioning as C, latent, train  # noqa: E402
from diffusion_jax.parallel.mesh import batch_sharding, make_mesh  # noqa: E402


def peak_flops(n: int = 2048, reps: int = 5) -> float:
  """Measured float32 matmul FLOP/s of this backend (the denominator of MFU)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / min(times)


def time_step(step_fn, state, args: tuple, steps: int, peak: float) -> dict:
  """AOT-compile `step_fn(state, *args) -> (state, metrics)`, then time `steps` calls."""
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, *args).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) * jax.device_count()  # cost analysis is per device
  state, m = compiled(state, *args)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, *args)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  return dict(params=f"{sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.2f}M",
              compile_s=f"{compile_s:.1f}", median_s=med, mfu=f"{flops / med / peak * 100:.1f}%" if flops else "n/a")


def row(label, batch, timing, extra_s=0.0):
  med = timing["median_s"] + extra_s
  return dict(config=label, params=timing["params"], devices=jax.device_count(), batch=batch,
              compile_s=timing["compile_s"], ms_per_step=f"{med * 1e3:.0f}", images_per_s=f"{batch / med:.1f}",
              mfu=timing["mfu"])


def bench_config(name: str, steps: int, batch: int | None, peak: float, overrides=()) -> list[dict]:
  """One row per train step of the config: the diffusion step, and for latent configs the autoencoder's."""
  config = apply_overrides(load_config(name), list(overrides))
  if batch:
    config.batch_size = batch
  label = name + "".join(f" {o}" for o in overrides)
  mesh = make_mesh()
  data = batch_sharding(mesh)
  key = jax.random.key(1)
  rng = np.random.default_rng(0)
  pixels = (config.data.image_size, config.data.image_size, config.data.channels)
  rows, shape, encode_s = [], pixels, 0.0
  if train.is_latent(config):
    import optax
    ae = latent.build_autoencoder(config)
    tx = optax.adam(1e-4)
    params = ae.init(jax.random.key(0), jnp.zeros((1, *pixels)), key)
    ae_state = latent.AutoencoderState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    ae_batch = jax.device_put(jnp.asarray(rng.uniform(-1, 1, (config.autoencoder.batch_size, *pixels)), jnp.float32), data)
    ae_step = jax.jit(functools.partial(latent.autoencoder_train_step, model=ae, tx=tx, kl_weight=1e-6,
                                        rec_loss="l1", learning_rate_fn=lambda _: 1e-4))
    rows.append(row(f"{label} stage 1 (autoencoder)", config.autoencoder.batch_size,
                    time_step(ae_step, ae_state, ({"image": ae_batch}, key), steps, peak)))
    # Stage 2 encodes each batch with the frozen encoder: its time is part of a latent step.
    encode = latent.make_encode_fn(ae, mesh)
    images = jax.device_put(jnp.asarray(rng.uniform(-1, 1, (config.batch_size, *pixels)), jnp.float32), data)
    encode(params, images, key, 1.0).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
      encode(params, images, key, 1.0).block_until_ready()
    encode_s = (time.perf_counter() - t0) / steps
    shape = ae.latent_shape(pixels)
    label = f"{label} stage 2 (U-Net on {'x'.join(map(str, shape))} + encoder)"
  model, schedule = train.build_model(config), train.build_schedule(config)
  tx, lr_fn = train.build_optimizer(config)
  state, shardings = train.create_train_state(model, tx, jax.random.key(0), shape, mesh, schedule.num_timesteps)
  step_fn = train.compile_train_step(config, model, tx, lr_fn, schedule, mesh, shardings)
  batch = {"image": jax.device_put(jnp.asarray(rng.uniform(-1, 1, (config.batch_size, *shape)), jnp.float32), data)}
  table = None
  if C.condition_kind(config) != "none":  # a conditional step also gathers the condition of each example
    batch["label"] = jax.device_put(jnp.asarray(rng.integers(0, 10, config.batch_size), jnp.int32), data)
  if C.condition_kind(config) == "text":
    table = C.build_text_table(C.load_encoder(config), C.dataset_captions(config.data.dataset))
  rows.append(row(label, config.batch_size, time_step(step_fn, state, (batch, key, table), steps, peak), encode_s))
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="fashion_mnist,latent,cifar10_ddpm")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--set", action="append", default=[], help="override, e.g. --set model.ch=16")
  args = parser.parse_args()
  peak = peak_flops()
  rows = [r for c in args.configs.split(",") for r in bench_config(c, args.steps, args.batch, peak, args.set)]
  print(f"\nbackend {jax.default_backend()}, {jax.device_count()} devices, measured matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s\n")
  print_table(rows)


if __name__ == "__main__":
  main()
