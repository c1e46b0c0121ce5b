"""Two processes x 2 CPU devices (jax.distributed over gloo) train (replicated and FSDP-sharded across the
processes), checkpoint and sample like one process (the whole job text-conditional)."""

import os
import signal
import socket
import subprocess
import sys

import numpy as np

from helpers import tiny_config, write_fake_fashion_mnist
from steps import run_steps

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_and_write_one_workdir(tmp_path):
  (tmp_path / "data").mkdir()
  data_dir = write_fake_fashion_mnist(str(tmp_path / "data"))
  workdir = str(tmp_path / "run")
  port = free_port()
  env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_worker.py"), str(port), str(i),
                             data_dir, workdir], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  losses = [np.array([float(x) for x in next(l for l in out.splitlines() if l.startswith("LOSSES")).split()[1:]])
            for out in outs]
  np.testing.assert_allclose(losses[0], losses[1], rtol=0)  # both processes see the same global loss
  # The same global batches on one process (8 local devices) give the same losses.
  single = run_steps(tiny_config(data_dir), num_steps=3)
  np.testing.assert_allclose(losses[0], single, rtol=1e-5)
  # FSDP over both processes (fsdp=4: params, EMA and Adam moments split across the processes) trains alike.
  for out in outs:
    fsdp = [float(x) for x in next(l for l in out.splitlines() if l.startswith("FSDP_LOSSES")).split()[1:]]
    np.testing.assert_allclose(fsdp, single, rtol=1e-5)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  samples = np.load(os.path.join(workdir, "samples", "samples.npz"))
  assert samples["images"].shape == (10, 16, 16, 1)
  assert samples["prompts"][0] == "a photo of a t-shirt"


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
