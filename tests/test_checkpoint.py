"""diffusion_jax.checkpoint: Orbax save / restore of a train state, and the errors a user sees."""

import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import build, checkpoint, train
from diffusion_jax.parallel.mesh import make_mesh
from helpers import tiny_config


def _state(seed: int):
  parts = build.build_components(tiny_config("unused"))
  return train.create_train_state(parts.model, parts.tx, jax.random.key(seed), parts.input_shape, make_mesh(jax.devices()[:1]),
                                   parts.schedule.num_timesteps)[0]


def test_round_trip_restores_every_leaf_and_names_missing_steps(tmp_path):
  state = _state(1).replace(step=jnp.asarray(7, jnp.int32))
  manager = checkpoint.make_manager(str(tmp_path), async_save=False)
  checkpoint.save(manager, 7, state)
  manager.wait_until_finished()
  fresh = _state(2)  # other values, same structure: restore must overwrite every leaf
  restored = checkpoint.restore(manager, fresh)
  assert int(restored.step) == 7
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh.params), jax.tree.leaves(state.params)))
  with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 3 in .*it has steps \[7\]"):
    checkpoint.restore(manager, fresh, 3)


def test_empty_directory_says_train_first_and_relative_workdirs_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  manager = checkpoint.make_manager("run", async_save=False)
  assert os.path.isabs(str(manager.directory)) and str(manager.directory).endswith(os.path.join("run", "checkpoints"))
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*train first"):
    checkpoint.restore(manager, _state(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A workdir with checkpoints of steps 2 and 4 (states of seeds 2 and 4), written once for the module."""
  workdir = tmp_path_factory.mktemp("saved")
  manager = checkpoint.make_manager(str(workdir), async_save=False)
  for step in (2, 4):
    checkpoint.save(manager, step, _state(step).replace(step=jnp.asarray(step, jnp.int32)))
  manager.wait_until_finished()
  return workdir


def _saved_steps(saved, workdir):
  shutil.copytree(saved / "checkpoints", workdir / "checkpoints")
  return workdir / "checkpoints"


def _truncate_data(step_dir):
  for f in glob.glob(str(step_dir / "default" / "ocdbt.process_0" / "d" / "*")):
    with open(f, "r+b") as handle:
      handle.truncate(os.path.getsize(f) // 2)


DAMAGE = {
    "data files truncated": _truncate_data,
    "_METADATA deleted": lambda d: os.remove(d / "default" / "_METADATA"),
    "OCDBT manifests deleted": lambda d: [os.remove(f) for f in glob.glob(str(d / "default" / "**" / "manifest.ocdbt"),
                                                                             recursive=True)],
    "item folder deleted": lambda d: shutil.rmtree(d / "default"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_step_falls_back_to_the_previous_one(saved, tmp_path, damage, caplog):
  directory = _saved_steps(saved, tmp_path)
  DAMAGE[damage](directory / "4")
  manager = checkpoint.make_manager(str(tmp_path), async_save=False)
  with caplog.at_level(logging.WARNING):
    restored = checkpoint.restore_latest_good(manager, _state(0))
  assert int(restored.step) == 2
  for a, b in zip(jax.tree.leaves(_state(2).params), jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  warnings = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
  assert len(warnings) == 1 and "checkpoint step 4 in" in warnings[0] and "falling back to step 2" in warnings[0]
  assert len(warnings[0].splitlines()) == 1
  # Set aside, not deleted; Orbax no longer sees it, so the run can save step 4 again.
  names = sorted(os.listdir(directory))
  assert names[0] == "2" and names[1].startswith("4.damaged-") and len(names) == 2
  assert manager.all_steps() == [2]
  checkpoint.save(manager, 4, restored.replace(step=jnp.asarray(4, jnp.int32)))
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 4]


def test_every_step_damaged_starts_from_scratch(saved, tmp_path):
  directory = _saved_steps(saved, tmp_path)
  for step in ("2", "4"):
    _truncate_data(directory / step)
  assert checkpoint.restore_latest_good(checkpoint.make_manager(str(tmp_path)), _state(0)) is None


def test_a_checkpoint_of_another_model_names_the_first_differing_parameter(saved, tmp_path):
  _saved_steps(saved, tmp_path)
  config = tiny_config("unused")
  config.model.ch = 16
  parts = build.build_components(config)
  wider = train.create_train_state(parts.model, parts.tx, jax.random.key(0), parts.input_shape, make_mesh(jax.devices()[:1]),
                                   parts.schedule.num_timesteps)[0]
  manager = checkpoint.make_manager(str(tmp_path))
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"checkpoint step 4 in .* was written by another model: params\.params\.\S+ is \[16\] "
                           r"there, \[32\] here"):
    checkpoint.restore_latest_good(manager, wider)
  assert manager.all_steps() == [2, 4]  # a mismatch is the user's, not damage: nothing is set aside
