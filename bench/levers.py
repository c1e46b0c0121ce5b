"""One-process A/B of train-step variants of one config: each variant compiled once, then timed in alternating
rounds (so drift of the machine falls on every variant alike), median ms per step, images/s, MFU and the ratio to
the first variant.

python bench/levers.py --config cifar10_ddpm --batch 128 --set model.dtype=bfloat16 --peak-tflops 989 \
  --variant base --variant "rbg=key:rbg" --variant "cudnn=model.attention_impl=cudnn" \
  --variant "no_cmdbuf=xla:xla_gpu_enable_command_buffer=" [--rounds 5 --steps 4] [--profile DIR]

A variant is LABEL or LABEL=ITEM;ITEM;... where an ITEM is
  a.b=value            a config override (as --config.a.b on main)
  xla:NAME=VALUE       an XLA debug option for this variant's compile only (jit's compiler_options)
  key:IMPL             the train key's PRNG implementation (threefry2x32, rbg, unsafe_rbg): dropout and noise
  gn:autodiff          GroupNorm's backward by autodiff of its XLA forward (the default: written out, and on
                       AVX-512 CPUs the native kernels; layers:NATIVE_GROUP_NORM=False keeps XLA's written-out one)
  conv:autodiff        XLA convs' gradients by autodiff (XLA:CPU canonicalizes them outside loops only), not
                       layers.xla_conv's explicitly NHWC/HWIO gradient convs
  dense:autodiff       1x1 convs' and attention projections' kernel gradients by autodiff (dy first), not
                       layers.tensordot_x_first's x-first form
  wtile:M              Winograd's output tile F(M x M, 3x3) for the convs that conv_impl gives Winograd (2 or 4)
  layers:NAME=VALUE    diffusion_jax.models.layers.NAME set to the Python literal VALUE while the variant is traced
--profile traces 3 steps of each variant and prints where its time goes (bench/common.summarize_trace; its
optimized HLO is written beside the trace as compiled_hlo.txt, to read op names against);
--pipelined adds each round's steps dispatched back to back and waited on once (as the training loop runs);
--budget-s stops compiling further variants after that many seconds (under a device's time limit).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import (TrainStepSetup, host_memory_as_main, load_config, native_conv_flops, print_table,
                    summarize_trace)

from diffusion_jax.loop import StepsInFlight
from diffusion_jax.models import layers
from diffusion_jax.parallel.mesh import make_mesh


def parse_variant(text: str) -> tuple[str, dict]:
  """'label=a.b=1;xla:f=v;key:rbg' -> (label, {'overrides', 'xla', 'key', 'gn', 'wtile', 'layers', 'dense',
  'conv'}) (see the module's docstring)."""
  label, _, items = text.partition("=")
  spec = {"overrides": [], "xla": {}, "key": None, "gn": None, "wtile": None, "layers": {}, "dense": None,
          "conv": None}
  for item in filter(None, items.split(";")):
    if item.startswith("xla:"):
      name, _, value = item[4:].partition("=")
      spec["xla"][name] = {"true": True, "false": False}.get(value.lower(), value)  # XLA wants bools as bools
    elif item.startswith("key:"):
      spec["key"] = item[4:]
    elif item.startswith("wtile:"):
      if not item[6:].isdigit() or int(item[6:]) not in layers.WINOGRAD_MATRICES:
        raise SystemExit(f"Winograd tile {item[6:]!r}: expected one of {tuple(layers.WINOGRAD_MATRICES)}, e.g. wtile:4")
      spec["wtile"] = int(item[6:])
    elif item.startswith("layers:"):
      name, _, value = item[7:].partition("=")
      if not hasattr(layers, name):
        raise SystemExit(f"variant item {item!r}: diffusion_jax.models.layers has no {name!r}")
      spec["layers"][name] = ast.literal_eval(value)
    elif item.startswith("dense:"):
      if item != "dense:autodiff":
        raise SystemExit(f"unknown Dense/1x1 conv variant {item!r}; expected dense:autodiff")
      spec["dense"] = "autodiff"
    elif item.startswith("conv:"):
      if item != "conv:autodiff":
        raise SystemExit(f"unknown XLA conv variant {item!r}; expected conv:autodiff")
      spec["conv"] = "autodiff"
    elif item.startswith("gn:"):
      if item != "gn:autodiff":
        raise SystemExit(f"unknown GroupNorm variant {item!r}; expected gn:autodiff")
      spec["gn"] = "autodiff"
    elif "=" in item:
      spec["overrides"].append(item)
    else:
      raise SystemExit(f"variant item {item!r} is none of a.b=value, xla:NAME=VALUE, key:IMPL, gn:autodiff, "
                       "conv:autodiff, dense:autodiff, wtile:M, layers:NAME=VALUE")
  return label, spec


def _autodiff_xla_conv(x, kernel, stride=1, operand_dtype=None):
  """layers.xla_conv's value with autodiff's gradients (XLA's conv throughout, no native kernels)."""
  if operand_dtype is None:
    return layers._conv_nhwc(x, kernel, stride)
  return layers._conv_nhwc(x.astype(operand_dtype), kernel.astype(operand_dtype), stride, out_dtype=x.dtype)


def _autodiff_group_norm(x, scale, bias, num_groups, epsilon, silu=False):
  """GroupNorm (+SiLU) as the written-out one's forward, differentiated by JAX (the 'before' of that lever)."""
  return layers._group_norm_fwd(x, scale, bias, num_groups, epsilon, silu)[0]


@contextlib.contextmanager
def layers_patched(name: str, value):
  """diffusion_jax.models.layers.<name> set to `value` while a variant is traced (None: left as it is)."""
  original = getattr(layers, name)
  if value is not None:
    setattr(layers, name, value)
  try:
    yield
  finally:
    setattr(layers, name, original)


def mfu(flops: float, seconds: float, peak_tflops: float) -> str:
  """Model FLOPs utilization as a table cell ('-' without a peak or a FLOP count)."""
  if not (peak_tflops and flops):
    return "-"
  return f"{flops / seconds / (peak_tflops * 1e12) * 100:.1f}%"


def time_steps(run: dict, steps: int) -> None:
  """`steps` calls of a variant's compiled step on its own (donated) state, each timed to the result."""
  for _ in range(steps):
    t0, cpu0 = time.perf_counter(), time.process_time()
    run["state"], metrics = run["compiled"](run["state"], run["batch"], run["key"], None)
    jax.block_until_ready(metrics)
    run["times"].append(time.perf_counter() - t0)
    run.setdefault("cpu_s", []).append(time.process_time() - cpu0)  # every thread's CPU time in the step


def time_pipelined(run: dict, steps: int) -> None:
  """`steps` calls dispatched back to back, at most loop.MAX_STEPS_IN_FLIGHT ahead, as the training loop runs: the
  host's dispatch of one step overlaps the device's work on the one before."""
  t0 = time.perf_counter()
  in_flight = StepsInFlight()
  for _ in range(steps):
    run["state"], metrics = run["compiled"](run["state"], run["batch"], run["key"], None)
    in_flight.dispatched(metrics)
  jax.block_until_ready(metrics)
  run["pipelined"].append((time.perf_counter() - t0) / steps)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="cifar10_ddpm")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--set", action="append", default=[], help="override for every variant, e.g. --set model.ch=16")
  parser.add_argument("--variant", action="append", default=[], help="LABEL[=ITEM;ITEM...] (see the docstring)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
  parser.add_argument("--peak-tflops", type=float, default=0.0, help="MFU's denominator (0: no MFU column)")
  parser.add_argument("--gflop-per-image", type=float, default=0.0,
                      help="FLOPs per image where the backend's lowering gives no cost analysis (seen on a GPU with "
                           "jax 0.11.2); take it from a CPU run's gflop / batch with the same conv_impl")
  parser.add_argument("--pipelined", action="store_true",
                      help="also time each round's steps dispatched back to back (column ms_pipelined)")
  parser.add_argument("--budget-s", type=float, default=0.0,
                      help="compile no further variant after this many seconds (0: no limit), so a run under a time "
                           "limit still times the variants it has in alternating rounds and prints its table")
  parser.add_argument("--profile", default=None, help="trace 3 steps of each variant into DIR/LABEL")
  parser.add_argument("--cpu-devices", type=int, default=0,
                      help="XLA:CPU devices to split the host into (0: auto, as main does)")
  parser.add_argument("--profile-only", default="", help="comma-separated labels to trace (default: every variant)")
  args = parser.parse_args()
  if args.steps < 1 or args.rounds < (1 if args.pipelined else 0):
    parser.error(f"--steps {args.steps} --rounds {args.rounds}: expected --steps >= 1 and --rounds >= 0 "
                 "(>= 1 with --pipelined)")
  variants = [parse_variant(v) for v in (args.variant or ["base"])]
  base = list(args.set) + ([f"batch_size={args.batch}"] if args.batch else [])
  from diffusion_jax.parallel.mesh import auto_host_devices_for_config, split_host_devices
  config = load_config(args.config, base)
  split_host_devices(args.cpu_devices or auto_host_devices_for_config(config, len(os.sched_getaffinity(0))))
  host_memory_as_main()
  runs, started = {}, time.perf_counter()
  for label, spec in variants:
    if args.budget_s and time.perf_counter() - started > args.budget_s:
      print(f"variant {label}: not compiled, past --budget-s {args.budget_s:g}")
      continue
    config = load_config(args.config, base + spec["overrides"])
    t0 = time.perf_counter()
    try:
      gn = _autodiff_group_norm if spec["gn"] == "autodiff" else None
      with contextlib.ExitStack() as patches:
        patches.enter_context(layers_patched("group_norm_affine", gn))
        if gn is not None:  # autodiff of the XLA formulation (the native kernels have no derivative rule)
          patches.enter_context(layers_patched("NATIVE_GROUP_NORM", False))
        patches.enter_context(layers_patched("WINOGRAD_TILE", spec["wtile"]))
        if spec["dense"] == "autodiff":
          autodiff_tensordot = lambda x, k, contract=1, operand_dtype=None: layers._tensordot(x, k, contract,
                                                                                          operand_dtype, x.dtype)
          # dot_general_x_first (the Dense layers') calls tensordot_x_first: autodiff's form there too
          patches.enter_context(layers_patched("tensordot_x_first", autodiff_tensordot))
        if spec["conv"] == "autodiff":
          patches.enter_context(layers_patched("xla_conv", _autodiff_xla_conv))
        for name, value in spec["layers"].items():
          patches.enter_context(layers_patched(name, value))
        setup = TrainStepSetup(config, make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp))
        key = setup.key if spec["key"] is None else jax.random.key(1, impl=spec["key"])
        lowered = setup.step.lower(setup.state, setup.batch, key, None)
        cost = lowered.cost_analysis()  # FLOPs of the program as written (None where the backend has none)
        compiled = lowered.compile(compiler_options=spec["xla"] or None)
    except Exception as e:  # an XLA option this jaxlib does not know, a variant that does not build: say so, go on
      print(f"variant {label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      continue
    cost = dict((cost[0] if isinstance(cost, (list, tuple)) else cost) or {})
    if cost.get("flops"):  # the native kernels' custom calls count 0 there
      cost["flops"] += native_conv_flops(compiled.as_text(), setup.mesh.size)
    if not cost.get("flops") and args.gflop_per_image:
      cost = {"flops": args.gflop_per_image * 1e9 * config.batch_size}
    elif not cost.get("flops") and args.peak_tflops:
      print(f"variant {label}: no cost analysis on {jax.default_backend()}; MFU needs --gflop-per-image")
    state, metrics = compiled(setup.state, setup.batch, key, None)  # first call outside the timing
    jax.block_until_ready(metrics)
    memory = compiled.memory_analysis()  # XLA's temporaries per device (None where the backend has no analysis)
    runs[label] = dict(compiled=compiled, state=state, batch=setup.batch, key=key, times=[], pipelined=[],
                       temp_mb=getattr(memory, "temp_size_in_bytes", 0) / 2 ** 20 if memory else float("nan"),
                       compile_s=time.perf_counter() - t0, flops=float(cost.get("flops", 0.0)),
                       batch_size=config.batch_size, loss=float(metrics["loss"]))
    run = runs[label]
    time_steps(run, args.steps)  # a first reading now, so a run cut short still says something
    print(f"compiled {label} in {run['compile_s']:.1f} s (first loss {run['loss']:.4f}); "
          f"{np.median(run['times']) * 1e3:.2f} ms per step", flush=True)
  if not runs:
    raise SystemExit("no variant built (each one's reason is above)")
  for _ in range(args.rounds):
    for run in runs.values():
      time_steps(run, args.steps)
      if args.pipelined:
        time_pipelined(run, args.steps)
  rows, first = [], None
  for label, run in runs.items():
    med = float(np.median(run["times"]))
    first = first or med
    rows.append(dict(variant=label, compile_s=f"{run['compile_s']:.1f}", ms_per_step=f"{med * 1e3:.2f}",
                     images_per_s=f"{run['batch_size'] / med:.0f}", vs_first=f"{first / med:.3f}x",
                     mfu=mfu(run['flops'], med, args.peak_tflops),
                     gflop=f"{run['flops'] / 1e9:.0f}", temp_mb=f"{run['temp_mb']:.0f}",
                     cores_busy=f"{sum(run['cpu_s']) / sum(run['times']):.2f}"))
    if args.pipelined:
      piped = float(np.median(run["pipelined"]))
      rows[-1].update(ms_pipelined=f"{piped * 1e3:.2f}", mfu_pipelined=mfu(run['flops'], piped, args.peak_tflops))
  print(f"\nbackend {jax.default_backend()} ({jax.devices()[0].device_kind}), {jax.device_count()} devices, "
        f"{args.config} {' '.join(base)}; {args.rounds} rounds x {args.steps} steps, alternating\n")
  print_table(rows)
  if args.profile:
    only = set(filter(None, args.profile_only.split(",")))
    for label, run in runs.items():
      if only and label not in only:
        continue
      trace_dir = f"{args.profile}/{label}"
      jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
      for _ in range(3):
        run["state"], metrics = run["compiled"](run["state"], run["batch"], run["key"], None)
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()
      hlo_text = run["compiled"].as_text()
      with open(f"{trace_dir}/compiled_hlo.txt", "w") as f:  # to read the trace's op names against
        f.write(hlo_text)
      categories, ops = summarize_trace(trace_dir, hlo_text, 3, top=15)
      print(f"\nwhere the time goes: {label}\n")
      print_table(categories)
      print()
      print_table(ops)


if __name__ == "__main__":
  main()
