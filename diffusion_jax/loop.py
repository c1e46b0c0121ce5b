"""The training loop both stages share: step, log with a NaN guard, checkpoint, preview, and stop cleanly on
SIGTERM / SIGINT (save the step reached, then exit)."""

from __future__ import annotations

import collections
import os
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import checkpoint
from diffusion_jax.host_memory import release_freed_host_memory
from diffusion_jax.parallel import multihost

NAN_POLICIES = ("stop", "skip")
# Steps left unfinished when the host goes on after dispatching one (one more while it waits). Why: a program over
# several CPU devices returns from dispatch before it runs, and XLA:CPU's client admits 32 per device, then blocks
# a thread of its small pool (as many threads as cores) in that admission. With 2 cores, that thread and one
# device's all-reduce waiting for the other device's part (queued behind them) hold the whole pool: the rendezvous
# never completes and XLA aborts the process after 40 s ("Termination timeout"). tests/test_loop.py runs that case;
# 2 keep the next step queued while one runs.
MAX_STEPS_IN_FLIGHT = 2


class StepsInFlight:
  """After each step's dispatch (`dispatched(its outputs)`), waits for the step `limit` back, so the host runs at
  most `limit` steps ahead of the devices (MAX_STEPS_IN_FLIGHT says why); limit 0: no bound. Every loop that
  dispatches steps back to back uses it (run_loop, the bench scripts). Pass small outputs (the metrics): they are
  kept until waited for."""

  def __init__(self, limit: int = MAX_STEPS_IN_FLIGHT) -> None:
    if limit < 0:
      raise ValueError(f"steps in flight {limit}: expected 0 (no bound) or more")
    self._limit, self._outputs = limit, collections.deque()

  def dispatched(self, outputs: Any) -> None:
    self._outputs.append(outputs)
    if self._limit and len(self._outputs) > self._limit:
      jax.block_until_ready(self._outputs.popleft())  # the oldest: `limit` steps back


class NonFiniteLossError(FloatingPointError):
  pass


class TrainingInterrupted(Exception):
  """Training stopped on a signal after saving the step it reached; `exit_code` is the shell's 128 + signal."""

  def __init__(self, signal_name: str, step: int, directory: Any):
    super().__init__(f"saved step {step} on {signal_name} in {directory}; rerun the same command to resume")
    self.exit_code = 128 + int(signal.Signals[signal_name])


def host_metrics(pending: list[dict], step: int, nan_policy: str = "stop") -> dict[str, float]:
  """Mean of the metrics since the last flush. A step whose loss or gradient was NaN/inf (metric "nonfinite",
  else a non-finite loss) raises NonFiniteLossError under nan_policy 'stop'; under 'skip' the train step has
  already kept the previous state, and the mean is over the finite steps with "skipped_steps" counted."""
  stacked = jax.device_get(pending)
  bad = np.array([bool(m.get("nonfinite", 0)) or not np.isfinite(m["loss"]) for m in stacked])
  if bad.any() and nan_policy == "stop":
    first = int(np.argmax(bad))
    loss = stacked[first]["loss"]
    what = f"the loss became {loss}" if not np.isfinite(loss) else f"the gradient became non-finite (loss {loss})"
    raise NonFiniteLossError(f"{what} at step {step - len(stacked) + first + 1}; stopping "
                             "(optim.nan_policy='stop'). The last good checkpoint is left untouched: lower the "
                             "learning rate, check the data, or set optim.nan_policy='skip'.")
  good = [m for m, b in zip(stacked, bad) if not b] or stacked
  summary = {k: float(np.mean([m[k] for m in good])) for k in stacked[0] if k != "nonfinite"}
  if bad.any():
    logging.warning("%d of the last %d steps had a non-finite loss or gradient and were skipped "
                    "(optim.nan_policy='skip')", int(bad.sum()), len(stacked))
  summary["skipped_steps"] = float(bad.sum())
  return summary


class StopSignals:
  """While training: the first SIGTERM or SIGINT asks the loop to finish its step, save it and stop; a second
  one exits at once. With several processes, JAX's preemption service (which receives SIGTERM, and on TPU
  VMs the maintenance notice) makes every process agree on the step to stop at; SIGINT is forwarded to it."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}
    self._multiprocess = jax.process_count() > 1

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
      signals = (signal.SIGINT,) if self._multiprocess else (signal.SIGTERM, signal.SIGINT)
      for signum in signals:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      sys.stderr.write(f"error: second {name}: exiting now, without waiting for the step to be saved\n")
      sys.stderr.flush()
      os._exit(128 + signum)
    self.signal_name = name
    logging.warning("%s received: finishing the current step, saving it, then stopping (again to exit at once)",
                    name)
    if self._multiprocess:  # let JAX's preemption service (SIGTERM) agree on a step with the other processes
      os.kill(os.getpid(), signal.SIGTERM)

  def stop_now(self, step: int) -> bool:
    """True at the step to stop at: this process's signal, or (multi-process) the step all processes agreed on."""
    if self._multiprocess:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "SIGTERM"
        return True
      return False
    return self.signal_name is not None


