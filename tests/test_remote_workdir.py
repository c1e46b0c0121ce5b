"""A remote workdir (gs://) end to end, offline.

Every read and write of a run goes through a layer that knows remote schemes: etils.epath (config.json, samples,
edits, eval metrics, previews, Orbax's files and folders), TensorStore under Orbax (the arrays), TensorFlow's summary
writer (TensorBoard). Here a fake bucket `gs://diffusion-jax-fake/` is backed by a local folder at each of those
three seams, and a whole run (train, resume, sample) uses it as its workdir. Any plain `open` / `os.path` on the
workdir would miss the mapping: it fails, or writes under a local folder named `gs:` (asserted absent)."""

import contextlib
import importlib.util
import json
import os
from unittest import mock

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath

from diffusion_jax import train
from helpers import tiny_config, write_fake_fashion_mnist

BUCKET = "gs://diffusion-jax-fake/"


class BucketBackend(epath_backend._OsPathBackend):  # pylint: disable=protected-access
  """etils.epath's local-filesystem backend with gs://diffusion-jax-fake/<path> mapped to <root>/<path>."""

  def __init__(self, root: str):
    self.root, self.calls = root, 0

  def local(self, path) -> str:
    text = os.fspath(path)
    if not text.startswith("gs://"):
      return text  # local paths (the compilation cache, the data) pass through
    assert text.startswith(BUCKET), f"a remote path outside the fake bucket: {text}"
    self.calls += 1
    return os.path.join(self.root, text[len(BUCKET):])

  def remote(self, path: str) -> str:
    return BUCKET + os.path.relpath(path, self.root) if path.startswith(self.root + os.sep) else path

  def open(self, path, mode):
    return super().open(self.local(path), mode)

  def exists(self, path):
    return super().exists(self.local(path))

  def isdir(self, path):
    return super().isdir(self.local(path))

  def listdir(self, path):
    return super().listdir(self.local(path))

  def glob(self, path):
    return [self.remote(p) for p in super().glob(self.local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for directory, dirs, files in super().walk(self.local(top), top_down=top_down, on_error=on_error):
      yield self.remote(directory), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return super().makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return super().mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    return super().rmtree(self.local(path))

  def remove(self, path):
    return super().remove(self.local(path))

  def rename(self, path, dst):
    return super().rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    return super().replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite):
    return super().copy(self.local(path), self.local(dst), overwrite=overwrite)

  def stat(self, path):
    return super().stat(self.local(path))


@contextlib.contextmanager
def fake_bucket(root: str, packages_installed: bool = True):
  """gs://diffusion-jax-fake/<path> is <root>/<path> for epath, Orbax's TensorStore and the TensorBoard writer; the
  bucket is a flat one (no hierarchical namespace: what Orbax asks google-cloud-storage); yields how often each seam
  was used."""
  from clu import metric_writers
  from orbax.checkpoint._src.path import gcs_utils

  from diffusion_jax import config_check
  backend, find_spec = BucketBackend(root), importlib.util.find_spec
  calls = {"tensorstore": 0, "writer": 0}

  def kvstore(path: str) -> dict:
    calls["tensorstore"] += 1
    return {"driver": "file", "path": backend.local(path)}

  create_writer = metric_writers.create_default_writer

  def writer(logdir, **kwargs):
    calls["writer"] += 1
    return create_writer(backend.local(logdir), **kwargs)

  with mock.patch.object(gpath._GPath, "_backend", property(lambda self: backend)), \
       mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore), \
       mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False), \
       mock.patch.dict(config_check.REMOTE_WORKDIR_PACKAGES, {} if packages_installed else {
           "gs": ("diffusion_jax_no_such_module", "google-cloud-storage", "diffusion_jax[gcs]")}), \
       mock.patch.object(importlib.util, "find_spec", lambda name, *a: object() if packages_installed
                         and name == "google.cloud.storage" else find_spec(name, *a)), \
       mock.patch.object(metric_writers, "create_default_writer", writer):
    yield calls
    calls["epath"] = backend.calls


