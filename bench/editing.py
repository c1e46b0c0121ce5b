"""Editing quality on Fashion-MNIST test images (README table), through the library's own edit path
(editing.run_edit), with the offline classifier:

- inpaint (centre box) and outpaint (edit.extend on every side): replacement vs RePaint vs the trained
  inpainting model. Error in the known region (0 by construction), agreement of the edited images' class with
  the input's, Frechet distance of the edited images to the test split (the classifier's features; the inputs'
  own FD is the floor), mean absolute change inside the hole, and a seam score (gradients across the border over
  gradients elsewhere: 1 = no visible seam).
- upscale: PSNR and SSIM against the originals, bilinear and bicubic vs the super-resolution model(s), and the
  classifier's accuracy on the upscaled images.
- img2img: each image pushed toward another class (label + 1 mod 10) as strength goes 0.2 -> 1.0: the share the
  classifier puts in that class and the distance to the input (and from the DDIM inversion at one strength).

python bench/editing.py --base=runs/fm_class --inpainting=runs/fm_inpaint --sr=runs/sr7,runs/sr14 [--n=128]
(base: configs/fashion_mnist.py with model.num_classes=10; inpainting: configs/inpainting.py with
model.num_classes=10; sr: configs/super_resolution.py:7 and :14). Any of the three may be left out.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np
from common import load_config, print_table, restore_workdir

from diffusion_jax.data import load_split
from diffusion_jax.editing import run_edit
from diffusion_jax.editing.tasks import img2img_grid
from diffusion_jax.editing.masks import seam_score
from diffusion_jax.evaluation.metrics import feature_statistics, frechet_distance, psnr, ssim
from diffusion_jax.evaluation.offline import OfflineEvaluator


def _config(workdir: str, overrides: list[str]):
  """The workdir's trained config (its config.json's values for the model) as a config file plus overrides."""
  import json
  trained = json.loads(open(os.path.join(workdir, "config.json")).read())
  name = ("super_resolution:" + str(trained["image_condition"]["low_res_size"]) if trained.get("image_condition")
          and trained["image_condition"]["kind"] == "low_res" else
          "inpainting" if trained.get("image_condition") else "fashion_mnist")
  keys = [f"model.num_classes={trained['model']['num_classes']}"]
  return load_config(name, keys + overrides)


def _edit(workdir: str, overrides: list[str], restored=None):
  config = _config(workdir, ["mode=edit", *overrides])
  mesh, parts, decoder, encoder, state = restored or restore_workdir(config, workdir)
  with tempfile.TemporaryDirectory() as out:
    result = run_edit(config, out, parts=parts, mesh=mesh, params=state.ema_params, key=jax.random.key(0),
                      decoder=decoder, text_encoder=encoder)
  return result, (mesh, parts, decoder, encoder, state)


class Scorer:
  def __init__(self, test_images: np.ndarray):
    self.evaluator = OfflineEvaluator("fashion_mnist", test_images)
    self.ref = self.evaluator.ref_stats

  def classify(self, images):
    feats, probs = self.evaluator.features(images)
    return feats, probs.argmax(-1)

  def fd(self, images) -> float:
    return frechet_distance(*feature_statistics(self.classify(images)[0]), *self.ref)


def fill_rows(scorer, test_labels, n, base, inpainting, steps):
  rows = []
  for task, extra in (("inpaint", []), ("outpaint", ["edit.extend=4", "edit.side=all"])):
    methods = []
    if base:
      methods += [("replacement", base, ["edit.resample_steps=1"]),
                  ("RePaint r=4 j=10", base, ["edit.resample_steps=4", "edit.jump=10"])]
    if inpainting:
      methods += [("inpainting model", inpainting, [])]
    for name, workdir, settings in methods:
      result, _ = _edit(workdir, [f"edit.task={task}", f"edit.images=test:0-{n - 1}",
                                           f"sample.num_steps={steps}", "sample.sampler=ddpm", *extra, *settings])
      masks = result.masks[..., 0] > 0
      out = result.outputs
      if task == "outpaint":  # the whole 36x36 canvas, resized to the classifier's 28x28
        known_err = np.abs(out[:, 4:32, 4:32].astype(int) - result.inputs).max()
        view = jax.image.resize(out.astype(np.float32), (len(out), 28, 28, 1), "linear", antialias=True)
        view = np.clip(np.round(np.asarray(view)), 0, 255).astype(np.uint8)
      else:
        known_err = np.abs(out.astype(int) - result.inputs)[~masks].max()
        view = out
      _, predicted = scorer.classify(view)
      hole_change = (np.abs(out.astype(float) - (result.inputs if task == "inpaint" else 128.0))[masks].mean()
                     / 255 if task == "inpaint" else float("nan"))
      if name.startswith("RePaint"):
        from diffusion_jax.diffusion.inpaint import repaint_path
        nfe = int(np.sum(np.diff(repaint_path(steps, 10, 4)) < 0))  # reverse steps call the network
      else:
        nfe = steps
      rows.append({"task": task, "method": name, "known-region max error": int(known_err),
                   "class agreement": f"{np.mean(predicted == test_labels[:n]):.3f}",
                   "FD (classifier features)": f"{scorer.fd(view):.2f}",
                   "mean change in hole": "-" if np.isnan(hole_change) else f"{hole_change:.3f}",
                   "seam score": f"{seam_score(out.astype(float), result.masks[0] / 255.0):.2f}",
                   "network evaluations": nfe})
  return rows


def upscale_rows(scorer, test_images, test_labels, n, workdirs):
  rows = []
  originals = test_images[:n]
  for workdir in workdirs:
    sr_steps = _config(workdir, []).sample.num_steps
    result, _ = _edit(workdir, ["edit.task=upscale", f"edit.images=test:0-{n - 1}",
                                                f"edit.downscale={28 // _config(workdir, []).image_condition.low_res_size}"])
    low = result.inputs.astype(np.float32)
    size = low.shape[1]
    for name, images in (("bilinear", jax.image.resize(low, (n, 28, 28, 1), "linear")),
                         ("bicubic", jax.image.resize(low, (n, 28, 28, 1), "cubic")),
                         ("super-resolution model", result.outputs)):
      images = np.clip(np.round(np.asarray(images, np.float32)), 0, 255).astype(np.uint8)
      _, predicted = scorer.classify(images)
      rows.append({"input": f"{size}x{size} -> 28x28", "method": name,
                   "PSNR dB": f"{np.mean(psnr(images, originals)):.2f}",
                   "SSIM": f"{np.mean(ssim(images, originals)):.3f}",
                   "classifier accuracy": f"{np.mean(predicted == test_labels[:n]):.3f}",
                   "network evaluations": sr_steps if name.startswith("super") else "-"})
  rows.append({"input": "28x28 originals", "method": "-", "PSNR dB": "inf", "SSIM": "1.000",
               "classifier accuracy": f"{np.mean(scorer.classify(originals)[1] == test_labels[:n]):.3f}",
               "network evaluations": "-"})
  return rows


def img2img_rows(scorer, test_labels, n, base, steps, guidance):
  rows = []
  target = (test_labels[:n] + 1) % 10
  labels = ",".join(map(str, target))
  restored = None
  for strength, invert in ((0.2, False), (0.4, False), (0.6, False), (0.8, False), (1.0, False), (0.6, True)):
    result, restored = _edit(base, ["edit.task=img2img", f"edit.images=test:0-{n - 1}",
                                             f"edit.strength={strength}", f"edit.invert={invert}",
                                             f"sample.class_labels={labels}", "sample.sampler=ddim",
                                             f"sample.guidance_scale={guidance}",
                                             f"sample.num_steps={steps}"], restored)
    _, predicted = scorer.classify(result.outputs)
    rows.append({"strength": strength, "start": "DDIM inversion" if invert else "noise",
                 "target class share": f"{np.mean(predicted == target):.3f}",
                 "source class share": f"{np.mean(predicted == test_labels[:n]):.3f}",
                 "mean abs distance to input": f"{np.abs(result.outputs.astype(float) - result.inputs).mean() / 255:.3f}",
                 "network evaluations": (2 if invert else 1) * len(img2img_grid(np.arange(steps), strength, "ddim"))})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--base", default="")
  parser.add_argument("--inpainting", default="")
  parser.add_argument("--sr", default="")
  parser.add_argument("--n", type=int, default=128)
  parser.add_argument("--steps", type=int, default=100, help="sampling steps of the fill and img2img rows")
  parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance of the img2img rows")
  args = parser.parse_args()
  test_images, test_labels = load_split("fashion_mnist", "test")
  scorer = Scorer(test_images)
  print(f"fashion_mnist test images 0..{args.n - 1}; FD of the inputs themselves: {scorer.fd(test_images[:args.n]):.2f}")
  if args.base or args.inpainting:
    print("\n## Inpainting (centre 14x14 box) and outpainting (4 px on every side: 28x28 -> 36x36)")
    print_table(fill_rows(scorer, test_labels, args.n, args.base, args.inpainting, args.steps))
  if args.sr:
    print("\n## Super-resolution")
    print_table(upscale_rows(scorer, test_images, test_labels, args.n, args.sr.split(",")))
  if args.base:
    print(f"\n## img2img (SDEdit) toward class label+1, guidance w={args.guidance}")
    print_table(img2img_rows(scorer, test_labels, args.n, args.base, args.steps, args.guidance))


if __name__ == "__main__":
  main()
