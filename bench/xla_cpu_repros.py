"""XLA:CPU's slow spots that this project works around, each timed as the slow form and as the workaround, so
the upstream reports have a self-contained repro and a jax upgrade shows which workaround has become needless.

python bench/xla_cpu_repros.py [--cases repeat_broadcast,conv2x2_filter_grad,conv_grad_in_scan,conv3x3_filter_grad,
  gloo_tuple_all_reduce]
  [--reps 5] [--small]

One CPU device per case (two local processes for the gloo case). --small runs tiny shapes once (the test's mode:
the table is printed, the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from common import free_port, host_memory_as_main, median_ms, print_table, run_local_processes


def repeat_broadcast(small: bool, reps: int) -> tuple[float, float]:
  import jax
  import jax.numpy as jnp

  from diffusion_jax.models import layers
  b, hw, c, g = (2, 4, 12, 4) if small else (32, 32, 96, 32)  # 3 channels per group, as the U-Net's skip concat
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, hw, hw, c), np.float32))
  mul, add = (jnp.asarray(rng.standard_normal((b, g), np.float32)) for _ in range(2))
  expand = {"slow": lambda v: jnp.repeat(v, c // g, axis=1), "workaround": lambda v: layers._per_channel(v, c)}
  out = {}
  for form, fn in expand.items():
    f = jax.jit(lambda x, m, a: x * fn(m)[:, None, None, :] + fn(a)[:, None, None, :]).lower(x, mul, add).compile(
        layers.WIDE_MODEL_CPU_XLA_OPTIONS)
    out[form] = median_ms(f, x, mul, add, steps=reps)
  return out["slow"], out["workaround"]


def conv2x2_filter_grad(small: bool, reps: int) -> tuple[float, float]:
  import jax
  import jax.numpy as jnp

  from diffusion_jax.models import layers
  b, hw, cin, cout = (2, 4, 4, 8) if small else (32, 16, 64, 256)  # the 16 -> 32 sub-pixel upsampling conv
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, hw, hw, cin), np.float32))
  kernel = jnp.asarray(rng.standard_normal((2, 2, cin, cout), np.float32))
  dy = jnp.asarray(rng.standard_normal((b, hw + 1, hw + 1, cout), np.float32))
  out = {}
  for form, pad_first in (("slow", False), ("workaround", True)):
    grad = lambda x, k, dy, p=pad_first: jax.vjp(lambda k: layers._canonical_conv(x, k, 1, p), k)[1](dy)[0]
    with layers.native_convs(False):  # the cases time XLA's own convs
      f = jax.jit(grad).lower(x, kernel, dy).compile(layers.WIDE_MODEL_CPU_XLA_OPTIONS)
    out[form] = median_ms(f, x, kernel, dy, steps=reps)
  return out["slow"], out["workaround"]


def conv_grad_in_scan(small: bool, reps: int) -> tuple[float, float]:
  import jax
  import jax.numpy as jnp

  from diffusion_jax.models import layers
  b, hw, c = (4, 4, 4) if small else (32, 32, 32)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, b // 2, hw, hw, c), np.float32))  # 2 micro-batches
  kernel = jnp.asarray(rng.standard_normal((3, 3, c, c), np.float32))
  convs = {"slow": lambda x, k: layers._conv_nhwc(x, k, 1), "workaround": lambda x, k: layers.xla_conv(x, k)}
  out = {}
  for form, conv in convs.items():
    def accumulated_grad(kernel, x, conv=conv):
      body = lambda total, micro: (total + jax.grad(lambda k: jnp.sum(conv(micro, k) ** 2))(kernel), None)
      return jax.lax.scan(body, jnp.zeros_like(kernel), x)[0]
    with layers.native_convs(False):  # the cases time XLA's own convs
      f = jax.jit(accumulated_grad).lower(kernel, x).compile()
    out[form] = median_ms(f, kernel, x, steps=reps)
  return out["slow"], out["workaround"]


def conv3x3_filter_grad(small: bool, reps: int) -> tuple[float, float]:
  import jax
  import jax.numpy as jnp

  from diffusion_jax.models import layers, native
  b, hw, cin, cout = (2, 4, 8, 16) if small else (32, 32, 96, 32)  # fmnist_small's 32x32 skip concat -> 32
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, hw, hw, cin), np.float32))
  kernel = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32))
  dy = jnp.asarray(rng.standard_normal((b, hw, hw, cout), np.float32))
  if not native.available():
    raise SystemExit(f"--cases conv3x3_filter_grad: the native kernel is unavailable here "
                     f"({native.unavailable_reason()})")
  grads = {"slow": jax.jit(lambda x, k, dy: jax.vjp(lambda k: layers._canonical_conv(x, k, 1), k)[1](dy)[0]),
           "workaround": jax.jit(lambda x, k, dy: native.conv_filter_grad(x, dy, 3, 1))}
  out = {}
  for form, grad in grads.items():
    with layers.native_convs(False):  # the cases time XLA's own convs
      f = grad.lower(x, kernel, dy).compile(layers.WIDE_MODEL_CPU_XLA_OPTIONS)
    out[form] = median_ms(f, x, kernel, dy, steps=reps)
  return out["slow"], out["workaround"]


def gloo_tuple_all_reduce(small: bool, reps: int) -> tuple[float, float]:
  """Two local processes (this script as --gloo-worker), gloo collectives, one CPU device each."""
  port = free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  cmd = lambda pid: [sys.executable, os.path.abspath(__file__), "--gloo-worker", str(port), str(pid), str(reps)] + (
      ["--small"] if small else [])
  result = run_local_processes(cmd, 2, env, "gloo worker", timeout_s=600)
  return result["tuple"], result["flat"]


def gloo_worker(port: str, process_id: int, reps: int, small: bool) -> None:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  mesh = jax.make_mesh((2,), ("data",))
  total, count = (1000, 8) if small else (1112801, 184)  # fmnist_small's parameters, in its 184 tensors
  sizes = [total // count] * (count - 1) + [total - (count - 1) * (total // count)]
  local = lambda n: jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.ones((1, n), np.float32))
  reduce = jax.jit(lambda xs: jax.tree.map(lambda x: jnp.sum(x, 0), xs), out_shardings=NamedSharding(mesh, P()))
  out = {}
  for form, arrays in (("tuple", [local(n) for n in sizes]), ("flat", [local(total)])):
    out[form] = median_ms(reduce, arrays, steps=reps)
  if process_id == 0:
    print(json.dumps(out), flush=True)


# case -> (its runner, giving (slow ms, workaround ms); what XLA:CPU is slow at; the workaround here; upstream)
CASES = {
    "repeat_broadcast": (
        repeat_broadcast,
        "a [B,G] -> [B,C] jnp.repeat fused into an activation-sized multiply-add (c // k per element, not vectorised)",
        "layers._per_channel: the expansion as a dot with the [G,C] membership matrix", "not yet reported"),
    "conv2x2_filter_grad": (
        conv2x2_filter_grad,
        "the filter gradient of a 2x2 conv with its padding inside the gradient conv",
        "layers._canonical_conv_bwd(pad_first=True): x padded beforehand", "not yet reported"),
    "conv_grad_in_scan": (
        conv_grad_in_scan,
        "autodiff's conv filter gradient inside lax.scan (ConvCanonicalization skips loop bodies)",
        "layers.xla_conv: both gradients as explicit NHWC/HWIO convs", "jax-ml/jax#12868"),
    "conv3x3_filter_grad": (
        conv3x3_filter_grad,
        "the filter gradient of a narrow 3x3 conv (Eigen's contraction over B*H*W into [9 Cin, Cout]): ~60% of its "
        "forward's rate", "diffusion_jax.models.native.conv_filter_grad: an AVX-512 kernel (XLA FFI)",
        "not yet reported"),
    "gloo_tuple_all_reduce": (
        gloo_tuple_all_reduce,
        "a tuple all-reduce over gloo (multi-process CPU), one buffer at a time: the step's 184 gradient tensors",
        "train_state.flat_reduced_value_and_grad: the gradients as one flat array (bench/processes.py)",
        "not yet reported"),
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default=None, help="default: every case this host can run (the native kernel's "
                      "needs x86-64 with AVX-512 and a C++ compiler)")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--small", action="store_true", help="tiny shapes, for the test")
  parser.add_argument("--gloo-worker", nargs=3, metavar=("PORT", "PROCESS_ID", "REPS"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.gloo_worker:
    port, process_id, reps = args.gloo_worker
    return gloo_worker(port, int(process_id), int(reps), args.small)
  if args.cases is None:
    from diffusion_jax.models import native
    skip = native.host_unsupported_reason()
    if skip:
      print(f"conv3x3_filter_grad: not run ({skip})")
    args.cases = ",".join(n for n in CASES if not (skip and n == "conv3x3_filter_grad"))
  names = [n for n in args.cases.split(",") if n]
  unknown = [n for n in names if n not in CASES]
  if unknown:
    raise SystemExit(f"--cases {','.join(unknown)}: expected some of {','.join(CASES)}")
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  host_memory_as_main()  # page faults of freshly mapped buffers would otherwise dominate the small ops
  rows = []
  for name in names:
    runner, what, workaround, upstream = CASES[name]
    slow, fast = runner(args.small, args.reps)
    rows.append({"case": name, "XLA:CPU is slow at": what, "slow ms": f"{slow:.2f}", "workaround": workaround,
                 "workaround ms": f"{fast:.2f}", "slow / workaround": f"{slow / fast:.1f}x", "upstream": upstream})
    print(f"{name}: {slow:.2f} vs {fast:.2f} ms", flush=True)
  print()
  print_table(rows)


if __name__ == "__main__":
  main()
