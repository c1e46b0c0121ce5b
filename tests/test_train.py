"""diffusion_jax.train: the train step (value, sharding, one trace) and the end-to-end job on tiny sizes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import build, train
from diffusion_jax.config_check import check_resume
from diffusion_jax.parallel.mesh import batch_sharding, make_mesh
from helpers import TraceCounter, tiny_config, write_fake_fashion_mnist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


def _setup(config, devices, flat_reduce=None):
  mesh = make_mesh(devices)
  parts = build.build_components(config)
  state, shardings = train.create_train_state(parts.model, parts.tx, jax.random.key(0), parts.input_shape, mesh,
                                              parts.schedule.num_timesteps)
  step = train.compile_train_step(parts, mesh, shardings, donate=False, flat_reduce=flat_reduce)
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


def test_bfloat16_compute_keeps_float32_master_weights_and_the_float32_step(data_dir):
  """model.dtype=bfloat16 end to end on 8 devices: the step computes in bfloat16, while params, EMA and
  Adam's moments stay float32 and move as the float32 step moves them (up to bfloat16 rounding)."""
  config = tiny_config(data_dir)
  outs = []
  for dtype in ("float32", "bfloat16"):
    config.model.dtype = dtype
    mesh, state, step = _setup(config, jax.devices())
    batch = jax.device_put(_batch(data_dir, 16), batch_sharding(mesh))
    before = jax.device_get(state.params)
    # The program computes its convolutions in bfloat16 (XLA:CPU may then compute them in float32 and drop the
    # rounding, allow_excess_precision: the losses below can even be equal on CPU, so the program is checked).
    convs = [line for line in step.lower(state, batch, jax.random.key(1), None).as_text().splitlines()
             if "stablehlo.convolution" in line]
    assert convs and all(("bf16" in line) == (dtype == "bfloat16") for line in convs)
    for _ in range(2):
      state, metrics = step(state, batch, jax.random.key(1), None)
    for tree in (state.params, state.ema_params, state.opt_state):
      assert {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)} == {np.dtype("float32")}
    outs.append((float(metrics["loss"]), jax.tree.map(lambda a, b: np.asarray(a) - b, jax.device_get(state.params),
                                                      before)))
  (loss32, delta32), (loss16, delta16) = outs
  assert np.isfinite(loss16) and loss16 == pytest.approx(loss32, rel=0.05)
  flat32, flat16 = (np.concatenate([d.ravel() for d in jax.tree.leaves(t)]) for t in (delta32, delta16))
  assert np.corrcoef(flat32, flat16)[0, 1] > 0.9  # the same update direction, not merely finite


@pytest.mark.parametrize("loss,variance", [("simple", "fixed_large"), ("hybrid", "learned_range")])
def test_sharded_step_equals_single_device(data_dir, loss, variance):
  assert jax.device_count() == 8, "conftest sets 8 host CPU devices"
  """... and with the gradient accumulated over micro-batches (optim.grad_accum_steps: the same step), and with the
  gradients averaged as one flat vector (what multi-process CPU runs take: train_state.flat_reduced_value_and_grad)."""
  config = tiny_config(data_dir)
  config.diffusion.loss, config.diffusion.variance = loss, variance
  outs = []
  runs = [(jax.devices()[:1], 1, None), (jax.devices(), 1, None)] + (
      [(jax.devices(), 2, None), (jax.devices(), 2, True)] if loss == "hybrid" else [(jax.devices(), 1, True)])
  for devices, accum, flat_reduce in runs:
    config.optim.grad_accum_steps = accum
    mesh, state, step = _setup(config, devices, flat_reduce)
    batch = jax.device_put(_batch(data_dir, 16), batch_sharding(mesh))
    for _ in range(2):
      state, metrics = step(state, batch, jax.random.key(1), None)
    outs.append((float(metrics["loss"]), float(metrics["vb"]) if "vb" in metrics else 0.0,
                 jax.device_get(state.params)))
  for other in outs[1:]:
    assert outs[0][:2] == pytest.approx(other[:2], rel=1e-5)
    for a, b in zip(jax.tree.leaves(outs[0][2]), jax.tree.leaves(other[2])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_flat_gradient_reduce_refuses_sharded_parameters(data_dir):
  """flat_reduce=True reduces each device's whole gradient: with FSDP-sharded parameters it is one clear error."""
  config = tiny_config(data_dir)
  config.model.ch = 32  # kernels of 1024+ elements: FSDP splits them
  mesh = make_mesh(data=4, fsdp=2)
  parts = build.build_components(config)
  state, shardings = train.create_train_state(parts.model, parts.tx, jax.random.key(0), parts.input_shape, mesh,
                                              parts.schedule.num_timesteps)
  assert not all(s.is_fully_replicated for s in jax.tree.leaves(shardings.params))
  with pytest.raises(ValueError, match="flat_reduce=True needs every parameter replicated"):
    train.compile_train_step(parts, mesh, shardings, flat_reduce=True)


def test_train_step_compiles_once_and_moves_ema_by_its_formula(data_dir, monkeypatch):
  counter = TraceCounter(train.train_step)
  monkeypatch.setattr(train, "train_step", counter)
  config = tiny_config(data_dir)
  config.optim.ema_decay = 0.5
  mesh, state, step = _setup(config, jax.devices())
  batch = jax.device_put(_batch(data_dir), batch_sharding(mesh))
  for _ in range(3):
    before = jax.device_get(state)
    state, metrics = step(state, batch, jax.random.key(1), None)
  assert counter.count == 1  # three steps, one trace: no recompiles
  # EMA: e' = d e + (1 - d) p' with d = min(0.5, (1 + step) / (10 + step)) at the step before the update.
  d = min(0.5, (1 + 2) / (10 + 2))
  after = jax.device_get(state)
  for e0, p1, e1 in zip(jax.tree.leaves(before.ema_params), jax.tree.leaves(after.params),
                        jax.tree.leaves(after.ema_params)):
    np.testing.assert_allclose(e1, d * e0 + (1 - d) * p1, rtol=1e-5, atol=1e-7)
  assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))


