"""Orbax checkpoints of the train state; a run on a workdir with a checkpoint resumes from the newest one
that restores (a damaged newer one is set aside with a warning, never deleted)."""

from __future__ import annotations

import logging as logging_lib
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils


class CheckpointMismatchError(ValueError):
  """A checkpoint written by another model (different parameter names or shapes): not damage, a user error."""


def make_manager(workdir, *, max_to_keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """A manager of DIR/checkpoints/<step>; DIR may be local (made absolute, as Orbax wants) or remote (gs://)."""
  directory = epath.Path(workdir) / "checkpoints"
  if "://" not in str(workdir):
    directory = directory.absolute()
  # One item, declared: a fresh manager can then read a checkpoint's metadata (shapes) before restoring it.
  return ocp.CheckpointManager(
      directory, item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save))


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  manager.save(step, args=ocp.args.StandardSave(state))


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
  """The state at `step` (the newest good one when None), laid out as `abstract_state` (shapes + shardings)."""
  if step is None:
    state = restore_latest_good(manager, abstract_state)
    if state is None:
      raise FileNotFoundError(f"no checkpoint in {manager.directory}; train first (config.mode='train')")
    return state
  if step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint for step {step} in {manager.directory}; "
                            f"it has steps {sorted(manager.all_steps())}")
  check_compatible(manager, step, abstract_state)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # an explicitly requested step: no fallback, one line
    raise FileNotFoundError(f"checkpoint step {step} in {manager.directory} does not restore: "
                            f"{_first_line(e)}") from None


def restore_latest_good(manager: ocp.CheckpointManager, abstract_state: Any) -> Any | None:
  """The newest checkpoint that restores, None when there is none. A step that does not restore (truncated
  data, lost metadata or manifests, a missing item folder) is renamed <step>.damaged-<time> beside the others,
  out of Orbax's sight but kept for inspection, with one warning naming the step and the reason, and the next
  older step is tried. A checkpoint of another model raises CheckpointMismatchError instead."""
  for step in sorted(manager.all_steps(), reverse=True):
    check_compatible(manager, step, abstract_state)
    _quiet_failed_reads()
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      _check_step(state, step)
      return state
    except Exception as e:  # Orbax, TensorStore and OS errors all mean: this step cannot be used
      reason = _first_line(e)
    older = [s for s in manager.all_steps() if s < step]
    logging.warning("checkpoint step %d in %s does not restore (%s); set it aside as %d.damaged and %s", step,
                    manager.directory, reason, step,
                    f"falling back to step {max(older)}" if older else "starting from scratch")
    _set_aside(manager, step)
  return None


def _check_step(state: Any, step: int) -> None:
  if getattr(state, "step", None) is not None and int(state.step) != step:
    raise ValueError(f"its state says step {int(state.step)}")


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
  if jax.process_index() == 0:
    path = epath.Path(manager.directory) / str(step)
    if path.exists():
      path.rename(path.parent / f"{step}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
  manager.reload()


def _quiet_failed_reads() -> None:
  """A failed restore leaves TensorStore reads in flight; when they finish, Python reports each one (a page of
  TensorStore spec, or 'Event loop is closed' from the finished restore's loop). restore_latest_good's one
  warning line says it all, so only those reports are dropped."""
  if getattr(sys.unraisablehook, "drops_failed_reads", False):
    return
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

  def unraisable_hook(unraisable):
    if "_read_array_index_and_device_put" not in repr(unraisable.object) and not _closed_loop(unraisable.exc_value):
      previous_unraisable(unraisable)

  def except_hook(kind, value, tb):
    if not _closed_loop(value):
      previous_except(kind, value, tb)
  unraisable_hook.drops_failed_reads = True
  sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
  logging_lib.getLogger("asyncio").addFilter(
      lambda record: not ("exception was never retrieved" in record.getMessage()
                          and ("OCDBT" in record.getMessage() or "reading array index" in record.getMessage())))


def _closed_loop(error: BaseException | None) -> bool:
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """CheckpointMismatchError naming the first parameter whose name or shape differs from `abstract_state`.
  Unreadable metadata is left to the restore (which then fails as damage)."""
  try:
    saved = manager.item_metadata(step)
    saved = getattr(saved, "tree", saved)
  except Exception:
    return
  if saved is None:
    return
  want = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)}
  have = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(saved)}
  have = {_normalise(k): v for k, v in have.items()}
  where = f"checkpoint step {step} in {manager.directory} was written by another model"
  for key, leaf in want.items():
    other = have.get(_normalise(key))
    if other is None:
      raise CheckpointMismatchError(f"{where}: it has no {_normalise(key)} (start fresh with a new --workdir)")
    if tuple(getattr(other, "shape", ())) != tuple(np.shape(leaf)):
      raise CheckpointMismatchError(f"{where}: {_normalise(key)} is {list(other.shape)} there, "
                                    f"{list(np.shape(leaf))} here (start fresh with a new --workdir)")


def _normalise(key: str) -> str:
  """A leaf path as both a dataclass state (`.params['x']`) and its saved dict (`['params']['x']`) print it."""
  return key.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "").lstrip(".")


def _first_line(error: BaseException) -> str:
  text = str(error).strip().split(" See full TensorStore details")[0].split(" [tensorstore_spec")[0]
  return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"
