"""Input pipeline benchmark: an image folder of JPEGs streamed with grain, alone and under the train step.

python bench/input_pipeline.py [--sizes 64,256] [--images 256] [--workers 0,1,2] [--steps 4] [--rounds 3] [--batch 32]
For each image size: (a) images/s of the pipeline alone (decode, resize, crop, batch) with 0, 1, 2 worker
processes; (b) the train step of configs/image_folder.py at that size on a synthetic batch (already on the
devices) and on the folder's batches (pipeline + host-to-device + step) with each worker count, in alternating
rounds of --steps steps (medians), and their ratio. Without --data_dir a
folder of random-texture JPEGs 1.5x the target size is written to a temporary directory. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import load_config, host_memory_as_main, print_table

from diffusion_jax import build, train
from diffusion_jax.data import make_batches
from diffusion_jax.loop import Prefetched, StepsInFlight
from diffusion_jax.parallel.mesh import batch_sharding, host_to_global, make_mesh


def write_jpegs(directory: str, count: int, size: int) -> str:
  """`count` JPEGs (quality 90) of smooth random colour fields, `size`x`size`, in two class folders."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    os.makedirs(os.path.join(directory, c), exist_ok=True)
  for i in range(count):
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    image.save(os.path.join(directory, "ab"[i % 2], f"{i:05d}.jpg"), quality=90)
  return directory


def folder_config(data_dir: str, size: int, workers: int, batch: int):
  ch_mult = (1, 2, 2) if size <= 64 else (1, 1, 2, 2, 4)
  attn = (16,)  # the 16x16 level of both
  return load_config("image_folder", [f"data.data_dir={data_dir}", f"data.image_size={size}",
                                      f"data.num_workers={workers}", f"batch_size={batch}",
                                      f"model.ch_mult={ch_mult}", f"model.attn_resolutions={attn}"])


def pipeline_rate(config, steps: int) -> float:
  """Images/s of the batches alone, after the first batch (worker start-up) is out of the way."""
  batches = make_batches(config.data, global_batch=config.batch_size, seed=0)
  try:
    batches.batch(0)
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
      batches.batch(s)
    return steps * config.batch_size / (time.perf_counter() - t0)
  finally:
    batches.close()


def step_rates(config, workers: list[int], steps: int, rounds: int) -> dict[int, tuple[float, float]]:
  """{workers: (images/s of the train step on one synthetic batch already on the devices, images/s fed by the
  folder)}, medians over `rounds` alternating rounds of `steps` steps each, so drift of the machine falls on both
  alike; the fed loop does what the training loop does: read the next batch in a background thread
  (loop.Prefetched) while the step before it runs, then put it on the devices and dispatch."""
  mesh = make_mesh()
  sharding = batch_sharding(mesh)
  parts = build.build_components(config)
  state, shardings = train.create_train_state(parts.model, parts.tx, jax.random.key(0), parts.input_shape, mesh,
                                              parts.schedule.num_timesteps)
  step = train.compile_train_step(parts, mesh, shardings, batch_size=config.batch_size)
  key = jax.random.key(1)
  synthetic = {"image": jax.device_put(jnp.zeros((config.batch_size, *parts.input_shape)), sharding)}
  state, m = step(state, synthetic, key, None)  # compile
  jax.block_until_ready(m)
  rates = {}
  for w in workers:
    with config.unlocked():
      config.data.num_workers = w
    batches = make_batches(config.data, global_batch=config.batch_size, seed=0)
    try:
      batches.batch(0)  # start the workers
      seconds = {"synthetic": [], "fed": []}
      next_step = 1
      # As the training loop does: the next host batch made while a step runs.
      with Prefetched(lambda s: {"image": batches.batch(s)["image"]}, 1, 1 + rounds * steps) as fed:
        for _ in range(rounds):
          for kind in seconds:
            t0 = time.perf_counter()
            in_flight = StepsInFlight()  # as the training loop: at most loop.MAX_STEPS_IN_FLIGHT ahead
            for _ in range(steps):
              if kind == "fed":
                batch = host_to_global(fed(next_step), sharding)
                next_step += 1
              else:
                batch = synthetic
              state, m = step(state, batch, key, None)
              in_flight.dispatched(m)
            jax.block_until_ready(m)
            seconds[kind].append(time.perf_counter() - t0)
      rates[w] = tuple(steps * config.batch_size / float(np.median(seconds[k])) for k in ("synthetic", "fed"))
    finally:
      batches.close()
  return rates


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="64,256")
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=3, help="alternating synthetic / fed rounds per worker count")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--data_dir", default=None, help="a folder of images (default: JPEGs written to a temp dir)")
  args = parser.parse_args()
  host_memory_as_main()
  sizes, workers = [int(s) for s in args.sizes.split(",")], [int(w) for w in args.workers.split(",")]
  pipeline_rows, step_rows = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for size in sizes:
      data_dir = args.data_dir or write_jpegs(os.path.join(tmp, str(size)), args.images, size * 3 // 2)
      for w in workers:
        rate = pipeline_rate(folder_config(data_dir, size, w, args.batch), args.steps * args.rounds)
        pipeline_rows.append(dict(image_size=size, workers=w, batch=args.batch, images_per_s=f"{rate:.0f}"))
      rates = step_rates(folder_config(data_dir, size, 0, args.batch), workers, args.steps, args.rounds)
      for w, (synthetic, real) in rates.items():
        step_rows.append(dict(image_size=size, workers=w, batch=args.batch, synthetic_images_per_s=f"{synthetic:.2f}",
                              folder_images_per_s=f"{real:.2f}", folder_vs_synthetic=f"{real / synthetic:.3f}"))
  print(f"\nbackend {jax.default_backend()}, {jax.device_count()} devices, {os.cpu_count()} CPU cores\n")
  print_table(pipeline_rows)
  print()
  print_table(step_rows)


if __name__ == "__main__":
  main()
