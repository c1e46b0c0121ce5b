"""This project's U-Net vs diffusers' UNet2DModel, the same architecture and batch, timed in one run.

python bench/vs_peers.py [--cases fmnist_small,ddpm_cifar10] [--steps 10] [--rounds 3] [--batch N] [--no-peer]
  [--no-rss] [--peer-device cpu|cuda] [--peer-precision same|float32] [--set model.dtype=bfloat16 ...]

With `model.dtype=bfloat16` the peer runs under `torch.autocast(bfloat16)` (mixed precision, as diffusers'
training scripts do), so both sides compute in bfloat16 with float32 weights. With `model.conv_precision=bfloat16`
and / or `model.matmul_precision=bfloat16` (this project's convs' / Dense layers' operands in bfloat16, everything
else in float32; both together are autocast's policy but for attention's own two products) the peer runs under
autocast too: its convs and matmuls in bfloat16, its normalizations in float32. `--peer-precision float32` keeps
the peer in float32 whatever this project computes in (how a user who runs diffusers' defaults would compare).

Per case: (a) a training step (t and noise drawn, q_sample, MSE on eps, backward, Adam; this project's is its
real `train.compile_train_step`, which also updates the EMA and clips gradients as configured; with the default
`--peer-step same` the peer does that work too, as diffusers' train_unconditional.py does: clip_grad_norm_ and
EMAModel.step; `--peer-step adam` leaves the peer at Adam alone, the issue's first table) and (b) one
no-grad network evaluation inside an ancestral DDPM sampling loop (this project: `sampling.make_sample_fn`, one
compiled lax.scan over the steps; the peer: a Python loop of `model(x, t)` and the DDPM update, eval mode).
Runs alternate (ours, peer, ours, ...) in `--rounds` rounds of `--steps` calls each, after warm-up; the
median over all calls is reported. Each side runs in a process of its own, driven over pipes (`--one-process`
times both in this one, as before 2026-11-28; see Worker for why not). `--rss` (default on) also runs each side's
train step alone in a fresh process and reports its peak resident memory: the whole process's (ours includes XLA's
compile, whose transient set our bfloat16 peak on fmnist_small) and the steps' own (the peak reset after ours
compiled and the peer's model was built).

The peer is optional: `pip install torch==2.13.0` (the CPU wheel) and
`pip install --no-deps diffusers==0.42.1 && pip install huggingface_hub safetensors regex requests filelock
importlib_metadata Pillow`; without it only this project's rows are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

# The U-Net of each case, as this project's config overrides on configs/cifar10_ddpm.py and as diffusers'
# UNet2DModel arguments. google/ddpm-cifar10-32's config is the second; the first is the issue's small CPU
# model (attention at 8x8 and in the middle, as DDPM).
CASES = {
    "fmnist_small": dict(
        batch=64, overrides=["data.channels=1", "model.ch=32", "model.ch_mult=(1,2,2)", "model.num_res_blocks=1",
                             "model.attn_resolutions=(8,)", "model.dropout=0.0", "batch_size=64"],
        peer=dict(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                  layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), dropout=0.0)),
    "ddpm_cifar10": dict(
        batch=16, overrides=["batch_size=16"],
        peer=dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                  layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                        "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1)),
}
# What google/ddpm-cifar10-32 sets beside the blocks (DDPM's GroupNorm eps, timestep embedding, one head).
PEER_COMMON = dict(norm_eps=1e-6, norm_num_groups=32, attention_head_dim=None, downsample_padding=0,
                   flip_sin_to_cos=False, freq_shift=1, time_embedding_type="positional", act_fn="silu")
PEER_INSTALL = ("pip install torch==2.13.0 && pip install --no-deps diffusers==0.42.1 && pip install huggingface_hub "
                "safetensors regex requests filelock importlib_metadata Pillow")


# ---------------------------------------------------------------- this project

class Ours:
  """This project's compiled train step and sampling loop for one case."""

  def __init__(self, case: dict, extra_overrides: list[str], sample_steps: int, batch: int, sampler: bool = True):
    import jax
    from common import TrainStepSetup

    from diffusion_jax.config import load_config
    from diffusion_jax.sampling import SampleSettings, make_sample_fn
    self.jax = jax
    config = load_config("cifar10_ddpm", case_overrides(case, extra_overrides, batch))
    self.batch_size = config.batch_size
    setup = TrainStepSetup(config)
    mesh, parts, self.state, self.params = setup.mesh, setup.parts, setup.state, setup.params
    self.batch, self.key = setup.batch, setup.key
    t0 = time.perf_counter()
    self.step = setup.step.lower(self.state, self.batch, self.key, None).compile()
    self.compile_s = time.perf_counter() - t0
    if not sampler:  # the memory run: the train step alone, as the peer's, after the compile as the loop runs it
      from diffusion_jax.host_memory import release_freed_host_memory
      release_freed_host_memory()
      return
    settings = SampleSettings(sampler="ddpm", num_steps=sample_steps)
    self.sample_steps = sample_steps
    self.sample_fn = make_sample_fn(parts.model, parts.schedule, settings, mesh, parts.input_shape,
                                    prediction=parts.diffusion.prediction, variance=parts.diffusion.variance)
    t0 = time.perf_counter()
    jax.block_until_ready(self.sample_fn(self.state.ema_params, self.key, config.batch_size))
    self.sample_compile_s = time.perf_counter() - t0

  def train_steps(self, n: int) -> list[float]:
    times = []
    for _ in range(n):
      t0 = time.perf_counter()
      self.state, metrics = self.step(self.state, self.batch, self.key, None)
      self.jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    return times

  def sample_evals(self, n: int) -> list[float]:
    """Seconds per network evaluation, one entry per sampling loop of `sample_steps` evaluations."""
    times = []
    for i in range(n):
      t0 = time.perf_counter()
      self.jax.block_until_ready(self.sample_fn(self.state.ema_params, self.jax.random.key(i), self.batch_size))
      times.append((time.perf_counter() - t0) / self.sample_steps)
    return times


