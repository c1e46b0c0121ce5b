"""diffusion_jax.latent and models.autoencoder: the KL autoencoder and the two-stage latent diffusion run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import latent, train
from diffusion_jax.data import load_split, scale_images
from diffusion_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian, autoencoder_loss
from diffusion_jax.train_state import AutoencoderState
from helpers import tiny_latent_config, write_fake_fashion_mnist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")), n_train=128)


@pytest.mark.parametrize("ch_mult,factor", [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4), ((1, 2, 2, 2), 8)])
def test_autoencoder_shapes(ch_mult, factor):
  model = AutoencoderKL(ch=8, ch_mult=ch_mult, z_channels=3, out_channels=3)
  x = jnp.zeros((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, jax.random.key(1))
  rec, posterior = model.apply(variables, x, jax.random.key(1))
  assert rec.shape == x.shape and posterior.mean.shape == (2, 32 // factor, 32 // factor, 3)
  assert model.latent_shape((32, 32, 3)) == (32 // factor, 32 // factor, 3)
  if factor > 1:
    with pytest.raises(ValueError, match=f"f={factor} .* does not divide the image size 33x33"):
      model.latent_shape((33, 33, 3))


def test_posterior_kl_matches_float64_reference():
  rng = np.random.default_rng(0)
  mean, logvar = rng.standard_normal((3, 2, 2, 4)), rng.uniform(-3, 1, (3, 2, 2, 4))
  ref = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
  got = DiagonalGaussian(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32)).kl()
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  assert float(DiagonalGaussian(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1))).kl()[0]) == 0.0


def test_a_briefly_trained_autoencoder_beats_the_mean_image(data_dir):
  images = jnp.asarray(scale_images(load_split("fashion_mnist", "train", data_dir)[0]))
  model = AutoencoderKL(ch=16, ch_mult=(1, 2), z_channels=2, out_channels=1)
  params = model.init(jax.random.key(0), images[:1], jax.random.key(1))
  tx = optax.adam(2e-3)
  state = AutoencoderState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  step = jax.jit(lambda s, b: latent.autoencoder_train_step(s, b, jax.random.key(2), model=model, tx=tx,
                                                            kl_weight=1e-6, rec_loss="l1",
                                                            learning_rate_fn=lambda _: 2e-3))
  for i in range(150):
    state, metrics = step(state, {"image": images[(i * 32) % 128:(i * 32) % 128 + 32]})
  posterior = model.apply(state.params, images, method=model.encode)
  rec = model.apply(state.params, posterior.mean, method=model.decode)
  mse_rec = float(jnp.mean((rec - images) ** 2))
  mse_mean = float(jnp.mean((images.mean(0, keepdims=True) - images) ** 2))
  assert mse_rec < 0.5 * mse_mean, (mse_rec, mse_mean)
  terms = autoencoder_loss(rec, images, posterior, kl_weight=1.0)
  assert float(terms["loss"]) == pytest.approx(float(terms["rec"] + terms["kl"]), rel=1e-5)


def test_two_stage_run_writes_both_stages_and_resume_skips_stage_one(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_latent_config(data_dir)
  train.train_and_evaluate(config, workdir)
  # Stage 1 keeps keep_checkpoints steps too, so a damaged newest one has a predecessor to fall back to.
  assert sorted(os.listdir(os.path.join(workdir, "autoencoder", "checkpoints"))) == ["2", "4"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  scale = json.load(open(os.path.join(workdir, "autoencoder", latent.SCALE_FILE)))["scale_factor"]
  assert np.isfinite(scale) and scale > 0
  samples = np.load(os.path.join(workdir, "samples", "samples.npz"))["images"]
  assert samples.shape == (10, 16, 16, 1) and samples.dtype == np.uint8  # decoded pixels, not latents
  assert os.path.exists(os.path.join(workdir, "autoencoder", "samples", "reconstruction_0000004.png"))

  ae_ckpt = os.path.join(workdir, "autoencoder", "checkpoints", "4")
  mtime = os.path.getmtime(ae_ckpt)
  config.num_train_steps = 6
  train.train_and_evaluate(config, workdir)  # stage 1 is finished: reused, not retrained
  assert os.path.getmtime(ae_ckpt) == mtime
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]

  # A second experiment reuses this autoencoder through autoencoder.checkpoint_dir.
  other = tiny_latent_config(data_dir)
  other.autoencoder.checkpoint_dir = os.path.join(workdir, "autoencoder")
  other.num_train_steps = 2
  train.train_and_evaluate(other, str(tmp_path / "other"))
  assert not os.path.exists(str(tmp_path / "other" / "autoencoder"))


def test_a_missing_autoencoder_checkpoint_dir_is_a_clear_error(data_dir, tmp_path):
  config = tiny_latent_config(data_dir)
  config.autoencoder.checkpoint_dir = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="holds no autoencoder checkpoint"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