def test_a_gs_workdir_trains_resumes_and_samples_through_the_remote_layers(tmp_path, monkeypatch):
  data_dir = write_fake_fashion_mnist(str(tmp_path))
  bucket = tmp_path / "bucket"
  bucket.mkdir()
  work = tmp_path / "cwd"
  work.mkdir()
  monkeypatch.chdir(work)  # a relative `gs:` folder would appear here
  config = tiny_config(data_dir)
  workdir = BUCKET + "runs/tiny"
  with fake_bucket(str(bucket)) as calls:
    assert isinstance(epath.Path(workdir), gpath.PosixGPath)  # the remote path class, not a local one
    train.train_and_evaluate(config, workdir)
    config.num_train_steps = 6  # resumes from gs://.../checkpoints/4
    train.train_and_evaluate(config, workdir)
    config.mode, config.sample.num_images = "sample", 3
    train.train_and_evaluate(config, workdir)
  assert calls["epath"] > 0 and calls["tensorstore"] > 0 and calls["writer"] == 3
  run = bucket / "runs" / "tiny"
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4", "6"]
  assert json.loads((run / "config.json").read_text())["num_train_steps"] == 6
  assert np.load(run / "samples" / "samples.npz")["images"].shape == (3, 16, 16, 1)
  assert (run / "samples" / "preview_0000004.png").exists() and (run / "samples" / "samples.png").exists()
  assert any(name.startswith("metrics_") for name in os.listdir(run / "eval"))
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(run))
  assert os.listdir(work) == []  # nothing written locally beside the bucket


def test_a_gs_workdir_without_google_cloud_storage_is_one_line_before_anything_is_written(tmp_path):
  config = tiny_config(write_fake_fashion_mnist(str(tmp_path)))
  (tmp_path / "bucket").mkdir()
  with fake_bucket(str(tmp_path / "bucket"), packages_installed=False):
    with pytest.raises(ValueError, match=r"--workdir='gs://diffusion-jax-fake/run' needs google-cloud-storage for "
                                         r"its checkpoints .*: pip install google-cloud-storage \(or pip install "
                                         r"'diffusion_jax\[gcs\]'\)"):
      train.train_and_evaluate(config, BUCKET + "run")
  assert os.listdir(tmp_path / "bucket") == []


def test_fid_reference_statistics_are_read_from_a_gs_path(tmp_path):
  """The FID statistics a run caches under DIR/eval are read back through epath (a gs:// workdir's too)."""
  from diffusion_jax.evaluation.evaluate import load_reference_stats
  mu, sigma = np.arange(3.0), np.eye(3) * 2
  with fake_bucket(str(tmp_path / "bucket")):
    path = epath.Path(BUCKET + "run/eval/fid_stats_fashion_mnist_test.npz")
    path.parent.mkdir(parents=True)
    with path.open("wb") as f:
      np.savez(f, mu=mu, sigma=sigma)
    got_mu, got_sigma = load_reference_stats(path)
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)
  assert not os.path.exists("gs:")


def test_edit_inputs_are_read_from_gs_paths(tmp_path, monkeypatch):
  """mode=edit's inputs (a base run's samples .npz, image files, a mask PNG) under gs:// are read through epath, as
  a cascade reading another run's samples from a bucket does, and equal the same files read locally."""
  from PIL import Image

  from diffusion_jax.editing.inputs import load_edit_images
  from diffusion_jax.editing.masks import load_mask
  monkeypatch.chdir(tmp_path)  # a relative `gs:` folder would appear here
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
  mask = np.zeros((16, 16), np.uint8)
  mask[4:9, 2:7] = 255
  bucket = tmp_path / "bucket"
  (bucket / "base").mkdir(parents=True)
  np.savez(bucket / "base" / "samples.npz", images=images, labels=np.arange(3, dtype=np.int32))
  Image.fromarray(images[1, ..., 0]).save(bucket / "base" / "one.png")
  Image.fromarray(mask).save(bucket / "mask.png")
  config = tiny_config(str(tmp_path))
  with fake_bucket(str(bucket)) as calls:
    config.edit.images = BUCKET + "base/samples.npz:0,2"
    got, labels = load_edit_images(config, 16)
    config.edit.images = BUCKET + "base/one.png"
    one, _ = load_edit_images(config, 16)
    got_mask = load_mask(BUCKET + "mask.png", 16, 16)
    config.edit.images = BUCKET + "base/none.npz"
    with pytest.raises(ValueError, match="the .npz file does not exist"):
      load_edit_images(config, 16)
  assert calls["epath"] > 0
  np.testing.assert_array_equal(got, images[[0, 2]])
  np.testing.assert_array_equal(labels, [0, 2])
  np.testing.assert_array_equal(one[0], images[1])
  np.testing.assert_array_equal(got_mask[..., 0], mask == 255)
  assert not os.path.exists("gs:")