class Prefetched:
  """`host_fn(i)` for i = start .. stop - 1, each made in a background thread while the step before it runs.

  Why: a single-device CPU program runs on the calling thread (`host_memory.reuse_freed_heap` turns JAX's CPU
  async dispatch off), so without this thread reading and decoding the next batch waited for the step to finish.
  Host work only: a program launched on several devices from this thread while the step runs on the same devices
  can deadlock their collectives (XLA:CPU's all-reduce rendezvous timed out when the latent model's encoder ran
  here), so putting the batch on the devices and encoding it stay on the loop's thread. The thread keeps one batch
  ahead (`depth`); indices must be asked for in order, as the loop does. An exception in `host_fn` is raised by
  the call that asks for that index, and `close` stops the thread (the loop closes it on every way out)."""

  def __init__(self, host_fn: Callable[[int], Any], start: int, stop: int, depth: int = 1):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._next, self._stop_index = start, stop
    self._closed = threading.Event()
    self._thread = threading.Thread(target=self._produce, args=(host_fn, start, stop), name="batch-prefetch",
                                    daemon=True)
    self._thread.start()

  def _produce(self, host_fn: Callable[[int], Any], start: int, stop: int) -> None:
    for index in range(start, stop):
      try:
        item = (index, host_fn(index), None)
      except BaseException as e:  # handed to the consumer, which raises it where the batch was wanted
        item = (index, None, e)
      while not self._closed.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[2] is not None or self._closed.is_set():
        return

  def __call__(self, index: int) -> Any:
    if index != self._next or index >= self._stop_index:
      raise ValueError(f"batch {index} asked for; this prefetcher gives {self._next} next (up to "
                       f"{self._stop_index - 1})")
    got, batch, error = self._queue.get()
    self._next += 1
    if error is not None:
      raise error
    assert got == index, (got, index)
    return batch

  def close(self) -> None:
    self._closed.set()
    self._thread.join(timeout=60)

  def __enter__(self) -> "Prefetched":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def run_loop(*, state: Any, step_fn: Callable, host_batch_fn: Callable[[int], Any], num_steps: int, batch_size: int,
             log_every: int, checkpoint_every: int, preview_every: int, manager, writer,
             device_batch_fn: Callable[[Any, int], Any] = lambda host, index: host,
             preview_fn: Callable[[Any, int], None] | None = None, name: str = "train",
             nan_policy: str = "stop", step_args: tuple = (), max_in_flight: int = MAX_STEPS_IN_FLIGHT) -> Any:
  """Steps state.step+1 .. num_steps: `step_fn(state, batch, *step_args) -> (state, metrics)` with batch =
  `device_batch_fn(host_batch_fn(step - 1), step - 1)`: the host batch made in a background thread while the step
  before it runs (`Prefetched`), put on the devices (and encoded, for latent models) on this thread.

  `step_fn` (a jitted function) is compiled before the first step, and the memory compiling freed is handed back
  (`release_freed_host_memory`); with several processes every process waits for the others there
  (`multihost.compile_then_wait`), so the step's collectives start together.

  At most `max_in_flight` steps run ahead of the host (MAX_STEPS_IN_FLIGHT says why); 0: no bound.

  Metrics are pulled to the host at log and checkpoint steps; a non-finite loss raises there (nan_policy
  'stop'), before the next save, so the last good checkpoint is never overwritten by a diverged state. A
  SIGTERM or SIGINT saves the step reached, waits for the save and raises TrainingInterrupted.
  """
  start = int(state.step)
  if start >= num_steps:
    logging.info("%s: checkpoint is at step %d >= %d: nothing to train", name, start, num_steps)
    return state
  prefix = "" if name == "train" else f"{name}/"
  pending, t_last, step_last, t_start = [], time.time(), start, time.time()
  in_flight = StepsInFlight(max_in_flight)
  logging.info("%s: steps %d..%d, global batch %d on %d devices", name, start, num_steps, batch_size,
               jax.device_count())
  with Prefetched(host_batch_fn, start, num_steps) as host_batches, StopSignals() as signals:
    for step in range(start + 1, num_steps + 1):
      batch = device_batch_fn(host_batches(step - 1), step - 1)
      if step == start + 1:
        step_fn = multihost.compile_then_wait(step_fn, state, batch, *step_args, name=f"{name}_step")
        release_freed_host_memory()  # what compiling freed, before the step's own buffers raise the peak
      state, metrics = step_fn(state, batch, *step_args)
      pending.append(metrics)
      in_flight.dispatched(metrics)
      stop = signals.stop_now(step)
      is_last = step == num_steps
      log_now = step % log_every == 0 or is_last or stop
      save_now = step % checkpoint_every == 0 or is_last or stop
      if log_now or save_now:
        summary = host_metrics(pending, step, nan_policy)  # raises before any save when a loss went non-finite
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
      if stop:
        manager.wait_until_finished()
        logging.warning("%s: saved step %d on %s; rerun the same command to resume", name, step,
                        signals.signal_name)
        raise TrainingInterrupted(signals.signal_name, step, manager.directory)
      if preview_fn is not None and (step % preview_every == 0 or is_last):
        preview_fn(state, step)
  manager.wait_until_finished()
  logging.info("%s: trained %d steps in %.1f min", name, num_steps - start, (time.time() - t_start) / 60)
  return state
