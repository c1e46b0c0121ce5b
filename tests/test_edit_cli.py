"""mode=edit end to end through `python -m diffusion_jax.main`, on tiny checkpoints trained here: inpaint,
outpaint, img2img (noise and DDIM inversion) on a pixel and a latent model, an inpainting model, and upscaling
with a super-resolution model (also of another run's samples, a cascade). Commands run two at a time."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import helpers
from helpers import ROOT

CONFIG = '''
import sys
sys.path.insert(0, {tests!r})
import ml_collections
import helpers


def get_config(variant="pixel"):
  data = {data!r}
  config = helpers.tiny_latent_config(data) if variant == "latent" else helpers.tiny_config(data)
  config.eval.fid = False
  config.eval.after_training = False
  config.sample.num_images = 4
  config.sample.num_steps = 10
  config.num_train_steps = config.checkpoint_every_steps = 2
  config.preview_every_steps = 1000
  if config.autoencoder is not None:
    config.autoencoder.num_train_steps = 2
  if variant == "class":
    config.model.num_classes = 10
  if variant == "sr":
    config.image_condition = ml_collections.ConfigDict(dict(kind="low_res", low_res_size=8))
  if variant == "masked":
    config.image_condition = ml_collections.ConfigDict(dict(kind="masked", low_res_size=0))
  return config
'''


# Trained on 4 host devices (the class model FSDP-sharded over them), edited and sampled on 1: checkpoints
# restore onto another device count through the CLI.
TRAIN_DEVICES = {"DJ_CPU_DEVICES": "4"}
EDIT_DEVICES = {"DJ_CPU_DEVICES": "1"}


def _main(config_file, variant, workdir, *overrides, devices=EDIT_DEVICES):
  command = [sys.executable, "-m", "diffusion_jax.main", f"--config={config_file}:{variant}", f"--workdir={workdir}",
             *overrides]
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **devices}
  return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Tiny trained workdirs (4 steps each): class-conditional pixel, latent, super-resolution, inpainting."""
  tmp = tmp_path_factory.mktemp("edit")
  data = helpers.write_fake_fashion_mnist(str(tmp))
  config_file = tmp / "edit_config.py"
  config_file.write_text(CONFIG.format(tests=os.path.dirname(__file__), data=data))
  variants = ("class", "latent", "sr", "masked")
  with ThreadPoolExecutor(2) as pool:
    fsdp = lambda v: ["--config.mesh.fsdp=4"] if v == "class" else []
    results = list(pool.map(lambda v: _main(config_file, v, tmp / v, *fsdp(v), devices=TRAIN_DEVICES), variants))
  for variant, out in zip(variants, results):
    assert out.returncode == 0, f"{variant}: {out.stderr[-3000:]}"
  return tmp, config_file


def _edit(runs, variant, *overrides):
  tmp, config_file = runs
  return _main(config_file, variant, tmp / variant, "--config.mode=edit", *overrides)


def _edits(runs, cases):
  with ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda case: _edit(runs, case[0], *case[1]), cases))
  for case, out in zip(cases, results):
    assert out.returncode == 0, f"{case}: {out.stderr[-3000:]}"


def _load(runs, variant, task):
  path = runs[0] / variant / "edits"
  assert (path / f"{task}.png").is_file()
  with np.load(path / f"{task}.npz") as f:
    return {k: f[k] for k in f.files}