# ---------------------------------------------------------------- the peer

def peer_available() -> str:
  """'' when torch and diffusers import, else why not."""
  try:
    import diffusers  # noqa: F401
    import torch  # noqa: F401
  except Exception as e:  # noqa: BLE001  (any import failure means: no peer)
    return f"{type(e).__name__}: {e}"
  return ""


class Peer:
  """diffusers' UNet2DModel, the same train step in eager PyTorch (what a diffusers training script does)."""

  def __init__(self, case: dict, sample_steps: int, threads: int, batch: int, device: str, bfloat16: bool,
               grad_clip: float = 0.0, ema_decay: float = 0.0):
    import contextlib
    import torch
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.torch, self.device = torch, device
    self.model = UNet2DModel(**case["peer"], **PEER_COMMON).to(device)
    self.params = sum(p.numel() for p in self.model.parameters())
    self.opt = torch.optim.Adam(self.model.parameters(), lr=2e-4)
    # What diffusers' train_unconditional.py adds to Adam, when this project's config does the same work:
    # clip_grad_norm_ and an EMAModel (foreach, its fastest update; the same min(decay, (1+n)/(10+n)) warm-up).
    self.grad_clip = grad_clip
    self.ema = EMAModel(self.model.parameters(), decay=ema_decay, foreach=True) if ema_decay > 0 else None
    self.autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bfloat16 else contextlib.nullcontext
    c = case["peer"]["in_channels"]
    size = case["peer"]["sample_size"]
    self.images = torch.rand(batch, c, size, size, device=device) * 2 - 1
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64, device=device)  # DDPM's linear schedule
    self.alphas = 1 - betas
    self.alphas_cumprod = torch.cumprod(self.alphas, 0)
    self.betas = betas
    self.sample_steps = sample_steps
    t0 = time.perf_counter()
    self.train_steps(1)
    self.first_step_s = time.perf_counter() - t0

  def sync(self) -> None:
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def train_steps(self, n: int) -> list[float]:
    torch = self.torch
    self.model.train()
    acp = self.alphas_cumprod.float()
    times = []
    for _ in range(n):
      t0 = time.perf_counter()
      x0 = self.images
      t = torch.randint(0, 1000, (x0.shape[0],), device=self.device)
      noise = torch.randn_like(x0)
      a = acp[t].view(-1, 1, 1, 1)
      x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # q_sample (DDPM eq. 4)
      with self.autocast():
        eps = self.model(x_t, t).sample
      loss = torch.nn.functional.mse_loss(eps.float(), noise)
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      if self.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
      self.opt.step()
      if self.ema is not None:
        self.ema.step(self.model.parameters())
      self.sync()
      times.append(time.perf_counter() - t0)
    return times

  def sample_evals(self, n: int) -> list[float]:
    """The ancestral DDPM update (eq. 11, sigma^2 = beta) on a respaced grid of `sample_steps` timesteps."""
    torch = self.torch
    self.model.eval()
    grid = np.linspace(0, 999, self.sample_steps).round().astype(int)[::-1]
    acp = self.alphas_cumprod
    times = []
    with torch.no_grad(), self.autocast():
      for _ in range(n):
        t0 = time.perf_counter()
        x = torch.randn_like(self.images)
        for i, t in enumerate(grid):
          prev = acp[grid[i + 1]] if i + 1 < len(grid) else torch.tensor(1.0, dtype=torch.float64)
          a_t, beta = float(acp[t]), float(1 - acp[t] / prev)
          eps = self.model(x, torch.full((x.shape[0],), int(t), device=self.device)).sample.float()
          mean = (x - beta / (1 - a_t) ** 0.5 * eps) / (1 - beta) ** 0.5
          x = mean + beta ** 0.5 * torch.randn_like(x) if i + 1 < len(grid) else mean
        self.sync()
        times.append((time.perf_counter() - t0) / self.sample_steps)
    return times


