"""Train-step benchmark: compile time, median step time, images/s and model FLOPs utilisation.

python bench/train_step.py [--configs fashion_mnist,cifar10_ddpm] [--steps 10] [--batch N] [--peak-tflops P]
  [--profile DIR]
Prints a markdown table; MFU = XLA cost-analysis FLOPs per step / measured step time / peak (the measured
float32 matmul peak, or --peak-tflops, e.g. 989 for an H100's bf16 dense peak). --profile traces 3 more
steps of each row with jax.profiler into DIR and prints where the time goes (per op category and top ops).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import TrainStepSetup, host_memory_as_main, load_config, native_conv_flops, print_table

from diffusion_jax import build, conditioning as C, latent
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


def time_step(step_fn, state, args: tuple, steps: int, peak: float, profile_dir: str | None = None) -> dict:
  """AOT-compile `step_fn(state, *args) -> (state, metrics)`, then time `steps` calls (and trace 3 more)."""
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, *args)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  # FLOPs of the program as written (before XLA's backend passes), the same on every platform: the compiled
  # module's count misses work moved into library calls (on GPU, cuDNN convolutions count 0).
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  if flops:  # the native kernels' custom calls count 0 there
    flops += native_conv_flops(compiled.as_text(), jax.device_count())  # the step's mesh: every device
  state, m = compiled(state, *args)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, *args)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  if profile_dir:
    from common import summarize_trace
    jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
    for _ in range(3):
      state, m = compiled(state, *args)
    jax.block_until_ready(m)
    jax.profiler.stop_trace()
    categories, ops = summarize_trace(profile_dir, compiled.as_text(), 3)
    print(f"\nwhere the time goes ({flops / 1e9:.1f} GFLOP per step, {med * 1e3:.1f} ms per step):\n")
    print_table(categories)
    print()
    print_table(ops)
  return dict(params=f"{sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.2f}M",
              compile_s=f"{compile_s:.1f}", median_s=med, mfu=f"{flops / med / peak * 100:.1f}%" if flops else "n/a")


def row(label, batch, timing, extra_s=0.0):
  med = timing["median_s"] + extra_s
  return dict(config=label, params=timing["params"], devices=jax.device_count(), batch=batch,
              compile_s=timing["compile_s"], ms_per_step=f"{med * 1e3:.0f}", images_per_s=f"{batch / med:.1f}",
              mfu=timing["mfu"])


def bench_config(name: str, steps: int, batch: int | None, peak: float, overrides=(), profile_dir=None
                 ) -> list[dict]:
  """One row per train step of the config: the diffusion step, and for latent configs the autoencoder's."""
  config = load_config(name, list(overrides) + ([f"batch_size={batch}"] if batch else []))
  label = name + "".join(f" {o}" for o in overrides)
  mesh = make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
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
  setup = TrainStepSetup(config, mesh, parts=parts)
  table = None
  if parts.condition.kind == "text":
    table = C.build_text_table(build.load_text_encoder(config), parts.condition.captions)
  timing = time_step(setup.step, setup.state, (setup.batch, setup.key, table), steps, peak, profile_dir)
  rows.append(row(label, config.batch_size, timing, encode_s))
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
  parser.add_argument("--peak-tflops", type=float, default=0.0, help="MFU's denominator (0: measure fp32 matmul)")
  parser.add_argument("--profile", default=None, help="trace 3 steps per config into this folder, print a summary")
  args = parser.parse_args()
  host_memory_as_main()
  peak = args.peak_tflops * 1e12 or peak_flops()
  rows = [r for c in split_config_names(args.configs)
          for r in bench_config(c, args.steps, args.batch, peak, args.set, args.profile)]
  print(f"\nbackend {jax.default_backend()}, {jax.device_count()} devices, "
        f"{'given' if args.peak_tflops else 'measured fp32 matmul'} peak {peak / 1e9:.1f} GFLOP/s\n")
  print_table(rows)


if __name__ == "__main__":
  main()