def test_main_end_to_end_resume_and_nan_guard(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(data_dir)
  config.eval.bpd_num_images = 8
  config.mesh.fsdp = 8  # trained FSDP-sharded over all 8 devices; resumed and sampled on other meshes below
  train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  metrics = json.load(open(os.path.join(workdir, "eval", "metrics_4.json")))
  # An untrained model: the bound is finite and positive, and its parts add up.
  assert 0 < metrics["prior_bpd"] < metrics["total_bpd"] < 100 and metrics["decoder_bpd"] > 0
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  samples = np.load(os.path.join(workdir, "samples", "samples.npz"))["images"]
  assert samples.shape == (10, 16, 16, 1) and samples.dtype == np.uint8
  from PIL import Image
  from diffusion_jax.images import make_grid
  png = np.asarray(Image.open(os.path.join(workdir, "samples", "samples.png")))
  np.testing.assert_array_equal(png.reshape(make_grid(samples).shape), make_grid(samples))
  assert os.path.exists(os.path.join(workdir, "samples", "preview_0000004.png"))
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["ch"] == 8

  # Re-running resumes at step 4 (on a 4x2 data x fsdp mesh) and trains only the remaining steps.
  config.num_train_steps = 6
  config.mesh.fsdp = 2
  train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]

  # Sampling mode on the workdir works from the latest checkpoint (replicated: data=8).
  config.mode = "sample"
  config.mesh.fsdp = 1
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


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_non_finite_step_is_kept_out_of_the_state_under_skip(data_dir, policy):
  config = tiny_config(data_dir)
  config.optim.nan_policy = policy
  mesh, state, step = _setup(config, jax.devices()[:1])
  before = jax.device_get(state)
  bad = {"image": _batch(data_dir)["image"].at[0, 0, 0, 0].set(jnp.nan)}
  state, metrics = step(state, bad, jax.random.key(1), None)
  after = jax.device_get(state)
  assert float(metrics["nonfinite"]) == 1.0 and int(after.step) == 1
  leaves = list(zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)))
  if policy == "skip":
    for a, b in leaves:
      np.testing.assert_array_equal(a, b)
    for _ in range(2):  # good steps train again (the skipped step did not advance Adam's count: lr(0) = 0 first)
      state, metrics = step(state, _batch(data_dir), jax.random.key(1), None)
    assert float(metrics["nonfinite"]) == 0.0 and int(state.step) == 3
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params),
                                                        jax.tree.leaves(jax.device_get(state.params))))
  else:
    assert any(not np.all(np.isfinite(b)) for _, b in leaves)  # 'stop' leaves it to the loop to stop the run


def test_resuming_with_another_model_is_one_error_before_anything_is_written(data_dir, tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "2").mkdir(parents=True)
  trained = tiny_config(data_dir)
  (workdir / "config.json").write_text(trained.to_json_best_effort(indent=2))
  record = (workdir / "config.json").read_text()
  changed = tiny_config(data_dir)
  changed.model.ch, changed.diffusion.schedule = 16, "cosine"
  changed.num_train_steps, changed.optim.learning_rate = 99, 5e-4  # harmless changes are not listed
  with pytest.raises(ValueError, match=r"holds a run trained with another model or diffusion process "
                                       r"\(diffusion\.schedule='linear' there, 'cosine' now; model\.ch=8 there, "
                                       r"16 now\): use a new --workdir"):
    train.train_and_evaluate(changed, str(workdir))
  assert (workdir / "config.json").read_text() == record
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json"]
  check_resume(trained, str(workdir))  # the same model resumes
  changed.model.ch, changed.diffusion.schedule = 8, "linear"
  changed.model.dtype, changed.model.conv_impl, changed.model.dropout = "bfloat16", "im2col", 0.1  # how, not what
  changed.model.conv_precision = "bfloat16"
  check_resume(changed, str(workdir))  # only harmless changes left
  check_resume(tiny_config(data_dir), str(tmp_path / "fresh"))  # a new workdir has nothing to compare
