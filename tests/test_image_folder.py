"""Training on your own data: an image folder (PNG and JPEG, mixed sizes, grayscale and RGB, class sub-folders,
metadata.jsonl captions) and tfds datasets streamed with grain; exact batches on resume; disjoint rows per
process; each bad input one line naming the file or value."""

import json
import logging
import os

import jax
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import train
from diffusion_jax.config import load_config
from diffusion_jax.config_check import check_config
from diffusion_jax.data.image_folder import ImageFolderError, ImageFolderSource, fit_image, scan_image_folder
from diffusion_jax.data.streaming import StreamingBatches

CLASSES = ("bags", "shoes")


def make_folder(root, per_class=6):
  """Class c's images: a bright square in a class-dependent corner on noise; sizes 12..40 px, half grayscale,
  PNG and JPEG; a caption per image naming its class."""
  rng = np.random.default_rng(0)
  lines = []
  for c, name in enumerate(CLASSES):
    os.makedirs(root / name, exist_ok=True)
    for i in range(per_class):
      w, h = int(rng.integers(12, 41)), int(rng.integers(12, 41))
      pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
      if c == 0:
        pixels[: h // 2, : w // 2] = 255
      else:
        pixels[h // 2:, w // 2:] = 255
      image = Image.fromarray(pixels if i % 2 else pixels[..., 0])
      file_name = f"{name}/{i}.{'png' if i % 3 else 'jpg'}"
      image.save(root / file_name)
      lines.append({"file_name": file_name, "text": f"a photo of {name} number {i}"})
  (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = make_folder(tmp_path_factory.mktemp("images"))
  (root / "bags" / "broken.png").write_bytes(b"not an image")
  return root


def test_scan_finds_classes_captions_and_skips_what_does_not_open(folder, caplog):
  with caplog.at_level(logging.WARNING):
    index = scan_image_folder(str(folder), 32)
  assert index.class_names == CLASSES and len(index.files) == 12
  assert list(index.labels) == [0] * 6 + [1] * 6
  assert index.captions[index.files.index(os.path.join("shoes", "4.png"))] == "a photo of shoes number 4"
  assert index.skipped == (os.path.join("bags", "broken.png"),)
  assert index.small == sum(min(Image.open(folder / f).size) < 32 for f in index.files) > 0
  assert any("skipped 1 file(s)" in r.getMessage() and "broken.png" in r.getMessage() for r in caplog.records)
  assert any("are upscaled" in r.getMessage() for r in caplog.records)


def test_fit_image_resizes_the_shorter_side_and_crops_the_centre():
  pixels = np.zeros((20, 40), np.uint8)
  pixels[:, 10:30] = 255  # the centre 20 columns are white: after the crop the image is all white
  out = fit_image(pixels, 10, 3)
  assert out.shape == (10, 10, 3) and out.dtype == np.uint8
  assert out[:, 1:-1].min() >= 250 and out.min() > 200  # off-centre, black columns would show (bicubic edges)
  gray = fit_image(np.full((7, 9, 3), (255, 0, 0), np.uint8), 14, 1)  # upscaled, luminance of pure red
  assert gray.shape == (14, 14, 1) and abs(int(gray[7, 7, 0]) - 76) <= 1


def _source(folder, size=16, channels=3):
  return ImageFolderSource(scan_image_folder(str(folder), size), size, channels)


def test_streamed_batches_are_a_function_of_the_step(folder):
  source = _source(folder)
  kwargs = dict(global_batch=4, seed=3, random_flip=True)
  run = StreamingBatches(source, **kwargs)
  uninterrupted = [run.batch(s) for s in range(7)]
  resumed = StreamingBatches(source, **kwargs)  # a new process resuming at step 4
  for s in range(4, 7):
    got = resumed.batch(s)
    np.testing.assert_array_equal(got["image"], uninterrupted[s]["image"])
    assert list(got["caption"]) == list(uninterrupted[s]["caption"])
  with_workers = StreamingBatches(source, num_workers=1, **kwargs)
  try:
    for s in (5, 6):
      np.testing.assert_array_equal(with_workers.batch(s)["image"], uninterrupted[s]["image"])
  finally:
    with_workers.close()
  b = uninterrupted[0]
  assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
  assert -1 <= b["image"].min() and b["image"].max() <= 1 and b["label"].dtype == np.int32
  # Three epochs of 12 images: each epoch sees every image once, in a new order.
  captions = [c for s in range(9) for c in run.batch(s)["caption"]]
  epochs = [captions[12 * e:12 * (e + 1)] for e in range(3)]
  assert all(sorted(e) == sorted(source.index.captions) for e in epochs) and epochs[0] != epochs[1]


def test_two_processes_read_disjoint_rows_that_make_the_global_batch(folder):
  source = _source(folder)
  one = StreamingBatches(source, global_batch=6, seed=0)
  two = [StreamingBatches(source, global_batch=6, seed=0, process_index=p, process_count=2) for p in (0, 1)]
  for step in (0, 1, 5):
    parts = [t.batch(step) for t in two]
    assert not set(parts[0]["caption"]) & set(parts[1]["caption"])
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), one.batch(step)["image"])


def test_bad_folders_are_one_line_naming_the_file(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ImageFolderError, match=r"data_dir='.*empty' holds no .png/.jpg/.jpeg files"):
    scan_image_folder(str(tmp_path / "empty"), 16)
  root = make_folder(tmp_path / "missing", per_class=1)
  with open(root / "metadata.jsonl", "a") as f:
    f.write(json.dumps({"file_name": "bags/gone.png", "text": "x"}) + "\n")
  with pytest.raises(ImageFolderError, match=r"metadata.jsonl line 3 names file_name='bags/gone.png', which is not"):
    scan_image_folder(str(root), 16)
  (root / "metadata.jsonl").write_text("{not json\n")
  with pytest.raises(ImageFolderError, match=r"metadata.jsonl line 1 is invalid: expected a JSON object"):
    scan_image_folder(str(root), 16)
  (root / "metadata.jsonl").unlink()
  data = (root / "bags" / "0.jpg").read_bytes()
  (root / "bags" / "0.jpg").write_bytes(data[: len(data) - 40])  # the header opens, the pixels do not decode
  source = _source(root)
  with pytest.raises(ImageFolderError, match=r"image file .*bags/0.jpg does not decode .*remove or replace it"):
    source[source.index.files.index(os.path.join("bags", "0.jpg"))]


def _folder_config(folder, variant, **overrides):
  config = load_config(f"image_folder:{variant}", [f"data.data_dir={folder}", "data.image_size=16",
                                                   "data.num_workers=1", "num_train_steps=3", "batch_size=8",
                                                   "log_every_steps=1", "checkpoint_every_steps=3",
                                                   "preview_every_steps=100", "model.ch=8", "model.ch_mult=(1,2)",
                                                   "model.attn_resolutions=(8,)", "diffusion.num_timesteps=50",
                                                   "sample.num_steps=5", "sample.num_images=4", "sample.batch_size=8",
                                                   "sample.preview_images=8", "sample.preview_steps=5",
                                                   "eval.after_training=False",
                                                   *(f"{k}={v}" for k, v in overrides.items())])
  check_config(config)
  return config


def test_class_conditional_training_on_a_folder(folder, tmp_path):
  config = _folder_config(folder, "class", **{"model.num_classes": 2, "sample.class_labels": "1"})
  train.train_and_evaluate(config, str(tmp_path / "run"))
  samples = np.load(tmp_path / "run" / "samples" / "samples.npz")
  assert samples["images"].shape == (4, 16, 16, 3) and list(samples["labels"]) == [1, 1, 1, 1]
  wrong = config.copy_and_resolve_references()
  with wrong.unlocked():
    wrong.model.num_classes = 3
  with pytest.raises(ValueError, match=r"config.model.num_classes=3 is invalid: the image folder .* has 2 class"):
    check_config(wrong)


def test_text_conditional_training_on_per_image_captions_samples_from_a_prompt(folder, tmp_path):
  config = _folder_config(folder, "text", **{"sample.prompt": "a photo of shoes number 9", "model.head_channels": 8})
  from diffusion_jax import build
  spec = build.condition_spec(config)
  assert spec.kind == "text" and spec.per_image_captions and "a photo of bags number 0" in sum(spec.captions, ())
  train.train_and_evaluate(config, str(tmp_path / "run"))
  samples = np.load(tmp_path / "run" / "samples" / "samples.npz")
  assert samples["images"].shape == (4, 16, 16, 3)
  assert list(samples["prompts"]) == ["a photo of shoes number 9"] * 4


def test_a_resumed_folder_run_trains_on_the_uninterrupted_batches(folder, tmp_path):
  config = _folder_config(folder, "uncond", **{"checkpoint_every_steps": 2, "num_train_steps": 4})
  train.train_and_evaluate(config, str(tmp_path / "whole"))
  with config.unlocked():
    config.num_train_steps = 2
  train.train_and_evaluate(config, str(tmp_path / "parts"))
  with config.unlocked():
    config.num_train_steps = 4
  train.train_and_evaluate(config, str(tmp_path / "parts"))  # resumes at 2
  from diffusion_jax import checkpoint
  leaves = [jax.tree.leaves(checkpoint.make_manager(str(tmp_path / run)).restore(4)) for run in ("whole", "parts")]
  for a, b in zip(*leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_tfds_dataset_streams_record_by_record():
  import tensorflow_datasets as tfds
  from diffusion_jax.data.tfds_source import TfdsSource, record_caption
  with tfds.testing.mock_data(num_examples=20):
    source = TfdsSource("cifar10", "train", None, 16, 1)
    batches = StreamingBatches(source, global_batch=4, seed=0)
    first = batches.batch(0)
    assert first["image"].shape == (4, 16, 16, 1) and first["label"].shape == (4,)
    np.testing.assert_array_equal(StreamingBatches(source, global_batch=4, seed=0).batch(3)["image"],
                                  [batches.batch(s) for s in range(4)][3]["image"])
    coco = tfds.data_source("coco_captions", split="train")
    assert record_caption(coco[0]) == str(coco[0]["captions"]["text"][0])


def test_a_tfds_dataset_that_is_not_prepared_is_one_line(tmp_path):
  from diffusion_jax.data.tfds_source import TfdsNotAvailableError, open_tfds_source
  with pytest.raises(TfdsNotAvailableError, match=r"tfds dataset 'oxford_flowers102' split 'train' is not prepared "
                                                  r"in config.data.data_dir=.* and could not be downloaded .*tfds build "
                                                  r"oxford_flowers102 --file_format=array_record"):
    open_tfds_source("oxford_flowers102", "train", str(tmp_path))


def test_sixteen_bit_grayscale_pngs_keep_their_tones(tmp_path):
  from diffusion_jax.data.image_folder import load_image
  ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535 in steps
  Image.fromarray(ramp).save(tmp_path / "deep.png")
  with Image.open(tmp_path / "deep.png") as image:
    assert image.mode.startswith("I")  # Pillow reads it as a 16-bit (or 32-bit int) image
  loaded = load_image(str(tmp_path / "deep.png"), 16, 1)
  np.testing.assert_array_equal(loaded[..., 0], (ramp // 257).astype(np.uint8))  # not clipped to white
  assert load_image(str(tmp_path / "deep.png"), 16, 3).shape == (16, 16, 3)
