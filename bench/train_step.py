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
from diffusion_jax import train  # noqa: E402
from diffusion_jax.parallel.mesh import batch_sharding, make_mesh, replicated  # noqa: E402


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


def bench_config(name: str, steps: int, batch: int | None, peak: float, overrides=()) -> dict:
  config = apply_overrides(load_config(name), list(overrides))
  if batch:
    config.batch_size = batch
  mesh = make_mesh()
  model, schedule = train.build_model(config), train.build_schedule(config)
  tx, lr_fn = train.build_optimizer(config)
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  state, shardings = train.create_train_state(model, tx, jax.random.key(0), shape, mesh, schedule.num_timesteps)
  step_fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                      diffusion=config.diffusion.to_dict(), ema_decay=config.optim.ema_decay,
                                      learning_rate_fn=lr_fn),
                    in_shardings=(shardings, batch_sharding(mesh), replicated(mesh)),
                    out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
  batch_arr = jax.device_put(jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (config.batch_size, *shape)),
                                         jnp.float32), batch_sharding(mesh))
  key = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, {"image": batch_arr}, key).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) * jax.device_count()  # cost analysis is per device
  state, m = compiled(state, {"image": batch_arr}, key)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, {"image": batch_arr}, key)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  params = sum(x.size for x in jax.tree.leaves(state.params))
  label = name + "".join(f" {o}" for o in overrides)
  return dict(config=label, params=f"{params / 1e6:.2f}M", devices=jax.device_count(), batch=config.batch_size,
              compile_s=f"{compile_s:.1f}", ms_per_step=f"{med * 1e3:.0f}",
              images_per_s=f"{config.batch_size / med:.1f}",
              mfu=f"{flops / med / peak * 100:.1f}%" if flops else "n/a")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="fashion_mnist,cifar10_ddpm")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--set", action="append", default=[], help="override, e.g. --set model.ch=16")
  args = parser.parse_args()
  peak = peak_flops()
  rows = [bench_config(c, args.steps, args.batch, peak, args.set) for c in args.configs.split(",")]
  print(f"\nbackend {jax.default_backend()}, {jax.device_count()} devices, measured matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s\n")
  print_table(rows)


if __name__ == "__main__":
  main()
