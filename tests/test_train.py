"""The train step, its sharding, checkpoints and the end-to-end main job on tiny sizes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import checkpoint, train
from diffusion_jax.parallel.mesh import batch_sharding, make_mesh
from helpers import ROOT, tiny_config, write_fake_fashion_mnist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


def _setup(config, devices):
  mesh = make_mesh(devices)
  model, schedule = train.build_model(config), train.build_schedule(config)
  tx, lr_fn = train.build_optimizer(config)
  state, shardings = train.create_train_state(model, tx, jax.random.key(0), (16, 16, 1), mesh,
                                              schedule.num_timesteps)
  step = train.compile_train_step(config, model, tx, lr_fn, schedule, mesh, shardings, donate=False)
  return mesh, state, step


def _batch(data_dir, n=8):
  from diffusion_jax.data import load_split, scale_images
  images, _ = load_split("fashion_mnist", "train", data_dir)
  return {"image": jnp.asarray(scale_images(images[:n]))}


def test_train_step_overfits_a_fixed_batch(data_dir):
  config = tiny_config(data_dir)
  config.diffusion.num_timesteps = 100
  mesh, state, step = _setup(config, jax.devices()[:1])
  batch = _batch(data_dir)
  # Fixed timesteps and noise (same key every step) isolate optimisation from sampling noise.
  losses = []
  for _ in range(40):
    state = state.replace(step=jnp.zeros((), jnp.int32) + 1000)
    state, metrics = step(state, batch, jax.random.key(0), None)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("loss,variance", [("simple", "fixed_large"), ("hybrid", "learned_range")])
def test_sharded_step_equals_single_device(data_dir, loss, variance):
  assert jax.device_count() == 8, "conftest sets 8 host CPU devices"
  config = tiny_config(data_dir)
  config.diffusion.loss, config.diffusion.variance = loss, variance
  outs = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh, state, step = _setup(config, devices)
    batch = jax.device_put(_batch(data_dir), batch_sharding(mesh))
    for _ in range(2):
      state, metrics = step(state, batch, jax.random.key(1), None)
    outs.append((float(metrics["loss"]), jax.device_get(state.params)))
  assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-5)
  for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_checkpoint_round_trip(data_dir, tmp_path):
  config = tiny_config(data_dir)
  mesh, state, step = _setup(config, jax.devices())
  state, _ = step(state, jax.device_put(_batch(data_dir), batch_sharding(mesh)), jax.random.key(1), None)
  manager = checkpoint.make_manager(str(tmp_path), async_save=False)
  checkpoint.save(manager, 1, state)
  manager.wait_until_finished()
  _, fresh, _ = _setup(config, jax.devices())
  restored = checkpoint.restore(manager, fresh)
  assert int(restored.step) == 1
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
    checkpoint.restore(manager, fresh, 7)


@pytest.mark.parametrize("key,value,message", [
    ("data.dataset", "svhn", r"config.data.dataset='svhn' is invalid: choose one of"),
    ("batch_size", 12, r"config.batch_size=12 is invalid: must be divisible by the 8 devices"),
    ("num_train_steps", -1, r"config.num_train_steps=-1 is invalid"),
    ("diffusion.loss", "l1", r"config.diffusion.loss='l1' is invalid: choose one of \('simple'"),
    ("data.image_size", 20, r"config.data.image_size=20 and config.model do not fit: attn_resolutions"),
    ("sample.num_steps", 51, r"config.sample.num_steps=51 is invalid"),
    ("mode", "evaluate", r"config.mode='evaluate' is invalid"),
])
def test_config_errors_name_key_and_value(data_dir, key, value, message):
  config = tiny_config(data_dir)
  section, _, leaf = key.rpartition(".")
  (config[section] if section else config)[leaf] = value
  with pytest.raises(ValueError, match=message):
    train.validate_config(config)


def test_main_end_to_end_resume_and_nan_guard(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(data_dir)
  config.eval.bpd_num_images = 8
  train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  metrics = json.load(open(os.path.join(workdir, "eval", "metrics_4.json")))
  # An untrained model: the bound is finite and positive, and its parts add up.
  assert 0 < metrics["prior_bpd"] < metrics["total_bpd"] < 100 and metrics["decoder_bpd"] > 0
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  samples = np.load(os.path.join(workdir, "samples", "samples.npz"))["images"]
  assert samples.shape == (10, 16, 16, 1) and samples.dtype == np.uint8
  assert os.path.getsize(os.path.join(workdir, "samples", "samples.png")) > 100
  assert os.path.exists(os.path.join(workdir, "samples", "preview_0000004.png"))
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["ch"] == 8

  # Re-running resumes at step 4 and trains only the remaining steps.
  config.num_train_steps = 6
  train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]

  # Sampling mode on the workdir works from the latest checkpoint.
  config.mode = "sample"
  config.sample.num_images = 3
  train.train_and_evaluate(config, workdir)
  assert np.load(os.path.join(workdir, "samples", "samples.npz"))["images"].shape == (3, 16, 16, 1)

  # A diverging run stops with a clear error and leaves the last good checkpoint as it was.
  config.mode = "train"
  config.num_train_steps = 10
  config.optim.learning_rate = 1e30
  config.optim.grad_clip = 0.0
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(train.NonFiniteLossError, match="the loss became .* at step"):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_sample_mode_without_checkpoint_is_a_clear_error(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.mode = "sample"
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*train first"):
    train.train_and_evaluate(config, str(tmp_path / "empty"))


@pytest.mark.parametrize("name,variant", [("fashion_mnist", None), ("fashion_mnist", "full"), ("latent", None),
                                          ("latent", "full"), ("latent", "class"), ("latent", "uncond"),
                                          ("cifar10_ddpm", None)])
def test_every_shipped_config_validates(name, variant):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  train.validate_config(config)


def test_main_prints_one_clear_line_for_user_errors(tmp_path):
  import subprocess
  import sys
  base = [sys.executable, "-m", "diffusion_jax.main", f"--config={os.path.join(ROOT, 'configs', 'latent.py')}",
          f"--workdir={tmp_path / 'empty'}"]
  env = {k: v for k, v in os.environ.items() if k != "DJ_TRACEBACK"}
  out = subprocess.run(base + ["--config.sample.guidance_scale=-1"], capture_output=True, text=True, env=env)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert "error: ValueError: config.sample.guidance_scale: guidance_scale must be a number >= 0" in out.stderr
  out = subprocess.run(base + ["--config.mode=sample"], capture_output=True, text=True, env=env)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert "no finished autoencoder in" in out.stderr and "run config.mode='train' first" in out.stderr
