"""Classifier-free guidance table on a trained conditional workdir: for each class prompt (the training caption
and a paraphrase never seen in training), the share of samples the offline classifier puts in that class, per
guidance scale w (0 = unconditional, 1 = conditional without guidance).

python bench/guidance.py --config=latent --workdir=runs/latent [--scales=0,1,3,5 --per_class=32]
Class-conditional models (model.num_classes > 0) get one row per class label.
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
from diffusion_jax import images as image_io
from diffusion_jax.data import load_split
from diffusion_jax.evaluation.offline import OfflineEvaluator
from diffusion_jax.sampling import SampleSettings, sample_images


def prompt_sets(config) -> dict[str, list[str]]:
  """'caption': each class's first training caption; 'paraphrase': an unseen wording of the class."""
  sets = {"caption": [c[0] for c in C.dataset_captions(config.data.dataset)]}
  if config.data.dataset in C.PARAPHRASES:
    sets["paraphrase"] = list(C.PARAPHRASES[config.data.dataset])
  return sets


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="latent")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--scales", default="0,1,3,5")
  parser.add_argument("--per_class", type=int, default=32)
  parser.add_argument("--batch", type=int, default=160)
  parser.add_argument("--set", action="append", default=[])
  args = parser.parse_args()
  config = load_config(args.config, args.set)
  mesh, parts, decoder, encoder, state = restore_workdir(config, args.workdir)
  kind = parts.condition.kind
  if kind == "none":
    raise SystemExit(f"{args.config} is unconditional: guidance needs model.num_classes > 0 or text.encoder")
  test_images, _ = load_split(config.data.dataset, "test", config.data.data_dir)
  evaluator = OfflineEvaluator(config.data.dataset, test_images)
  num_classes = parts.condition.num_labels
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), args.per_class)
  sets = prompt_sets(config) if kind == "text" else {"class label": [str(k) for k in range(num_classes)]}
  scales = [float(s) for s in args.scales.split(",")]
  share = {}  # (set, scale) -> [K] share of samples classified as the prompted class
  summary = []
  for set_name, prompts in sets.items():
    per_image = np.asarray(prompts)[labels] if kind == "text" else None
    cond, null_cond = C.sample_condition(parts.condition, labels, per_image, encoder)
    for w in scales:
      settings = dataclasses.replace(SampleSettings.from_config(config.sample), guidance_scale=w)
      fn = make_sampler(parts, settings, mesh, decoder)
      t0 = time.perf_counter()
      images = sample_images(fn, state.ema_params, jax.random.key(1), len(labels), args.batch, cond, null_cond)
      seconds = time.perf_counter() - t0
      feats, probs = evaluator.features(images)
      hit = probs.argmax(-1) == labels
      share[set_name, w] = np.asarray([hit[labels == k].mean() for k in range(num_classes)])
      metrics = evaluator.from_features(feats, probs, labels)
      summary.append({"prompts": set_name, "w": w, "class_acc": f"{hit.mean():.3f}",
                      f"fd_{config.data.dataset}": f"{metrics[f'fd_{config.data.dataset}']:.1f}",
                      "s_per_image": f"{seconds / len(labels):.3f}"})
      print(summary[-1], flush=True)
      image_io.write_png(os.path.join(args.workdir, "samples", f"guidance_{set_name.replace(' ', '_')}_w{w:g}.png"),
                         image_io.captioned_grid(images, per_image if per_image is not None else labels.astype(str),
                                                 max_per_row=8))
  rows = []
  for set_name, prompts in sets.items():
    for k, prompt in enumerate(prompts):
      rows.append({"prompt": f"{prompt} ({set_name})",
                   **{f"w={w:g}": f"{share[set_name, w][k]:.2f}" for w in scales}})
    rows.append({"prompt": f"**mean ({set_name})**", **{f"w={w:g}": f"**{share[set_name, w].mean():.3f}**"
                                                          for w in scales}})
  print(f"\n{args.per_class} samples per prompt, {config.sample.sampler} {config.sample.num_steps or 'T'} steps, "
        f"checkpoint step {int(state.step)}, backend {jax.default_backend()}\n")
  print_table(rows)
  print()
  print_table(summary)


if __name__ == "__main__":
  main()