def test_inpaint_outpaint_img2img_on_pixel_and_latent_models(runs):
  tmp = runs[0]
  mask = np.zeros((16, 16), np.uint8)
  mask[4:9, 2:14] = 255
  Image.fromarray(mask).save(tmp / "mask.png")
  Image.fromarray(np.full((20, 30), 200, np.uint8)).save(tmp / "photo.png")  # resized and cropped to 16x16
  _edits(runs, [
      ("class", ["--config.edit.task=inpaint", "--config.edit.images=test:0-3", "--config.edit.box=2,3,10,12",
                 "--config.edit.resample_steps=2", "--config.edit.jump=3"]),
      ("class", ["--config.edit.task=outpaint", "--config.edit.images=test:1,5", "--config.edit.extend=4",
                 "--config.edit.side=right"]),
      ("class", ["--config.edit.task=img2img", "--config.edit.images=test:0-3", "--config.edit.strength=0.02",
                 "--config.sample.class_labels=3", "--config.sample.sampler=ddim", "--config.sample.num_steps=50"]),
      ("latent", ["--config.edit.task=inpaint", f"--config.edit.mask={tmp}/mask.png", "--config.edit.images=test:0-2"]),
      ("latent", ["--config.edit.task=outpaint", "--config.edit.extend=2", "--config.edit.side=all",
                  f"--config.edit.images={tmp}/photo.png"]),
      ("latent", ["--config.edit.task=img2img", "--config.edit.invert=True", "--config.edit.strength=1.0",
                  "--config.edit.images=test:0-1"]),
  ])
  # mode=eval (samples, then metrics) on 1 device from the checkpoint trained FSDP-sharded over 4.
  config_file = runs[1]
  out = _main(config_file, "class", tmp / "class", "--config.mode=eval", "--config.sample.num_images=3")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "over 1 devices" in out.stderr
  assert np.load(tmp / "class" / "samples" / "samples.npz")["images"].shape == (3, 16, 16, 1)
  metrics = json.loads((tmp / "class" / "eval" / "metrics_2.json").read_text())
  assert metrics["num_samples"] == 3.0
  # Pixel inpainting: the box regenerated, everything else the input exactly; labels = each image's class.
  r = _load(runs, "class", "inpaint")
  assert r["inputs"].shape == r["outputs"].shape == (4, 16, 16, 1) and r["masks"].shape == (4, 16, 16, 1)
  hole = r["masks"][..., 0] == 255
  assert hole[:, 2:10, 3:12].all() and hole.sum() == 4 * 8 * 9
  np.testing.assert_array_equal(r["outputs"][~hole], r["inputs"][~hole])
  assert (r["outputs"][hole] != r["inputs"][hole]).mean() > 0.5
  assert r["labels"].shape == (4,)
  # Outpainting on the right: a 16x20 canvas, the input in its left 16 columns.
  r = _load(runs, "class", "outpaint")
  assert r["inputs"].shape == (2, 16, 16, 1) and r["outputs"].shape == (2, 16, 20, 1)
  np.testing.assert_array_equal(r["outputs"][:, :, :16], r["inputs"])
  assert (r["masks"][0, :, 16:] == 255).all() and (r["masks"][0, :, :16] == 0).all()
  # img2img at strength 0.02 (one DDIM step from t = 0 of 50): nearly the input, with the label asked for.
  r = _load(runs, "class", "img2img")
  assert "masks" not in r and (r["labels"] == 3).all()
  assert np.abs(r["outputs"].astype(float) - r["inputs"]).mean() < 8.0
  # Latent: the known pixels are the input's after decoding (composited), the mask file's hole regenerated.
  r = _load(runs, "latent", "inpaint")
  keep = r["masks"][..., 0] == 0
  np.testing.assert_array_equal(keep[0], mask == 0)
  np.testing.assert_array_equal(r["outputs"][keep], r["inputs"][keep])
  r = _load(runs, "latent", "outpaint")
  assert r["inputs"].shape == (1, 16, 16, 1) and r["outputs"].shape == (1, 20, 20, 1)
  np.testing.assert_array_equal(r["outputs"][:, 2:18, 2:18], r["inputs"])
  assert (r["inputs"] == 200).all()  # the photo, resized
  assert _load(runs, "latent", "img2img")["outputs"].shape == (2, 16, 16, 1)


def test_upscale_and_a_cascade_and_an_inpainting_model(runs):
  tmp = runs[0]
  # A cascade in one command (launch/cascade.sh): the class model samples 3 images, the super-resolution model
  # upscales them (brought to its 8x8 inputs); meanwhile the inpainting model inpaints.
  config_file = runs[1]
  cascade = [ROOT + "/launch/cascade.sh", f"{config_file}:class", str(tmp / "class"), f"{config_file}:sr",
             str(tmp / "sr"), "--config.sample.num_steps=5"]
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "CASCADE_NUM_IMAGES": "3"}
  with ThreadPoolExecutor(2) as pool:
    cascaded = pool.submit(subprocess.run, ["bash", *cascade], capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=600)
    _edits(runs, [("masked", ["--config.edit.task=inpaint", "--config.edit.images=test:0-1"])])
    out = cascaded.result()
  assert out.returncode == 0, out.stderr[-3000:]
  r = _load(runs, "sr", "upscale")
  assert r["inputs"].shape == (3, 8, 8, 1) and r["outputs"].shape == (3, 16, 16, 1) and "masks" not in r
  with np.load(tmp / "class" / "samples" / "samples.npz") as f:
    assert f["images"].shape == (3, 16, 16, 1)
  r = _load(runs, "masked", "inpaint")
  keep = r["masks"][..., 0] == 0
  assert keep.sum() == 2 * (256 - 64)  # the default box: the centre quarter
  np.testing.assert_array_equal(r["outputs"][keep], r["inputs"][keep])
  # A super-resolution model's own samples (mode=train's final samples) upscale test images.
  with np.load(tmp / "sr" / "samples" / "samples.npz") as f:
    assert f["images"].shape == (4, 16, 16, 1)
