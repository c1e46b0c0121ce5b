"""diffusion_jax.loop: the loop both stages share (steps, logs, checkpoints, previews, the NaN guard)."""

import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import pytest

from diffusion_jax import loop
from helpers import ROOT


class FakeManager:
  def __init__(self):
    self.saved = []

  def save(self, step, args):
    self.saved.append(step)

  def wait_until_finished(self):
    pass


class FakeWriter:
  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, scalars))


@flax.struct.dataclass
class State:
  step: jax.Array


def _step_fn(losses):
  def step(state, batch):
    return State(state.step + 1), {"loss": jnp.asarray(losses(int(state.step) + 1)), "grad_norm": jnp.asarray(1.0),
                       "learning_rate": jnp.asarray(0.1), "batch": jnp.asarray(batch, jnp.float32)}
  return step


def _run(start, num_steps, losses=lambda s: 1.0, manager=None, writer=None, previews=None):
  manager, writer = manager or FakeManager(), writer or FakeWriter()
  previews = [] if previews is None else previews
  state = loop.run_loop(state=State(jnp.asarray(start)), step_fn=_step_fn(losses), host_batch_fn=lambda i: i,
                        num_steps=num_steps, batch_size=4, log_every=2, checkpoint_every=3, preview_every=4,
                        manager=manager, writer=writer, preview_fn=lambda s, step: previews.append(step))
  return int(state.step), manager, writer, previews


def test_steps_logs_saves_and_previews_on_their_schedules():
  state, manager, writer, previews = _run(0, 7)
  assert state == 7
  assert manager.saved == [3, 6, 7]  # every 3 steps and the last
  assert [s for s, _ in writer.scalars] == [2, 4, 6, 7]
  assert previews == [4, 7]
  # Logged values are means over the steps since the last pull (a log or a save): batches 0 and 1 at step 2,
  # batch 3 alone at step 4 (step 3's save pulled batch 2).
  assert writer.scalars[0][1]["batch"] == pytest.approx(0.5) and writer.scalars[1][1]["batch"] == pytest.approx(3)
  assert writer.scalars[0][1]["images_per_sec"] > 0


def test_resume_runs_only_the_remaining_steps_and_a_finished_run_nothing():
  state, manager, _, _ = _run(5, 7)
  assert state == 7 and manager.saved == [6, 7]
  state, manager, _, _ = _run(7, 7)
  assert state == 7 and manager.saved == []


def test_a_non_finite_loss_stops_before_the_next_save():
  manager = FakeManager()
  with pytest.raises(loop.NonFiniteLossError, match="the loss became nan at step 5"):
    _run(0, 9, losses=lambda s: float("nan") if s == 5 else 1.0, manager=manager)
  assert manager.saved == [3]  # step 6's save never happened


def test_skip_policy_logs_the_finite_mean_and_counts_skipped_steps():
  # With nan_policy='skip' the run goes on; the log at step 4 averages steps 3..4 without step 3.
  manager, writer = FakeManager(), FakeWriter()
  state = loop.run_loop(state=State(jnp.asarray(0)), step_fn=_step_fn(lambda s: float("nan") if s == 3 else float(s)),
                        host_batch_fn=lambda i: i, num_steps=6, batch_size=4, log_every=2, checkpoint_every=100,
                        preview_every=100, manager=manager, writer=writer, nan_policy="skip")
  assert int(state.step) == 6 and manager.saved == [6]
  logged = dict(writer.scalars)
  assert logged[2]["skipped_steps"] == 0 and logged[4]["skipped_steps"] == 1
  assert logged[4]["loss"] == 4.0 and logged[2]["loss"] == 1.5


