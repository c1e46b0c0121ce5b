"""Faults a run must survive, through the real command line on a tiny model: SIGKILL at three points resumes
to the same bits as an uninterrupted run; SIGTERM and Ctrl-C save the step reached and exit, and the rerun
loses no step; a second signal exits at once. (Damaged checkpoints: test_checkpoint.py; bad input:
test_bad_inputs.py.)"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_jax import checkpoint
from helpers import ROOT, write_fake_fashion_mnist

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_STEPS = 8


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  """A config file main can load: the tests' tiny config, logging every step, saving every 2 steps."""
  tmp = tmp_path_factory.mktemp("faults")
  data_dir = write_fake_fashion_mnist(str(tmp))
  path = tmp / "tiny.py"
  path.write_text(f"""
from helpers import tiny_config


def get_config():
  config = tiny_config({data_dir!r})
  config.num_train_steps = {NUM_STEPS}
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.preview_every_steps = 1000
  config.eval.after_training = False
  config.sample.num_images = 2
  config.sample.batch_size = 2
  config.sample.sampler = "ddim"
  config.sample.num_steps = 2
  return config
""")
  return str(path)


def _env():
  env = {k: v for k, v in os.environ.items()
         if k == "DJ_CPU_DEVICES" or not k.startswith("DJ_") and k != "XLA_FLAGS"}
  env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _main(config_file, workdir, *extra, driver=()):
  command = [sys.executable, *(driver or ["-m", "diffusion_jax.main"]), *(["--"] if driver else []),
             f"--config={config_file}", f"--workdir={workdir}", *extra]
  return subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)


def _final_state(workdir, step=NUM_STEPS):
  """Every leaf of the checkpoint at `step`, as numpy, keyed by path."""
  manager = checkpoint.make_manager(workdir)
  restored = manager.restore(step)
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(restored)}


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference") / "run"
  out = _main(config_file, workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  return _final_state(workdir)


# The default tier kills mid-save (the hard case); between saves and after the last one run in the slow tier.
@pytest.mark.parametrize("where, step", [pytest.param("between", 4, marks=pytest.mark.slow), ("during", 4),
                                         pytest.param("after", 6, marks=pytest.mark.slow)])
def test_sigkill_then_rerun_gives_the_uninterrupted_bits(config_file, reference, tmp_path, where, step):
  workdir = tmp_path / "run"
  killed = _main(config_file, workdir, driver=[os.path.join(HERE, "fault_driver.py"), where, str(step)])
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not os.path.exists(workdir / "checkpoints" / str(NUM_STEPS))
  resumed = _main(config_file, workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  expected_start = step - 2 if where == "during" else step  # a half-written save is not a checkpoint
  assert f"at step {expected_start}" in resumed.stderr or (where == "during" and f"at step {step}" in resumed.stderr)
  state = _final_state(workdir)
  assert state.keys() == reference.keys() and len(state) > 50
  for key, value in reference.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)


def _start(config_file, workdir, *extra):
  command = [sys.executable, "-m", "diffusion_jax.main", f"--config={config_file}", f"--workdir={workdir}",
             "--config.num_train_steps=100000", "--config.checkpoint_every_steps=1000", *extra]
  return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env(),
                          cwd=ROOT)


def _wait_for_step(proc, step):
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if f"train step {step}/" in line:
      return lines
  raise AssertionError("the run ended before step %d:\n%s" % (step, "".join(lines[-40:])))


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143),
                                          pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_a_signal_saves_the_step_reached_and_the_rerun_loses_none(config_file, tmp_path, signum, code):
  workdir = tmp_path / "run"
  proc = _start(config_file, workdir)
  _wait_for_step(proc, 3)
  sent = time.time()
  proc.send_signal(signum)
  rest = proc.stderr.read()
  proc.wait(timeout=60)
  assert proc.returncode == code, rest[-3000:]
  assert time.time() - sent < 30
  last = rest.strip().splitlines()[-1]
  assert "Traceback" not in rest and "rerun the same command to resume" in last, rest[-3000:]
  saved = int(last.split("saved step ")[1].split()[0])
  assert saved >= 3 and f"on {signal.Signals(signum).name}" in last
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(saved)]
  rerun = _main(config_file, workdir, f"--config.num_train_steps={saved + 1}")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from {workdir / 'checkpoints'} at step {saved}" in rerun.stderr
  assert f"train: steps {saved}..{saved + 1}" in rerun.stderr


def test_a_second_signal_exits_at_once(config_file, tmp_path):
  proc = _start(config_file, tmp_path / "run")
  _wait_for_step(proc, 2)
  proc.send_signal(signal.SIGINT)  # two different signals: the kernel would merge two pending SIGTERMs
  proc.send_signal(signal.SIGTERM)
  rest = proc.stderr.read()
  proc.wait(timeout=60)
  # Sent back to back, both can be pending while the step runs (it runs on the main thread: host_memory), so
  # which one the process handles second is the runtime's choice; that one must name itself and exit at once.
  second = re.search(r"second (SIGTERM|SIGINT): exiting now", rest)
  assert second, rest[-3000:]
  assert proc.returncode == 128 + signal.Signals[second.group(1)], (proc.returncode, rest[-3000:])
