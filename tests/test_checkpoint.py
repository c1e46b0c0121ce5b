"""diffusion_jax.checkpoint: Orbax save / restore of a train state, and the errors a user sees."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import build, checkpoint, train
from diffusion_jax.parallel.mesh import make_mesh
from helpers import tiny_config


def _state(seed: int):
  parts = build.build_components(tiny_config("unused"))
  return train.create_train_state(parts.model, parts.tx, jax.random.key(seed), parts.input_shape, make_mesh(),
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