def test_the_next_batch_is_made_while_the_step_runs_and_its_errors_reach_the_loop():
  import threading
  import time
  events, made_in = [], set()

  def batch_fn(i):
    made_in.add(threading.current_thread().name)
    events.append(("batch", i))
    if i == 3:
      raise OSError("image 17 is truncated")
    return i

  def step_fn(state, batch):
    events.append(("step start", batch))
    time.sleep(0.5)  # the next batch is made meanwhile, in the prefetch thread
    events.append(("step end", batch))
    return State(state.step + 1), {"loss": jnp.asarray(1.0), "grad_norm": jnp.asarray(1.0),
                                   "learning_rate": jnp.asarray(0.1)}

  put_in = set()

  def device_batch_fn(host, i):  # devices' work (host_to_global, a latent model's encoder) on the loop's thread
    put_in.add(threading.current_thread().name)
    assert host == i
    return host

  manager = FakeManager()
  with pytest.raises(OSError, match="image 17 is truncated"):  # raised where batch 3 was wanted: step 4
    loop.run_loop(state=State(jnp.asarray(0)), step_fn=step_fn, host_batch_fn=batch_fn,
                  device_batch_fn=device_batch_fn, num_steps=6, batch_size=4, log_every=2, checkpoint_every=3,
                  preview_every=10, manager=manager, writer=FakeWriter())
  assert made_in == {"batch-prefetch"} and put_in == {threading.current_thread().name}
  assert events.index(("batch", 1)) < events.index(("step end", 0))  # batch 1 made during step 0
  assert ("step start", 3) not in events and manager.saved == [3]  # steps 1-3 ran and were saved, then it stopped
  assert not any(t.name == "batch-prefetch" for t in threading.enumerate())  # the thread is gone


def test_prefetched_gives_batches_in_order_only():
  with loop.Prefetched(lambda i: i * 10, 2, 5) as batches:
    assert batches(2) == 20 and batches(3) == 30
    with pytest.raises(ValueError, match="batch 2 asked for; this prefetcher gives 4 next"):
      batches(2)


# The loop over 2 CPU devices with a step whose all-reduce is tiny, so the host could dispatch far ahead of the
# devices. Unbounded (max_in_flight=0), this program aborted within its first few thousand steps at each try
# (XLA:CPU's "Termination timeout" of its all-reduce rendezvous; see loop.MAX_STEPS_IN_FLIGHT); the timeout is
# cut to 10 s so a hang fails fast.
_MANY_DEVICE_STEPS = r"""
import os, sys
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                           "--xla_cpu_collective_call_terminate_timeout_seconds=10")
import flax, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from diffusion_jax import loop
from diffusion_jax.host_memory import reuse_freed_heap
reuse_freed_heap()  # as main runs: JAX's CPU async dispatch off

@flax.struct.dataclass
class State:
  step: jax.Array
  w: jax.Array

class Nothing:
  def save(self, *a, **k): pass
  def wait_until_finished(self): pass
  def write_scalars(self, *a): pass

mesh = Mesh(jax.devices(), ("data",))
data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

@jax.jit
def step(state, x):  # x [16,16] split over the devices; the gradient's mean over the batch is an all-reduce
  loss_fn = lambda w: jnp.mean(jnp.tanh(x @ w) ** 2)
  loss, grad = jax.value_and_grad(loss_fn)(state.w)
  metrics = {"loss": loss, "grad_norm": jnp.linalg.norm(grad), "learning_rate": jnp.float32(0.01)}
  return State(state.step + 1, state.w - 0.01 * grad), metrics

x = jax.device_put(jnp.ones((16, 16)), data)
state = State(jax.device_put(jnp.zeros((), jnp.int32), replicated), jax.device_put(jnp.eye(16), replicated))
steps = int(sys.argv[1])
state = loop.run_loop(state=state, step_fn=step, host_batch_fn=lambda i: None, device_batch_fn=lambda h, i: x,
                      num_steps=steps, batch_size=16, log_every=steps, checkpoint_every=steps, preview_every=steps,
                      manager=Nothing(), writer=Nothing())
print("steps", int(state.step))
"""


def test_many_steps_over_two_cpu_devices_do_not_deadlock_their_all_reduce():
  # XLA's pools as on a 2-core host (they are as large as the cores), where the abort happens.
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PJRT_NPROC": "2"}
  out = subprocess.run([sys.executable, "-c", _MANY_DEVICE_STEPS, "20000"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0 and "steps 20000" in out.stdout, out.stderr[-3000:]


class _Output:
  """A stand-in for a step's outputs that records when it is waited for."""

  def __init__(self, index, waited):
    self.index, self.waited = index, waited

  def block_until_ready(self):
    self.waited.append(self.index)
    return self


def test_steps_in_flight_waits_for_the_step_limit_back():
  for limit, expected in ((2, [0, 1, 2]), (1, [0, 1, 2, 3]), (0, [])):
    waited = []
    in_flight = loop.StepsInFlight(limit)
    for i in range(5):
      in_flight.dispatched(_Output(i, waited))
      assert waited == expected[:max(0, i + 1 - limit)]  # limit 0: expected is []
    assert waited == expected
  with pytest.raises(ValueError, match="steps in flight -1"):
    loop.StepsInFlight(-1)
