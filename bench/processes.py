"""The train step over several local processes (jax.distributed over gloo, one CPU device each; what a multi-host
CPU run does), with its gradients averaged as one flat vector (train_state.flat_reduced_value_and_grad, the default
there) or as XLA's tuple of one buffer per parameter, in alternating rounds in the same processes; and the peer,
diffusers' UNet2DModel under PyTorch's DistributedDataParallel over gloo (its gradients in 25 MB buckets), the same
global batch split over as many processes.

python bench/processes.py [--cases fmnist_small] [--processes 2] [--steps 5] [--rounds 3] [--threads 1] [--no-peer]
  [--batch B] [--set model.ch=8 ...  (this project's side only: with --no-peer)]

Each process gets global batch / processes images and --threads threads (XLA:CPU's pool or torch's); pinning is
left to the OS. The cases are bench/vs_peers.py's (the same U-Net on both sides, the peer also clipping and keeping
an EMA where this project's config does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from common import free_port, print_table, run_local_processes


def run_side(side: str, case: str, args) -> dict:
  """Start args.processes workers of one side; process 0's JSON line."""
  port = free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "OMP_NUM_THREADS": str(args.threads)}
  cmd = lambda pid: [sys.executable, os.path.abspath(__file__), "--worker", side, case, str(port), str(pid),
                     "--processes", str(args.processes), "--steps", str(args.steps), "--rounds", str(args.rounds),
                     "--threads", str(args.threads), "--batch", str(batch_size(case, args))] + [
                     f"--set={item}" for item in args.set]
  return run_local_processes(cmd, args.processes, env, f"{side} worker", timeout_s=3600)


def ours_worker(case_name: str, port: int, pid: int, args) -> dict:
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=args.processes, process_id=pid)
  import vs_peers
  from common import TrainStepSetup

  from diffusion_jax import train
  from diffusion_jax.config import load_config
  from diffusion_jax.parallel import multihost
  case = vs_peers.CASES[case_name]
  setup = TrainStepSetup(load_config("cifar10_ddpm", vs_peers.case_overrides(case, args.set, args.batch)))
  steps, compile_s = {}, {}
  for form, flat in (("flat", True), ("tuple", False)):
    t0 = time.perf_counter()
    step = train.compile_train_step(setup.parts, setup.mesh, setup.shardings, batch_size=args.batch,
                                    flat_reduce=flat)
    steps[form] = multihost.compile_then_wait(step, setup.state, setup.batch, setup.key, None, name=f"bench_{form}")
    compile_s[form] = time.perf_counter() - t0
  state, times = setup.state, {form: [] for form in steps}
  for r in range(args.rounds + 1):  # the first round warms up
    for form, step in steps.items():
      for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, setup.batch, setup.key, None)
        jax.block_until_ready(metrics)
        if r:
          times[form].append(time.perf_counter() - t0)
  return {"params": setup.params, "compile_s": compile_s, "times": times}


def peer_worker(case_name: str, port: int, pid: int, args) -> dict:
  import torch
  import torch.distributed as dist
  import vs_peers
  dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=pid, world_size=args.processes)
  case = vs_peers.CASES[case_name]
  config_args = argparse.Namespace(set=[], batch=None, peer_step="same")
  grad_clip, ema_decay = vs_peers.peer_step_extras(case_name, config_args)
  peer = vs_peers.Peer(case, 1, args.threads, args.batch // args.processes, "cpu", False, grad_clip, ema_decay)
  peer.model = torch.nn.parallel.DistributedDataParallel(peer.model)  # broadcasts rank 0's parameters
  peer.train_steps(2)
  times = []
  for r in range(args.rounds):
    dist.barrier()
    times += peer.train_steps(args.steps)
  dist.destroy_process_group()
  return {"params": peer.params, "times": {"ddp": times}}


def batch_size(case_name: str, args) -> int:
  import vs_peers
  return args.batch or vs_peers.CASES[case_name]["batch"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default="fmnist_small")
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per round and form")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--threads", type=int, default=1, help="threads per process (XLA:CPU's pool; torch's)")
  parser.add_argument("--no-peer", action="store_true")
  parser.add_argument("--batch", type=int, default=0, help="global batch (default: the case's)")
  parser.add_argument("--set", action="append", default=[], help="override of this project's config (with --no-peer)")
  parser.add_argument("--worker", nargs=4, metavar=("SIDE", "CASE", "PORT", "PROCESS_ID"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  import vs_peers
  if args.worker:
    side, case_name, port, pid = args.worker
    if side == "ours":
      os.environ["PJRT_NPROC"] = str(args.threads)  # XLA:CPU's thread pools (read when its client starts)
      from common import host_memory_as_main
      host_memory_as_main()  # as main runs (vs_peers.py's peer runs without it too)
    out = (ours_worker if side == "ours" else peer_worker)(case_name, int(port), int(pid), args)
    if int(pid) == 0:
      print(json.dumps(out), flush=True)
    return
  names = args.cases.split(",")
  unknown = [n for n in names if n not in vs_peers.CASES]
  if unknown:
    parser.error(f"unknown case(s) {unknown}; choose from {sorted(vs_peers.CASES)}")
  if args.processes < 2 or any(batch_size(n, args) % args.processes for n in names):
    parser.error(f"--processes {args.processes}: expected at least 2, dividing the global batch of each case")
  if args.set and not args.no_peer:
    parser.error(f"--set {args.set} changes this project's U-Net only: add --no-peer")
  why_no_peer = "" if args.no_peer else vs_peers.peer_available()
  if why_no_peer:
    print(f"no peer ({why_no_peer}); this project's rows only. {vs_peers.PEER_INSTALL}")
    args.no_peer = True
  rows = []
  for name in names:
    ours = run_side("ours", name, args)
    peer = None if args.no_peer else run_side("peer", name, args)
    batch = batch_size(name, args)
    medians = {form: float(np.median(t)) * 1e3 for form, t in ours["times"].items()}
    if peer:
      medians["ddp"] = float(np.median(peer["times"]["ddp"])) * 1e3
    what = {"flat": "this project, gradients as one flat vector (the default here)",
            "tuple": "this project, XLA's tuple all-reduce (one buffer per parameter)",
            "ddp": "diffusers UNet2DModel, PyTorch DistributedDataParallel"}
    for form, ms in medians.items():
      rows.append(dict(case=name, what=what[form], ms_per_step=f"{ms:.1f}", images_per_s=f"{batch / ms * 1e3:.1f}",
                       vs_flat=f"{medians['flat'] / ms:.2f}x" if form != "flat" else "1.00x",
                       params=ours["params"] if form != "ddp" else peer["params"]))
  print(f"\n{args.processes} local processes (gloo), 1 device and {args.threads} thread(s) each, median of "
        f"{args.rounds} x {args.steps} steps per form\n")
  print_table(rows)


if __name__ == "__main__":
  main()
