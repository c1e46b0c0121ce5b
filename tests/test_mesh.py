"""diffusion_jax.parallel.mesh: the (data, fsdp) mesh, FSDP shardings of the train state, the sharded train step
against the replicated one, and checkpoints restored onto other meshes (8 host CPU devices, conftest)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffusion_jax import build, checkpoint, train
from diffusion_jax.data import load_split, scale_images
from diffusion_jax.parallel.mesh import OPTIMIZER_STATE_RULE, batch_sharding, fsdp_spec, make_mesh, mesh_shape
from helpers import tiny_config, write_fake_fashion_mnist


def test_mesh_shape_resolves_minus_one_and_names_bad_meshes():
  assert mesh_shape(-1, 1, 8) == (8, 1) and mesh_shape(2, -1, 8) == (2, 4) and mesh_shape(1, 8, 8) == (1, 8)
  for data, fsdp, match in ((3, 1, r"config\.mesh\.data=3, config\.mesh\.fsdp=1 is invalid: 3 does not divide the 8"),
                            (2, 2, r"config\.mesh\.data=2 x config\.mesh\.fsdp=2 = 4 devices is invalid: there are 8"),
                            (-1, -1, r"at most one axis"), (0, 1, r"config\.mesh\.data=0 is invalid"),
                            (1, "2", r"config\.mesh\.fsdp='2' is invalid")):
    with pytest.raises(ValueError, match=match):
      mesh_shape(data, fsdp, 8)


def test_fsdp_spec_splits_large_arrays_along_their_largest_divisible_axis():
  assert fsdp_spec((3, 3, 64, 128), 4) == P(None, None, None, "fsdp")
  assert fsdp_spec((3, 3, 128, 6), 4) == P(None, None, "fsdp")  # 6 does not divide by 4: the next largest
  assert fsdp_spec((128,), 4) == P()  # small: replicated
  assert fsdp_spec((3, 3, 63, 129), 4) == P()  # nothing divides
  assert fsdp_spec((3, 3, 64, 128), 1) == P()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = tiny_config(write_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist"))))
  config.model.ch = 16
  parts = build.build_components(config)
  images, _ = load_split("fashion_mnist", "train", config.data.data_dir)
  return parts, jnp.asarray(scale_images(images[:8]))


def _state_and_step(parts, mesh, rules=()):
  state, shardings = train.create_train_state(parts.model, parts.tx, jax.random.key(0), parts.input_shape, mesh,
                                              parts.schedule.num_timesteps, rules)
  return state, shardings, train.compile_train_step(parts, mesh, shardings, donate=False)


# Rules as a user writes them (config.mesh.partition_rules): the residual blocks' conv kernels split on their input
# channels, the time-embedding projections over the data axis too (ZeRO over every device), GroupNorm replicated.
RULES = ((r"ResBlock_\d+/Conv_\d+/kernel$", "None,None,fsdp"), (r"ResBlock_\d+/Dense_0/kernel$", ("data",)),
         ("GroupNorm", ""))


def test_the_fsdp_step_gives_the_replicated_steps_result_with_sharded_state(setup):
  parts, images = setup
  results = {}
  zero = (OPTIMIZER_STATE_RULE,)  # config.mesh.shard_optimizer_state
  for data, fsdp, rules in ((8, 1, ()), (2, 4, ()), (1, 8, ()), (2, 4, RULES), (8, 1, zero)):
    mesh = make_mesh(data=data, fsdp=fsdp)
    state, shardings, step = _state_and_step(parts, mesh, rules)
    batch = {"image": jax.device_put(images, batch_sharding(mesh))}
    for _ in range(2):
      state, metrics = step(state, batch, jax.random.key(1), None)
    results[fsdp, rules] = (jax.device_get(state), float(metrics["loss"]))
    if rules == zero:  # parameters replicated; the EMA and Adam's moments split over all 8 devices (ZeRO-1)
      assert all(x.sharding.spec == P() for x in jax.tree.leaves(state.params))
      large = [x for x in jax.tree.leaves((state.ema_params, state.opt_state)) if x.size >= 1024]
      assert large and all(x.addressable_shards[0].data.size == x.size // 8 for x in large)
      continue
    if rules:  # each rule placed the parameter, its EMA and both Adam moments alike; the rest by the auto rule
      placed = {}
      for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        placed.setdefault(next((spec for regex, spec in rules if re.search(regex, name)), "auto"), []).append(
            (name, x))
      conv, dense, norm = (placed[spec] for _, spec in rules)
      assert len(conv) == 2 * len(dense) and len(dense) % 4 == 0 and norm  # each in params, ema, mu and nu
      assert all(x.sharding.spec == P(None, None, "fsdp") and x.addressable_shards[0].data.shape[2] == x.shape[2] // 4
                 for _, x in conv)
      assert all(x.sharding.spec == P("data") and x.addressable_shards[0].data.shape[0] == x.shape[0] // 2
                 for _, x in dense)
      assert all(x.sharding.spec == P() for _, x in norm)
      assert all(x.sharding.spec == fsdp_spec(x.shape, 4) for _, x in placed["auto"])
      continue
    kernels = [x for x in jax.tree.leaves(state.params) if x.ndim == 4 and x.size >= 1024]
    if fsdp > 1:  # every large kernel (and its Adam moments) is split: each device holds 1/fsdp of it
      assert kernels and all(x.addressable_shards[0].data.size == x.size // fsdp for x in kernels)
      mu = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 4 and x.size >= 1024]
      assert mu and all(x.addressable_shards[0].data.size == x.size // fsdp for x in mu)
    else:
      assert all(x.addressable_shards[0].data.size == x.size for x in kernels)
  reference, loss = results[1, ()]
  for fsdp, rules in ((4, ()), (8, ()), (4, RULES), (1, zero)):
    state, other_loss = results[fsdp, rules]
    np.testing.assert_allclose(other_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(state)):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-4, atol=2e-6)


def test_partition_rules_that_do_not_fit_are_one_line_naming_the_rule(setup):
  from diffusion_jax.parallel.mesh import parse_partition_rules
  parts, _ = setup
  mesh = make_mesh(data=2, fsdp=4)
  for rules, match in (
      ((("^params/params/Conv_0/kernel$", "None,None,fsdp"),),
       r"partition_rules\[0\]=.* does not fit params/params/Conv_0/kernel of shape \(3, 3, 1, 16\): 1 does not divide over the 4 devices"),
      ((("GroupNorm", ""), ("bias$", "None,fsdp")), r"partition_rules\[1\]=.* does not fit .*bias of shape "
                                                     r"\(\d+,\): the spec names 2 axes, the array has 1")):
    with pytest.raises(ValueError, match=match):
      _state_and_step(parts, mesh, rules)
  for rules, match in (("kernel", r"expected a tuple of \(regex, spec\) pairs"),
                       ((("kernel",),), r"partition_rules\[0\]=\('kernel',\) is invalid: expected a \(regex, spec\)"),
                       ((("(", "fsdp"),), r"partition_rules\[0\]=.* the regex does not compile"),
                       ((("kernel", "None,model"),), r"takes one of the mesh axes \('data', 'fsdp'\) or None"),
                       ((("kernel", "fsdp,fsdp"),), r"each mesh axis at most once")):
    with pytest.raises(ValueError, match=match):
      parse_partition_rules(rules)


def test_a_checkpoint_written_sharded_restores_onto_other_meshes(setup, tmp_path):
  parts, images = setup
  mesh = make_mesh(data=2, fsdp=4)
  state, _, step = _state_and_step(parts, mesh)
  state, _ = step(state, {"image": jax.device_put(images, batch_sharding(mesh))}, jax.random.key(1), None)
  manager = checkpoint.make_manager(str(tmp_path), async_save=False)
  checkpoint.save(manager, 1, state)
  manager.wait_until_finished()
  saved = jax.device_get(state)
  for devices, data, fsdp in ((jax.devices()[:1], 1, 1), (jax.devices()[:4], 2, 2), (jax.devices(), 1, 8)):
    target_mesh = make_mesh(devices, data=data, fsdp=fsdp)
    target, _ = train.create_train_state(parts.model, parts.tx, jax.random.key(5), parts.input_shape, target_mesh,
                                         parts.schedule.num_timesteps)
    restored = checkpoint.restore(manager, target)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(set(x.sharding.device_set) <= set(devices) for x in jax.tree.leaves(restored))


def test_auto_host_devices_splits_up_to_two_per_core_dividing_every_batch_and_the_mesh():
  from diffusion_jax.parallel.mesh import auto_host_devices, split_host_devices
  assert auto_host_devices(2, (64,)) == 4 and auto_host_devices(2, (32, 64)) == 4
  assert auto_host_devices(2, (24,)) == 3 and auto_host_devices(2, (59,)) == 1 and auto_host_devices(1, (64,)) == 2
  assert auto_host_devices(64, (128,)) == 8  # at most 8
  assert auto_host_devices(2, (16,)) == 2 and auto_host_devices(2, (16, 64)) == 2  # at least 8 images per device
  assert auto_host_devices(2, (6,)) == 1 and auto_host_devices(2, (4,), fsdp=2) == 2  # fsdp wins over the minimum
  assert auto_host_devices(2, (64,), data=-1, fsdp=8) == 8 and auto_host_devices(2, (64,), data=2, fsdp=2) == 4
  assert auto_host_devices(2, (8,), data=-1, fsdp=3) == 3  # the mesh wins; check_config then names the batch
  env = {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=true"}
  assert split_host_devices(4, env) and env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=4")
  assert not split_host_devices(2, env) and env["XLA_FLAGS"].count("device_count") == 1  # the user's flag wins


def test_wide_models_stay_on_one_host_device_unless_the_mesh_says_otherwise():
  """Convolutions of >= 128 channels spread over the cores themselves: DDPM's CIFAR-10 U-Net (ch 128) gets one
  device, fmnist-sized models keep the split, an explicit or fsdp mesh still wins."""
  from diffusion_jax.config import load_config
  from diffusion_jax.parallel.mesh import auto_host_devices, auto_host_devices_for_config
  assert auto_host_devices(2, (16,), min_channels=128) == 1 and auto_host_devices(2, (64,), min_channels=64) == 4
  assert auto_host_devices(2, (16,), fsdp=2, min_channels=256) == 2
  assert auto_host_devices(2, (16,), data=2, fsdp=1, min_channels=128) == 2
  assert auto_host_devices_for_config(load_config("cifar10_ddpm", ["batch_size=16"]), 2) == 1
  assert auto_host_devices_for_config(load_config("cifar10_ddpm", ["batch_size=16", "model.ch=32"]), 2) == 2
  # latent runs train two models: the narrower (the autoencoder, ch 16) decides (and at 28x28 it is one per core)
  assert auto_host_devices_for_config(load_config("latent", ["model.ch=128"]), 2) == 2


def test_more_host_devices_than_cores_only_where_the_sizes_are_unknown():
  """One device per core where the image size and width are known (the quick start's 28x28 models, and
  fmnist_small, whose step then takes XLA's multi-threaded convolutions); up to two per core where they are not."""
  from diffusion_jax.config import load_config
  from diffusion_jax.parallel.mesh import auto_host_devices, auto_host_devices_for_config
  assert auto_host_devices(2, (64,), activations_per_image=32 * 32 * 32) == 2
  assert auto_host_devices(2, (64,), activations_per_image=1) == 2
  assert auto_host_devices(2, (64,), activations_per_image=0) == 4  # size unknown: as before
  assert auto_host_devices(4, (64,), activations_per_image=1) == 4  # one per core
  small = ["data.channels=1", "model.ch=32", "model.ch_mult=(1,2,2)", "model.num_res_blocks=1", "batch_size=64"]
  assert auto_host_devices_for_config(load_config("cifar10_ddpm", small), 2) == 2
  assert auto_host_devices_for_config(load_config("fashion_mnist"), 2) == 2
  assert auto_host_devices_for_config(load_config("latent"), 2) == 2


def test_large_convolutions_per_device_take_xlas_multithreaded_ones(monkeypatch):
  """The train step of a model under conv_impl 'auto' on CPU compiles with WIDE_MODEL_CPU_XLA_OPTIONS where its
  base width is >= WINOGRAD_MIN_CHANNELS or each device's first-level activations reach
  MIN_MULTITHREADED_CONV_ACTIVATIONS (fmnist_small b64 on 2 devices: 32 x 32 x 32 x 32 = 2^20), else none."""
  from diffusion_jax.models import layers
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # the user's own setting would win
  per_device = layers.activations_per_device(64, 2, (32, 32, 1), 32)
  assert per_device == 2 ** 20 >= layers.MIN_MULTITHREADED_CONV_ACTIVATIONS
  assert layers.step_compiler_options("auto", 32, per_device) == layers.WIDE_MODEL_CPU_XLA_OPTIONS
  assert layers.step_compiler_options("auto", 32, layers.MIN_MULTITHREADED_CONV_ACTIVATIONS - 1) == {}
  assert layers.step_compiler_options("xla", 32, per_device) == {}  # an explicit conv_impl is left alone
  quick_start = layers.activations_per_device(32, 2, (28, 28, 1), 16)  # configs/fashion_mnist.py on 2 devices
  assert layers.step_compiler_options("auto", 16, quick_start) == {}
