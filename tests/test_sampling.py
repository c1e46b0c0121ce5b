"""diffusion_jax.sampling: settings from the config, the compiled sample function (one trace for every batch),
batching over devices and the files it writes."""

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import diffusion as D
from diffusion_jax import sampling
from diffusion_jax.models import UNet
from diffusion_jax.parallel.mesh import make_mesh
from helpers import TraceCounter, tiny_config


def test_settings_come_from_config_sample_and_preview_takes_its_own_sampler():
  sample = tiny_config("unused").sample
  sample.sampler, sample.num_steps, sample.guidance_scale, sample.eta = "ddim", 20, 3.0, 0.5
  final = sampling.SampleSettings.from_config(sample)
  assert final == sampling.SampleSettings(sampler="ddim", num_steps=20, spacing=None, eta=0.5,
                                          clip_denoised=True, guidance_scale=3.0)
  preview = sampling.SampleSettings.from_config(sample, preview=True)
  assert (preview.sampler, preview.num_steps, preview.guidance_scale) == ("ddpm", 5, 3.0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    final.sampler = "ddpm"


def test_sample_fn_compiles_once_and_batches_are_padded_to_the_devices(monkeypatch):
  counter = TraceCounter(D.sample)
  monkeypatch.setattr(D, "sample", counter)
  model = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
  schedule = D.make_schedule(D.get_beta_schedule("linear", 50))
  settings = sampling.SampleSettings(sampler="ddim", num_steps=4)
  fn = sampling.make_sample_fn(model, schedule, settings, make_mesh(), (8, 8, 1), prediction="eps",
                               variance="fixed_large")
  images = sampling.sample_images(fn, params, jax.random.key(1), 21, 5)  # 5 -> 8 per batch (8 devices), 3 batches
  assert images.shape == (21, 8, 8, 1) and images.dtype == np.uint8
  assert counter.count == 1
  # Batch i uses fold_in(key, i): the same call again gives the same images, another key others.
  np.testing.assert_array_equal(sampling.sample_images(fn, params, jax.random.key(1), 21, 5), images)
  assert not np.array_equal(sampling.sample_images(fn, params, jax.random.key(2), 21, 5), images)
  assert counter.count == 1
  assert sampling.device_batch_size(5) == 8 and sampling.device_batch_size(17) == 24


def test_write_samples_layout_and_png_pixels(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
  path, grid = sampling.write_samples(str(tmp_path), images, labels=np.array([0, 1, -1]),
                                      prompts=np.array(["a", "b", "c"]))
  saved = np.load(tmp_path / "samples" / "samples.npz")
  np.testing.assert_array_equal(saved["images"], images)
  assert list(saved["labels"]) == [0, 1, -1] and list(saved["prompts"]) == ["a", "b", "c"]
  png = np.asarray(Image.open(io.BytesIO(path.read_bytes())))
  np.testing.assert_array_equal(png.reshape(grid.shape), grid)
