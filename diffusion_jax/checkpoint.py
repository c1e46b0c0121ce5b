"""Orbax checkpoints of the train state; a run on a workdir with a checkpoint resumes from it."""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp
from etils import epath


def make_manager(workdir, *, max_to_keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """A manager of DIR/checkpoints/<step>; DIR may be local (made absolute, as Orbax wants) or remote (gs://)."""
  directory = epath.Path(workdir) / "checkpoints"
  if "://" not in str(workdir):
    directory = directory.absolute()
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save))


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  manager.save(step, args=ocp.args.StandardSave(state))


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
  """The state at `step` (latest when None), laid out as `abstract_state` (shapes + shardings)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}; train first (config.mode='train')")
  if step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint for step {step} in {manager.directory}; "
                            f"it has steps {sorted(manager.all_steps())}")
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
