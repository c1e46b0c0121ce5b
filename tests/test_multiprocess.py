"""Two processes x 2 CPU devices (jax.distributed over gloo) train, checkpoint and sample like one process
(the whole job text-conditional)."""

import os
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
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  samples = np.load(os.path.join(workdir, "samples", "samples.npz"))
  assert samples["images"].shape == (10, 16, 16, 1)
  assert samples["prompts"][0] == "a photo of a t-shirt"
