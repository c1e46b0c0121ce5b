"""Train-step benchmark: compile time, median step time, images/s and model FLOPs utilisation.

python bench/train_step.py [--configs fashion_mnist,cifar10_ddpm] [--steps 10] [--batch N]
Prints a markdown table; MFU = XLA cost-analysis FLOPs per step / measured step time / measured peak.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import load_config, print_table

from diffusion_jax import build, conditioning as C, latent, train
from diffusion_jax.parallel.mesh import batch_sharding, make_mesh


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
  config = load_config(name, list(overrides) + ([f"batch_size={batch}"] if batch else []))
  label = name + "".join(f" {o}" for o in overrides)
  mesh = make_mesh()
  data = batch_sharding(mesh)
  key = jax.random.key(1)
  rng = np.random.default_rng(0)
  parts = build.build_components(config)
  pixels, shape = parts.image_shape, parts.input_shape
  rows, encode_s = [], 0.0
  random_batch = lambda n, tail: jax.device_put(jnp.asarray(rng.uniform(-1, 1, (n, *tail)), jnp.float32), data)
  if parts.autoencoder is not None:
    ae, a = parts.autoencoder, config.autoencoder
    tx, lr = build.build_optimizer(build.OptimSettings(**a.optim))
    ae_state, _ = latent.create_autoencoder_state(ae, tx, jax.random.key(0), pixels, mesh)
    ae_step = jax.jit(functools.partial(latent.autoencoder_train_step, model=ae, tx=tx, kl_weight=a.kl_weight,
                                        rec_loss=a.rec_loss, learning_rate_fn=lr))
    rows.append(row(f"{label} stage 1 (autoencoder)", a.batch_size,
                    time_step(ae_step, ae_state, ({"image": random_batch(a.batch_size, pixels)}, key), steps, peak)))
    # Stage 2 encodes each batch with the frozen encoder: its time is part of a latent step.
    encode = latent.make_encode_fn(ae, mesh)
    images = random_batch(config.batch_size, pixels)
    encode(ae_state.params, images, key, 1.0).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
      encode(ae_state.params, images, key, 1.0).block_until_ready()
    encode_s = (time.perf_counter() - t0) / steps
    label = f"{label} stage 2 (U-Net on {'x'.join(map(str, shape))} + encoder)"
  state, shardings = train.create_train_state(parts.model, parts.tx, jax.random.key(0), shape, mesh,
                                              parts.schedule.num_timesteps)
  step_fn = train.compile_train_step(parts, mesh, shardings)
  batch = {"image": random_batch(config.batch_size, shape)}
  table = None
  if parts.condition.kind != "none":  # a conditional step also gathers the condition of each example
    batch["label"] = jax.device_put(jnp.asarray(rng.integers(0, parts.condition.num_labels, config.batch_size),
                                                jnp.int32), data)
  if parts.condition.kind == "text":
    table = C.build_text_table(build.load_text_encoder(config), parts.condition.captions)
  rows.append(row(label, config.batch_size, time_step(step_fn, state, (batch, key, table), steps, peak), encode_s))
  return rows


def split_config_names(text: str) -> list[str]:
  """'fashion_mnist,latent:full,class,cifar10_ddpm' -> ['fashion_mnist', 'latent:full,class', 'cifar10_ddpm']:
  a piece that names no config file is one more variant of the config before it."""
  import os
  names = []
  for piece in text.split(","):
    is_config = os.path.exists(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                            piece.partition(":")[0] + ".py"))
    if names and not is_config:
      names[-1] += "," + piece
    else:
      names.append(piece)
  return names


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="fashion_mnist,latent,cifar10_ddpm")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--set", action="append", default=[], help="override, e.g. --set model.ch=16")
  args = parser.parse_args()
  peak = peak_flops()
  rows = [r for c in split_config_names(args.configs) for r in bench_config(c, args.steps, args.batch, peak, args.set)]
  print(f"\nbackend {jax.default_backend()}, {jax.device_count()} devices, measured matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s\n")
  print_table(rows)


if __name__ == "__main__":
  main()
