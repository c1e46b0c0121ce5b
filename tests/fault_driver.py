"""main's command line with a SIGKILL planted in the training loop (run by test_faults.py):
`python fault_driver.py between|during|after STEP -- <main's arguments>`.

between: after STEP's save has finished and one more step ran; during: right after STEP's asynchronous save
was started (its files half written); after: right after STEP's save finished."""

import os
import signal
import sys

from absl import app

from diffusion_jax import checkpoint, loop, main

where, kill_step = sys.argv[1], int(sys.argv[2])
argv = [sys.argv[0]] + sys.argv[sys.argv.index("--") + 1:]
real_save = checkpoint.save


def _kill():
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def save(manager, step, state):
  real_save(manager, step, state)
  if step == kill_step and where == "during":
    _kill()
  if step == kill_step and where == "after":
    manager.wait_until_finished()
    _kill()
  if step == kill_step and where == "between":
    manager.wait_until_finished()
    real_host_metrics = loop.host_metrics
    loop.host_metrics = lambda pending, s, policy="stop": _kill() if s > kill_step else real_host_metrics(
        pending, s, policy)


loop.checkpoint.save = save
app.run(main.main, argv=argv, flags_parser=main._parse_flags)
