"""Class conditioning and classifier-free guidance."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as D
from diffusion_jax import train
from diffusion_jax.models import UNet
from helpers import tiny_config, write_fake_fashion_mnist


def test_class_embedding_changes_the_output_and_labels_are_required():
  model = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_classes=10)
  x, t = jnp.ones((2, 8, 8, 1)), jnp.array([5, 5])
  params = model.init(jax.random.key(0), x, t, jnp.array([0, 0]))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  a, b = model.apply(params, x, t, jnp.array([0, 0])), model.apply(params, x, t, jnp.array([3, 10]))
  assert float(jnp.abs(a[1] - b[1]).max()) > 0 and float(jnp.abs(a[0] - b[0]).max()) > 0
  np.testing.assert_array_equal(a[0], a[1])
  with pytest.raises(ValueError, match="class labels y must be given exactly when num_classes > 0"):
    model.apply(params, x, t)


def test_guidance_scale_one_is_the_conditional_model_and_zero_the_unconditional():
  calls = []

  def model_fn(x, t, y):
    calls.append(x.shape[0])
    return x * (1.0 + y[:, None, None, None].astype(jnp.float32))

  x, t, y = jnp.ones((3, 2, 2, 1)), jnp.zeros((3,), jnp.int32), jnp.array([1, 2, 3])
  null = jnp.full_like(y, 9)
  np.testing.assert_array_equal(D.guided_model_fn(model_fn, y, null, 1.0)(x, t), model_fn(x, t, y))
  calls.clear()
  np.testing.assert_allclose(D.guided_model_fn(model_fn, y, null, 0.0)(x, t), 10.0 * x)  # null label 9
  assert calls == [6]  # conditional and unconditional in one batched call
  w = 3.0
  expected = 10.0 * x + w * (model_fn(x, t, y) - 10.0 * x)
  np.testing.assert_allclose(D.guided_model_fn(model_fn, y, null, w)(x, t), expected, rtol=1e-6)
  # A learned variance: only the prediction channels are guided.
  two = lambda x, t, y: jnp.concatenate([model_fn(x, t, y), model_fn(x, t, y)], -1)
  out = D.guided_model_fn(two, y, null, w, guided_channels=1)(x, t)
  np.testing.assert_allclose(out[..., :1], expected, rtol=1e-6)
  np.testing.assert_allclose(out[..., 1:], model_fn(x, t, y), rtol=1e-6)
  for bad in (-1.0, "strong", True):
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 0"):
      D.guided_model_fn(model_fn, y, null, bad)


def test_condition_dropout_rate():
  labels = jnp.zeros((20000,), jnp.int32)
  dropped = D.drop_labels(jax.random.key(0), labels, 0.1, 10)
  rate = float(jnp.mean(dropped == 10))
  assert abs(rate - 0.1) < 0.01 and set(np.unique(np.asarray(dropped))) == {0, 10}


def test_class_conditional_run_writes_labelled_samples(tmp_path):
  data_dir = write_fake_fashion_mnist(str(tmp_path))
  config = tiny_config(data_dir)
  config.model.num_classes = 10
  config.sample.guidance_scale = 2.0
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  out = np.load(os.path.join(workdir, "samples", "samples.npz"))
  assert out["images"].shape == (10, 16, 16, 1)
  np.testing.assert_array_equal(out["labels"], np.arange(10))
  config.mode, config.sample.class_label, config.sample.num_images = "sample", 3, 4
  train.train_and_evaluate(config, workdir)
  np.testing.assert_array_equal(np.load(os.path.join(workdir, "samples", "samples.npz"))["labels"], [3, 3, 3, 3])


@pytest.mark.parametrize("key,value,message", [
    ("sample.guidance_scale", -1.0, "guidance_scale must be a number >= 0"),
    ("sample.class_label", 10, r"config.sample.class_label=10 is invalid"),
    ("diffusion.p_uncond", 1.5, r"config.diffusion.p_uncond=1.5 is invalid"),
])
def test_conditioning_config_errors(tmp_path, key, value, message):
  config = tiny_config(str(tmp_path))
  config.model.num_classes = 10
  section, _, leaf = key.rpartition(".")
  config[section][leaf] = value
  with pytest.raises(ValueError, match=message):
    train.validate_config(config)
