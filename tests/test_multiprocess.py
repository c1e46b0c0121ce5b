"""Two and four processes x 2 CPU devices (jax.distributed over gloo) train (replicated and FSDP-sharded across the
processes) like one process, restore a checkpoint one process wrote on another mesh, and (2 processes, the slow tier)
run the whole job, latent and text-conditional, checkpointing and sampling into one workdir."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffusion_jax import build, checkpoint, train
from diffusion_jax.parallel.mesh import make_mesh
from helpers import tiny_config, write_fake_fashion_mnist
from steps import run_steps

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """Fake Fashion-MNIST, the single-process losses of 3 steps (8 local devices), and a checkpoint written by this
  process on a data 2 x fsdp 4 mesh with its leaves saved beside it as numpy (what the workers compare with)."""
  tmp = tmp_path_factory.mktemp("multiprocess")
  (tmp / "data").mkdir()
  data_dir = write_fake_fashion_mnist(str(tmp / "data"))
  config = tiny_config(data_dir)
  single = run_steps(config, num_steps=3)
  parts = build.build_components(config)
  state, _ = train.create_train_state(parts.model, parts.tx, jax.random.key(3), parts.input_shape,
                                      make_mesh(data=2, fsdp=4), parts.schedule.num_timesteps)
  state = state.replace(step=state.step + 5, ema_params=jax.tree.map(lambda x: x * 0.5, state.ema_params))
  manager = checkpoint.make_manager(str(tmp / "written"), async_save=False)
  checkpoint.save(manager, 5, state)
  manager.wait_until_finished()
  np.savez(tmp / "written" / "leaves.npz",
           **{f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))})
  return data_dir, single, str(tmp / "written")


def run_workers(num_processes: int, data_dir: str, workdir: str, checkpoint_workdir: str, whole_job: bool = False
                ) -> list[str]:
  port = free_port()
  env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_worker.py"), str(port), str(i),
                             str(num_processes), data_dir, workdir, checkpoint_workdir,
                             *(["job"] if whole_job else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for i in range(num_processes)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for i, out in enumerate(outs):  # kept beside the run for a look after a failure
    with open(os.path.join(os.path.dirname(workdir), f"process_{i}_of_{num_processes}.log"), "w") as f:
      f.write(out)
  failed = [f"process {i} (exit {p.returncode}): ...{out[-1500:]}" for i, (p, out) in enumerate(zip(procs, outs))
            if p.returncode != 0]
  assert not failed, "\n".join(failed)
  return outs


def printed(out: str, tag: str) -> list[float]:
  return [float(x) for x in next(l for l in out.splitlines() if l.startswith(tag + " ")).split()[1:]]


def assert_restored(out: str) -> None:
  """The worker restored every leaf equal, some of them sharded across the processes."""
  restored = next(l for l in out.splitlines() if l.startswith("RESTORED"))
  assert "leaves equal" in restored and int(restored.split(",")[1].split()[0]) > 0, restored


def test_two_processes_match_one_and_restore_a_checkpoint_written_on_another_mesh(written, tmp_path):
  data_dir, single, checkpoint_workdir = written
  outs = run_workers(2, data_dir, str(tmp_path / "run"), checkpoint_workdir)
  # FSDP over both processes (fsdp=4: params, EMA and Adam moments split across the processes): both see the same
  # global loss, and the same global batches on one process (8 local devices, replicated) give the same losses.
  losses = [np.array(printed(out, "FSDP_LOSSES")) for out in outs]
  np.testing.assert_allclose(losses[0], losses[1], rtol=0)
  np.testing.assert_allclose(losses[0], single, rtol=1e-5)
  # Replicated over both processes, the gradients averaged as one flat vector (one gloo all-reduce): the same.
  for out in outs:
    np.testing.assert_allclose(printed(out, "DP_LOSSES"), single, rtol=1e-5)
    assert printed(out, "FLAT_REDUCE_TRACES") == [1.0], "the multi-process CPU step should reduce one flat vector"
  # The checkpoint written on one process (data 2 x fsdp 4 of 8 devices) restores onto it leaf for leaf.
  for out in outs:
    assert_restored(out)


@pytest.mark.slow  # 100 s on 2 cores; the default tier runs main over 2 processes in the SIGTERM test below
def test_two_processes_run_the_whole_latent_text_job_into_one_workdir(tmp_path):
  """The whole job, latent and text-conditional, over 2 processes: one workdir, the latent scale computed once and
  broadcast from process 0 (process 1's own estimate doubled on purpose), prompted samples."""
  data_dir = write_fake_fashion_mnist(str(tmp_path))
  workdir = str(tmp_path / "run")
  outs = run_workers(2, data_dir, workdir, "", whole_job=True)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  scales = [printed(out, "LATENT_SCALE") for out in outs]
  written_scale = json.load(open(os.path.join(workdir, "autoencoder", "latent_scale.json")))["scale_factor"]
  assert scales[0] == scales[1] == [written_scale], (scales, written_scale)
  samples = np.load(os.path.join(workdir, "samples", "samples.npz"))
  assert samples["images"].shape == (10, 16, 16, 1)
  assert samples["prompts"][0] == "a photo of a t-shirt"


@pytest.mark.slow  # 140 s on 2 cores; the 2-process test runs the same checks across 2 processes
def test_four_processes_train_fsdp_sharded_across_all_and_restore_another_topology(written, tmp_path):
  """4 processes x 2 devices, fsdp=8: each large parameter is split over every process; losses match one process,
  and the one-process checkpoint restores onto the 4-process mesh. The last process starts 35 s late: the
  barrier after compiling (multihost.compile_then_wait) keeps gloo's 30 s peer limit from failing the others."""
  data_dir, single, checkpoint_workdir = written
  outs = run_workers(4, data_dir, str(tmp_path / "run"), checkpoint_workdir)
  for out in outs:
    np.testing.assert_allclose(printed(out, "FSDP_LOSSES"), single, rtol=1e-5)
    assert_restored(out)


def test_sigterm_to_both_processes_saves_one_agreed_step(tmp_path):
  """JAX's preemption service: each process gets SIGTERM, all stop at the same step and save it together."""
  data_dir = write_fake_fashion_mnist(str(tmp_path))
  (tmp_path / "tiny.py").write_text(f"""
from helpers import tiny_config


def get_config():
  config = tiny_config({data_dir!r})
  config.num_train_steps = 100000
  config.log_every_steps = 1
  config.checkpoint_every_steps = 100000
  config.preview_every_steps = 100000
  return config
""")
  port = free_port()
  procs = []
  for i in range(2):
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("DJ_")},
           "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "DJ_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "DJ_NUM_PROCESSES": "2", "DJ_PROCESS_ID": str(i)}
    procs.append(subprocess.Popen([sys.executable, "-m", "diffusion_jax.main", f"--config={tmp_path / 'tiny.py'}",
                                   f"--workdir={tmp_path / 'run'}"], stderr=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, text=True, env=env))
  for line in procs[0].stderr:
    if "train step 3/" in line:
      break
  for p in procs:
    p.send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=120)[1] for p in procs]
  steps = set()
  for p, out in zip(procs, outs):
    assert p.returncode == 143, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert "on SIGTERM" in last and "rerun the same command to resume" in last, out[-3000:]
    steps.add(int(last.split("saved step ")[1].split()[0]))
  assert len(steps) == 1 and os.listdir(tmp_path / "run" / "checkpoints") == [str(steps.pop())]
  # One log for the job: process 0 logs the steps, process 1 only its warnings and its last line.
  assert "train step" in outs[0] and "train step" not in outs[1], outs[1][-3000:]


BARRIER_SCRIPT = """
import sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from diffusion_jax.parallel import multihost
if jax.process_index() == 0:
  multihost.wait_for_all_processes("never_reached", timeout_s=3)
else:
  time.sleep(8)  # not there within the 3 s
"""


def test_a_process_that_never_reaches_a_barrier_is_one_timeout_line(tmp_path):
  """multihost.wait_for_all_processes: the processes that wait give up after timeout_s with one line naming the
  barrier (main prints it as one error line), instead of hanging."""
  address = f"127.0.0.1:{free_port()}"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, "-c", BARRIER_SCRIPT, address, str(i)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env) for i in range(2)]
  try:
    err = procs[0].communicate(timeout=120)[1]
  finally:
    procs[1].kill()
    procs[1].communicate()
  assert procs[0].returncode != 0
  assert re.search(r"TimeoutError: process 0 waited 3s at barrier 'never_reached' and not all 2 processes arrived",
                   err), err[-3000:]
