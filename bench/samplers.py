"""Sampler x NFE table on a trained workdir: seconds per image and fd/kid/IS in the offline classifier space.

python bench/samplers.py --config=fashion_mnist --workdir=runs/fashion_mnist [--num_images=500]
The data floor row compares two disjoint real sets of the same size (train subset vs test).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import numpy as np
from common import load_config, make_sampler, print_table, restore_workdir

from diffusion_jax import conditioning as C
from diffusion_jax import diffusion as D
from diffusion_jax import images as image_io
from diffusion_jax.data import load_split
from diffusion_jax.evaluation.offline import OfflineEvaluator
from diffusion_jax.sampling import SampleSettings, sample_images

DEFAULT_RUNS = "ddpm:1000,ddpm:50,ddim:10,ddim:20,ddim:50,dpmpp_2m:10,dpmpp_2m:20,dpmpp_2m:50,euler:20,euler:50,heun:10,heun:25"


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="fashion_mnist")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num_images", type=int, default=500)
  parser.add_argument("--batch", type=int, default=250)
  parser.add_argument("--runs", default=DEFAULT_RUNS, help="sampler:steps[:spacing],...")
  parser.add_argument("--set", action="append", default=[])
  args = parser.parse_args()
  config = load_config(args.config, args.set)
  mesh, parts, decoder, encoder, state = restore_workdir(config, args.workdir)
  # Every class in turn if conditional.
  labels, _, cond, null_cond = C.sampling_inputs(parts.condition, args.num_images, encoder)
  test_images, _ = load_split(config.data.dataset, "test", config.data.data_dir)
  train_images, _ = load_split(config.data.dataset, "train", config.data.data_dir)
  evaluator = OfflineEvaluator(config.data.dataset, test_images)
  floor = evaluator(train_images[np.random.default_rng(0).choice(len(train_images), args.num_images, replace=False)])
  rows = [dict(sampler="real data (floor)", steps="-", nfe="-", s_per_image="-",
               **{k: f"{v:.3f}" for k, v in floor.items()})]
  for spec in args.runs.split(","):
    sampler, steps, *spacing = spec.split(":")
    steps = int(steps)
    settings = SampleSettings.from_config(config.sample)
    settings = dataclasses.replace(settings, sampler=sampler, num_steps=steps, spacing=spacing[0] if spacing else None)
    fn = make_sampler(parts, settings, mesh, decoder)
    batch = args.batch
    sample_images(fn, state.ema_params, jax.random.key(0), batch, batch, cond, null_cond)  # compile
    t0 = time.perf_counter()
    images = sample_images(fn, state.ema_params, jax.random.key(1), args.num_images, batch, cond, null_cond)
    seconds = time.perf_counter() - t0
    metrics = evaluator(images, labels)
    rows.append(dict(sampler=sampler + (f" ({spacing[0]})" if spacing else ""), steps=steps,
                     nfe=D.num_function_evals(sampler, steps), s_per_image=f"{seconds / args.num_images:.4f}",
                     **{k: f"{v:.3f}" for k, v in metrics.items()}))
    image_io.write_png(os.path.join(args.workdir, "samples", f"bench_{sampler}_{steps}.png"),
                       image_io.make_grid(images[:64]))
    print(rows[-1], flush=True)
  print(f"\n{args.num_images} images per row, checkpoint step {int(state.step)}, backend {jax.default_backend()}\n")
  print_table(rows)


if __name__ == "__main__":
  main()