# ---------------------------------------------------------------- one side per process

def child_command(role: str, side: str, case_name: str, args, steps: int) -> list[str]:
  """This script run again as `role` ('--rss-child' or '--worker') for one side of one case."""
  return [sys.executable, os.path.abspath(__file__), role, side, "--cases", case_name, "--steps", str(steps),
          "--sample-steps", str(args.sample_steps), "--threads", str(args.threads), "--peer-device", args.peer_device,
          "--cpu-devices", str(args.cpu_devices), "--peer-step", args.peer_step,
          "--peer-precision", args.peer_precision] + (
              ["--batch", str(args.batch)] if args.batch else []) + [a for o in args.set for a in ("--set", o)]


def side_env(side: str) -> dict:
  """A child's environment: the peer as a diffusers user runs it, without this project's glibc tunable and
  preloaded jemalloc (diffusion_jax.host_memory)."""
  env = dict(os.environ)
  if side == "peer":
    from diffusion_jax.host_memory import HUGE_PAGES_TUNABLE, JEMALLOC_CONF
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t != HUGE_PAGES_TUNABLE]
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    env["LD_PRELOAD"] = ":".join(p for p in env.get("LD_PRELOAD", "").split(":") if p and "jemalloc" not in p)
    if env.get("MALLOC_CONF") == JEMALLOC_CONF:
      del env["MALLOC_CONF"]
  return env


def peak_rss_mb(side: str, case_name: str, args) -> dict:
  """Peak resident memory (MB) of a fresh process that runs only `side`'s train step 3 times: {"rss_mb": the
  whole process's, "steps_rss_mb": from the first step on (after ours compiled; None where Linux would not reset
  the peak)}."""
  out = subprocess.run(child_command("--rss-child", side, case_name, args, 3), capture_output=True, text=True,
                       check=True, env=side_env(side)).stdout
  return json.loads(out.strip().splitlines()[-1])


# A worker's replies on stdout start with this, so a library's own prints there cannot be mistaken for one.
REPLY = "vs_peers-reply "


