"""The training loop both stages share: step, log with a NaN guard, checkpoint, preview."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from diffusion_jax import checkpoint


class NonFiniteLossError(FloatingPointError):
  pass


def host_metrics(pending: list[dict], step: int) -> dict[str, float]:
  """Mean of the metrics since the last flush; raises NonFiniteLossError on a NaN/inf loss."""
  stacked = jax.device_get(pending)
  losses = np.array([m["loss"] for m in stacked])
  if not np.all(np.isfinite(losses)):
    first = step - len(stacked) + int(np.argmin(np.isfinite(losses))) + 1
    raise NonFiniteLossError(f"the loss became {losses[~np.isfinite(losses)][0]} at step {first}; stopping. "
                             "The last good checkpoint is left untouched (lower the learning rate or "
                             "check the data).")
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


def run_loop(*, state: Any, step_fn: Callable, batch_fn: Callable[[int], Any], num_steps: int, batch_size: int,
             log_every: int, checkpoint_every: int, preview_every: int, manager, writer,
             preview_fn: Callable[[Any, int], None] | None = None, name: str = "train") -> Any:
  """Steps state.step+1 .. num_steps: `step_fn(state, batch_fn(step - 1)) -> (state, metrics)`.

  Metrics are pulled to the host at log and checkpoint steps; a non-finite loss raises there, before the
  next save, so the last good checkpoint is never overwritten by a diverged state.
  """
  start = int(state.step)
  if start >= num_steps:
    logging.info("%s: checkpoint is at step %d >= %d: nothing to train", name, start, num_steps)
    return state
  prefix = "" if name == "train" else f"{name}/"
  pending, t_last, step_last, t_start = [], time.time(), start, time.time()
  logging.info("%s: steps %d..%d, global batch %d on %d devices", name, start, num_steps, batch_size,
               jax.device_count())
  for step in range(start + 1, num_steps + 1):
    state, metrics = step_fn(state, batch_fn(step - 1))
    pending.append(metrics)
    is_last = step == num_steps
    log_now = step % log_every == 0 or is_last
    save_now = step % checkpoint_every == 0 or is_last
    if log_now or save_now:
      summary = host_metrics(pending, step)  # raises before any save when a loss went non-finite
      pending = []
      if log_now:
        now = time.time()
        steps_per_sec = (step - step_last) / max(now - t_last, 1e-9)
        summary.update(steps_per_sec=steps_per_sec, images_per_sec=steps_per_sec * batch_size)
        writer.write_scalars(step, {prefix + k: v for k, v in summary.items()})
        eta = (num_steps - step) / max(steps_per_sec, 1e-9)
        logging.info("%s step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.2f steps/s  ETA %dm%02ds", name, step,
                     num_steps, summary["loss"], summary["grad_norm"], summary["learning_rate"], steps_per_sec,
                     eta // 60, eta % 60)
        t_last, step_last = now, step
    if save_now:
      checkpoint.save(manager, step, state)
    if preview_fn is not None and (step % preview_every == 0 or is_last):
      preview_fn(state, step)
  manager.wait_until_finished()
  logging.info("%s: trained %d steps in %.1f min", name, num_steps - start, (time.time() - t_start) / 60)
  return state