class Worker:
  """One side's runner in a process of its own, driven over pipes: the parent asks for rounds of train steps or
  sampling loops in turn, so the sides still alternate (a machine-wide slowdown hits both alike) without sharing
  a process. In one process they did: the peer's tensors came from the heap this project's glibc settings keep
  for reuse, and the first train step of each of our rounds then took ~0.75 s more, 1.5 s of it in the kernel
  (fmnist_small, an Intel Xeon host: 1450 ms against 690-710 for the others)."""

  def __init__(self, side: str, case_name: str, args):
    self.side = side
    self.proc = subprocess.Popen(child_command("--worker", side, case_name, args, 0), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=side_env(side))
    self.info = self._reply()
    for key, value in self.info.items():
      setattr(self, key, value)

  def _reply(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(REPLY):
        return json.loads(line[len(REPLY):])
    raise SystemExit(f"the {self.side} worker stopped (exit status {self.proc.wait()}); its error is above")

  def _ask(self, what: str, n: int) -> list[float]:
    self.proc.stdin.write(f"{what} {n}\n")
    self.proc.stdin.flush()
    return self._reply()["times"]

  def train_steps(self, n: int) -> list[float]:
    return self._ask("train", n)

  def sample_evals(self, n: int) -> list[float]:
    return self._ask("sample", n)

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def warmed_up(runner):
  """`runner` (Ours or Peer) after two train steps and a sampling loop beyond its compile or first step."""
  runner.train_steps(2)
  runner.sample_evals(1)
  return runner


def worker(side: str, case_name: str, args) -> None:
  """The --worker side of Worker: build and warm up, say what was built, then answer 'train N' / 'sample N'."""
  runner = warmed_up(Ours(*runner_args(case_name, args)) if side == "ours" else Peer(*peer_args(case_name, args)))
  info = {"params": runner.params,
          "batch_size": getattr(runner, "batch_size", args.batch or CASES[case_name]["batch"])}
  if side == "ours":
    import jax
    info.update(compile_s=runner.compile_s, sample_compile_s=runner.sample_compile_s,
                backend=jax.default_backend(), device_count=jax.device_count())
  else:
    info.update(first_step_s=runner.first_step_s)
  print(REPLY + json.dumps(info), flush=True)
  for line in sys.stdin:
    what, n = line.split()
    times = runner.train_steps(int(n)) if what == "train" else runner.sample_evals(int(n))
    print(REPLY + json.dumps({"times": times}), flush=True)


def rss_child(side: str, case_name: str, args) -> None:
  runner = Ours(*runner_args(case_name, args), sampler=False) if side == "ours" else Peer(*peer_args(case_name, args))
  before_steps = peak_rss_of_this_process()  # ours: XLA's compile's transient is in it
  reset = reset_peak_rss()
  runner.train_steps(args.steps)
  steps = peak_rss_of_this_process()
  print(json.dumps({"rss_mb": max(before_steps, steps), "steps_rss_mb": steps if reset else None}))


def reset_peak_rss() -> bool:
  """Linux's VmHWM reset to the current resident size (`5` to /proc/self/clear_refs); False where refused."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_of_this_process() -> float:
  """MB; VmHWM of this process's memory (getrusage's ru_maxrss would carry the parent's peak over exec)."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
  except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc: KB on Linux, bytes on macOS
    return peak / 1024 ** (2 if sys.platform == "darwin" else 1)


# ---------------------------------------------------------------- the table

def median_ms(times: list[float]) -> float:
  return float(np.median(times)) * 1e3


def case_overrides(case: dict, extra_overrides: list[str], batch: int) -> list[str]:
  """This project's config overrides for a case on configs/cifar10_ddpm.py: the case's, --set, the batch."""
  return case["overrides"] + list(extra_overrides) + [f"batch_size={batch}"]


def case_config(name: str, args):
  """This project's config of case `name` under the command line's --set and --batch."""
  from diffusion_jax.config import load_config
  return load_config("cifar10_ddpm", case_overrides(CASES[name], args.set, args.batch or CASES[name]["batch"]))


def runner_args(name: str, args) -> tuple:
  return CASES[name], args.set, args.sample_steps, args.batch or CASES[name]["batch"]


def peer_args(name: str, args) -> tuple:
  """The Peer's arguments; with --peer-step same, the gradient clipping and EMA of this project's config too."""
  bfloat16 = args.peer_precision == "same" and any(
      o.replace(" ", "").replace("'", "") in ("model.dtype=bfloat16", "model.conv_precision=bfloat16",
                                              "model.matmul_precision=bfloat16") for o in args.set)
  grad_clip, ema_decay = peer_step_extras(name, args)
  return (CASES[name], args.sample_steps, args.threads, args.batch or CASES[name]["batch"], args.peer_device, bfloat16,
          grad_clip, ema_decay)


def peer_step_extras(name: str, args) -> tuple[float, float]:
  """(grad_clip, ema_decay) the peer's step applies: this project's config's with --peer-step same, none with adam."""
  if args.peer_step == "adam":
    return 0.0, 0.0
  optim = case_config(name, args).optim
  return float(optim.grad_clip), float(optim.ema_decay)


def peer_step_text(grad_clip: float, ema_decay: float) -> str:
  """'Adam + clip_grad_norm_(1) + EMAModel(0.9999)': what the peer's train step does, for the table's header."""
  return "Adam" + (f" + clip_grad_norm_({grad_clip:g})" if grad_clip > 0 else "") + (
      f" + EMAModel({ema_decay:g})" if ema_decay > 0 else "")


def bench_case(name: str, args) -> list[dict]:
  if args.one_process:
    ours = warmed_up(Ours(*runner_args(name, args)))
    peer = None if args.no_peer else warmed_up(Peer(*peer_args(name, args)))
  else:
    ours = Worker("ours", name, args)
    peer = None if args.no_peer else Worker("peer", name, args)
  timings = {"ours_train": [], "peer_train": [], "ours_sample": [], "peer_sample": []}
  for _ in range(args.rounds):  # alternate, so a machine-wide slowdown hits both sides alike
    timings["ours_train"] += ours.train_steps(args.steps)
    if peer:
      timings["peer_train"] += peer.train_steps(args.steps)
    timings["ours_sample"] += ours.sample_evals(max(1, args.steps // 5))
    if peer:
      timings["peer_sample"] += peer.sample_evals(max(1, args.steps // 5))
  for side in (ours, peer):
    if isinstance(side, Worker):
      side.close()
  rss = {}
  if args.rss:
    rss["ours"] = peak_rss_mb("ours", name, args)
    if peer:
      rss["peer"] = peak_rss_mb("peer", name, args)
  b = ours.batch_size
  rows = []
  for what, label, compile_s in (("train", "train step", ours.compile_s),
                                 ("sample", "sampling network evaluation", ours.sample_compile_s)):
    ours_ms = median_ms(timings[f"ours_{what}"])
    row = {"case": name, "what": label, "batch": b, "params (ours / peer)":
           f"{ours.params:,} / {peer.params:,}" if peer else f"{ours.params:,} / -",
           "ours ms": f"{ours_ms:.1f}", "ours images/s": f"{b / ours_ms * 1e3:.1f}"}
    if peer:
      peer_ms = median_ms(timings[f"peer_{what}"])
      row.update({"peer ms": f"{peer_ms:.1f}", "peer images/s": f"{b / peer_ms * 1e3:.1f}",
                  "ratio (ours / peer, images/s)": f"{peer_ms / ours_ms:.2f}x"})
    else:
      row.update({"peer ms": "-", "peer images/s": "-", "ratio (ours / peer, images/s)": "-"})
    row["ours compile s"] = f"{compile_s:.1f}"
    row["peer first step s"] = f"{peer.first_step_s:.2f}" if peer and what == "train" else "-"
    row["peak RSS MB (ours / peer)"] = row["steps' own peak RSS MB (ours / peer)"] = "-"
    if what == "train" and rss:
      mb = lambda side, key: "-" if (rss.get(side) or {}).get(key) is None else f"{rss[side][key]:.0f}"
      row["peak RSS MB (ours / peer)"] = f"{mb('ours', 'rss_mb')} / {mb('peer', 'rss_mb')}"
      row["steps' own peak RSS MB (ours / peer)"] = f"{mb('ours', 'steps_rss_mb')} / {mb('peer', 'steps_rss_mb')}"
    rows.append(row)
  if isinstance(ours, Worker):
    args.backend_line = f"{ours.backend}, {ours.device_count} devices"
  else:
    import jax
    args.backend_line = f"{jax.default_backend()}, {jax.device_count()} devices"
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default="fmnist_small,ddpm_cifar10")
  parser.add_argument("--steps", type=int, default=10, help="timed train steps per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--sample-steps", type=int, default=10, help="network evaluations per timed sampling loop")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="the peer's torch threads")
  parser.add_argument("--batch", type=int, default=0, help="global batch of both sides (0: the case's)")
  parser.add_argument("--no-peer", action="store_true")
  parser.add_argument("--peer-device", default="cpu", choices=("cpu", "cuda"))
  parser.add_argument("--peer-step", default="same", choices=("same", "adam"),
                      help="same: the peer also clips gradients and keeps an EMA where this project's config does "
                           "(as diffusers' train_unconditional.py does); adam: Adam alone (the issue's first table)")
  parser.add_argument("--peer-precision", default="same", choices=("same", "float32"),
                      help="same: the peer under autocast when this project computes in bfloat16; float32: the peer "
                           "at its default float32 whatever this project does (the issue's own comparison)")
  parser.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--set", action="append", default=[], help="override of this project's config")
  parser.add_argument("--cpu-devices", type=int, default=0,
                      help="XLA:CPU devices this project's side splits the host into (0: auto, as main does)")
  parser.add_argument("--one-process", action="store_true",
                      help="time both sides in this process (before 2026-11-28: the peer's allocations then slowed "
                           "this project's steps); by default each side runs in its own process, rounds alternating")
  parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  names = args.cases.split(",")
  unknown = [n for n in names if n not in CASES]
  if unknown:
    parser.error(f"unknown case(s) {unknown}; choose from {sorted(CASES)}")
  from diffusion_jax.parallel.mesh import auto_host_devices_for_config, split_host_devices
  cores = len(os.sched_getaffinity(0))
  configs = {n: case_config(n, args) for n in names}
  auto = {n: auto_host_devices_for_config(config, cores) for n, config in configs.items()}
  if not args.cpu_devices and len(set(auto.values())) > 1:
    # One process has one host split: cases that main would split differently each run in their own process.
    print(f"automatic host devices differ per case ({auto}): each case runs in its own process")
    argv = list(sys.argv[1:] if argv is None else argv)
    for n in names:
      subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--cases", n], check=True)
    return
  split_host_devices(args.cpu_devices or auto[names[0]])
  if "peer" not in (args.rss_child, args.worker):  # the peer as a diffusers user runs it (see side_env)
    from common import host_memory_as_main
    host_memory_as_main()
  if args.rss_child:
    return rss_child(args.rss_child, names[0], args)
  if args.worker:
    return worker(args.worker, names[0], args)
  if not args.no_peer:
    why = peer_available()
    if why:
      print(f"no peer ({why}); this project's rows only. To compare with diffusers: {PEER_INSTALL}")
      args.no_peer = True
  from common import print_table
  rows = [r for n in names for r in bench_case(n, args)]
  peer_precision = " under autocast(bfloat16)" if peer_args(names[0], args)[5] else " in float32"
  peer_note = "" if args.no_peer else (f", peer torch eager on {args.peer_device}" + (
      f" with {args.threads} threads" if args.peer_device == "cpu" else "") + peer_precision + "; the peer's train step: "
      + "; ".join(f"{n} {peer_step_text(*peer_step_extras(n, args))}" for n in names))
  processes = "one process" if args.one_process else "one process per side"
  print(f"\nbackend {args.backend_line}{peer_note}; {processes}; median of "
        f"{args.rounds * args.steps} train steps and {args.rounds * max(1, args.steps // 5)} sampling loops of "
        f"{args.sample_steps} evaluations, alternating\n")
  print_table(rows)


if __name__ == "__main__":
  main()
