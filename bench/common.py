"""Helpers shared by the bench scripts: a config by name with `--set a.b=value` overrides (parsed by
diffusion_jax.config.load_config, exactly as main's --config.a.b flags), a table printer, a restored workdir."""

from __future__ import annotations

from typing import Callable

from diffusion_jax.config import load_config  # noqa: F401  (the scripts' one config loader)


def host_memory_as_main() -> None:
  """This process's host memory set up as main's (diffusion_jax.host_memory): glibc's huge pages and, on several
  host devices, jemalloc where installed (the command runs again with them) and the reused heap, so a bench times
  what `python -m diffusion_jax.main` runs; DJ_HOST_MEMORY=default times without. Call before any work and before
  JAX starts its CPU client, after XLA_FLAGS has the host's device count (parallel.mesh.split_host_devices)."""
  from diffusion_jax import host_memory
  host_memory.reexec_with_host_memory()
  host_memory.reuse_freed_heap()


def free_port() -> int:
  """A free local TCP port: the coordinator of a bench's local processes (jax.distributed or torch's)."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_local_processes(command_of: Callable[[int], list[str]], count: int, env: dict, what: str,
                        timeout_s: float) -> dict:
  """Run `count` local processes (command_of(process id)) to the end, each within timeout_s; process 0's JSON
  line. Each one's output goes to a file: a pipe left unread while another process is waited on could fill and
  stall it past gloo's 30 s peer limit. A failed process is one SystemExit line naming it, with its output's tail."""
  import json
  import os
  import subprocess
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    logs = [open(os.path.join(tmp, f"{pid}.log"), "w+") for pid in range(count)]
    procs = [subprocess.Popen(command_of(pid), stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
             for pid, log in enumerate(logs)]
    outs = []
    for p, log in zip(procs, logs):
      p.wait(timeout=timeout_s)
      log.seek(0)
      outs.append(log.read())
      log.close()
  for pid, (p, out) in enumerate(zip(procs, outs)):
    if p.returncode:
      raise SystemExit(f"{what} {pid} failed (exit status {p.returncode}): {out[-2000:]}")
  return json.loads(next(line for line in outs[0].splitlines() if line.startswith("{")))


def median_ms(fn, *args, steps: int) -> float:
  """Median milliseconds of `steps` calls of fn(*args), each waited on, after one call (the compile)."""
  import time

  import jax
  import numpy as np
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def print_table(rows: list[dict]) -> None:
  keys = list(rows[0])
  print("| " + " | ".join(keys) + " |")
  print("|" + "---|" * len(keys))
  for r in rows:
    print("| " + " | ".join(str(r[k]) for k in keys) + " |")


def restore_workdir(config, workdir: str):
  """A trained workdir's (mesh, components, decoder or None, text encoder or None, state) at its latest
  checkpoint."""
  import jax
  from diffusion_jax import build, checkpoint, latent, train
  from diffusion_jax.keys import RunKeys
  from diffusion_jax.parallel.mesh import make_mesh
  mesh, parts = make_mesh(), build.build_components(config)
  decoder = None
  if parts.autoencoder is not None:  # sample latents, decode with the workdir's finished autoencoder
    decoder = latent.prepare_autoencoder(config, parts.autoencoder, workdir, mesh, None, RunKeys.from_seed(0))
  state, _ = train.create_train_state(parts.model, parts.tx, jax.random.key(0), parts.input_shape, mesh,
                                      parts.schedule.num_timesteps)
  state = checkpoint.restore(checkpoint.make_manager(workdir), state)
  return mesh, parts, decoder, build.load_text_encoder(config), state


class TrainStepSetup:
  """A config's diffusion model ready to time: components, a fresh train state on the mesh, one random batch of
  images in [-1, 1] sharded over the data axis (labels too for conditional models), a key, and the jitted step."""

  def __init__(self, config, mesh=None, *, donate: bool = True, seed: int = 0, parts=None):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from diffusion_jax import build, train
    from diffusion_jax.parallel.mesh import batch_sharding, make_mesh, partition_rules_from_config
    self.config = config
    self.mesh = mesh if mesh is not None else make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
    self.parts = parts = parts if parts is not None else build.build_components(config)  # built once per caller
    self.state, self.shardings = train.create_train_state(parts.model, parts.tx, jax.random.key(0), parts.input_shape,
                                                          self.mesh, parts.schedule.num_timesteps,
                                                          partition_rules_from_config(config.mesh))
    self.params = sum(x.size for x in jax.tree.leaves(self.state.params))
    rng, data = np.random.default_rng(seed), batch_sharding(self.mesh)
    images = rng.uniform(-1, 1, (config.batch_size, *parts.input_shape)).astype(np.float32)
    self.batch = {"image": jax.device_put(jnp.asarray(images), data)}
    if parts.condition.kind != "none":  # a conditional step also gathers the condition of each example
      labels = rng.integers(0, parts.condition.num_labels, config.batch_size).astype(np.int32)
      self.batch["label"] = jax.device_put(jnp.asarray(labels), data)
    self.key = jax.random.key(1)
    self.step = train.compile_train_step(parts, self.mesh, self.shardings, batch_size=config.batch_size, donate=donate)


def make_sampler(parts, settings, mesh, decoder):
  """The compiled sample function of a workdir's model with these SampleSettings."""
  from diffusion_jax.sampling import make_sample_fn
  return make_sample_fn(parts.model, parts.schedule, settings, mesh, parts.input_shape,
                        prediction=parts.diffusion.prediction, variance=parts.diffusion.variance, decoder=decoder)


# ---------------------------------------------------------------- where a compiled step's time goes

def conv_direction(text: str) -> str:
  """'conv forward' / 'conv input gradient' / 'conv filter gradient' for HLO text holding a convolution: cuDNN's
  call target where it names one; else the first `convolution(` line: forward outside autodiff's transpose, and in
  it a filter gradient where the window is larger than the output's spatial extent (the kernel gradient slides dy
  over the whole image to a k x k output: layers._canonical_conv_bwd), an input gradient otherwise. Why split: the
  three run at different rates (on one core of the Intel Xeon host, fmnist_small b32: the filter gradients 211 ms
  of the step against 154 for the forwards at equal FLOPs; README)."""
  import re
  for target, kind in (("convBackwardFilter", "filter gradient"), ("convBackwardInput", "input gradient"),
                       ("Forward", "forward")):
    if re.search(rf"cudnn\$conv\w*{target}", text):
      return f"conv {kind}"
  line = next((part for part in re.split(r"(?= %[\w.\-]+ = )", text) if " convolution(" in part), text)
  if "transpose(" not in (re.search(r'op_name="([^"]*)"', line) or [None, ""])[1]:
    return "conv forward"
  out = re.search(r"= \w+\[([\d,]+)\]", line)
  window = re.search(r"window=\{size=([\dx]+)", line)
  labels = re.search(r"dim_labels=\w+_\w+->(\w+)", line)
  if out and window and labels:
    dims = [int(d) for d in out.group(1).split(",")]
    spatial = [dims[i] for i, c in enumerate(labels.group(1)) if c.isdigit()]
    if any(w > o for w, o in zip(map(int, window.group(1).split("x")), spatial)):
      return "conv filter gradient"
  return "conv input gradient"


def native_conv_flops(compiled_hlo_text: str, devices: int) -> float:
  """FLOPs of diffusion_jax.models.native's custom calls in a compiled (per-device) program, times `devices`: XLA's
  cost analysis counts none for a custom call, so the bench scripts add these to it. Counted as XLA counts a conv:
  2 B Ci Co per (output pixel, tap) that reads inside x, not the zero padding (a conv: x [B,H,W,Ci], w [K,K,Ci,Co]
  -> y [B,Ho,Wo,Co]; a filter gradient: x, dy [B,Ho,Wo,Co] -> dw [K,K,Ci,Co])."""
  import re

  from diffusion_jax.models import native

  def taps_inside(out: int, size: int, k: int, pad: int) -> int:  # (output index, tap) pairs reading inside x
    return sum(1 for o in range(out) for t in range(k) if 0 <= o + t - pad < size)

  total = 0
  for line in compiled_hlo_text.splitlines():
    target = re.search(f'custom_call_target="({native.CONV_TARGET}|{native.FILTER_GRAD_TARGET})"', line)
    shapes = re.search(r"operand_layout_constraints=\{f32\[([\d,]+)\](?:\{[\d,]*\})?, f32\[([\d,]+)\]", line)
    out = re.search(r"= f32\[([\d,]+)\]", line)
    pad = re.search(r"padding = (\d+)", line)
    if not (target and shapes and out and pad):
      continue
    x, second, result = ([int(d) for d in g.split(",")] for g in (*shapes.groups(), out.group(1)))
    if target.group(1) == native.CONV_TARGET:  # second: w [K,K,Ci,Co]; result: y [B,Ho,Wo,Co]
      k, out_hw, cout = second[0], result[1:3], second[3]
    else:  # second: dy [B,Ho,Wo,Co]; result: dw [K,K,Ci,Co]
      k, out_hw, cout = result[0], second[1:3], result[3]
    p = int(pad.group(1))
    total += 2 * x[0] * x[3] * cout * taps_inside(out_hw[0], x[1], k, p) * taps_inside(out_hw[1], x[2], k, p)
  return float(total * devices)


def _hlo_categories(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Each instruction of an optimized HLO module -> ('conv forward' / 'conv input gradient' / 'conv filter
  gradient' (conv_direction; '... (native)' for diffusion_jax.models.native's custom calls) / 'group norm
  (backward) (native)' /
  'matmul' / 'reduce' / 'copy/transpose' / 'elementwise' from what its fused
  computation (or the instruction itself) contains, its output shape)."""
  import re
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head and not line.startswith(" "):
      current = head.group(1)
      bodies[current] = []
    elif current:
      bodies[current].append(line)

  from diffusion_jax.models import native

  def category(text: str) -> str:
    if native.GROUP_NORM_TARGET in text:  # a prefix of GROUP_NORM_GRAD_TARGET
      return "group norm backward (native)" if native.GROUP_NORM_GRAD_TARGET in text else "group norm (native)"
    if native.FILTER_GRAD_TARGET in text:  # diffusion_jax.models.native's FFI custom calls
      return "conv filter gradient (native)"
    if native.CONV_TARGET in text:
      op_name = (re.search(r'op_name="([^"]*)"', text) or [None, ""])[1]
      return "conv input gradient (native)" if "transpose(" in op_name else "conv forward (native)"
    if re.search(r" convolution\(|cudnn\$conv|__cudnn\$conv", text):
      return conv_direction(text)
    if re.search(r" dot\(|cublas|gemm|__triton", text):
      return "matmul"
    if re.search(r" reduce(-window)?\(", text):
      return "reduce"
    if re.search(r" (transpose|copy)\(", text) and not re.search(r" (add|multiply|subtract|divide)\(", text):
      return "copy/transpose"
    return "elementwise"

  out = {}
  for body in bodies.values():
    for line in body:
      m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\([^)]*\)|\S+) (\w[\w\-]*)\((.*)", line)  # tuple or array
      if not m:
        continue
      name, shape, op, rest = m.groups()
      called = re.search(r"calls=%?([\w.\-]+)", rest)
      text = " ".join(bodies.get(called.group(1), [])) if called else ""
      out[name] = (category(f" = {shape} {op}(" + rest + " " + text), shape.split("{")[0])
  return out


def summarize_trace(trace_dir: str, hlo_text: str, steps: int, top: int = 12) -> tuple[list[dict], list[dict]]:
  """(time per category, the `top` ops) per step from a jax.profiler trace of `steps` calls of one compiled
  program, read from its perfetto trace. Device ops where the trace has a device track (GPU), else the
  program's own HLO instructions as XLA:CPU ran them (runtime and Python events left out)."""
  import collections
  import glob
  import gzip
  import json
  files = sorted(glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True))
  if not files:
    raise FileNotFoundError(f"no perfetto trace under {trace_dir}")
  trace = json.load(gzip.open(files[-1]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, n in names.items() if "GPU" in n or "TPU" in n}
  hlo = _hlo_categories(hlo_text)
  # A GPU kernel is named after its fusion with '_' for '.' (loop_add_fusion_3 <- loop_add_fusion.3).
  hlo.update({k.replace(".", "_"): v for k, v in list(hlo.items())})
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") != "X":
      continue
    name = e["name"]
    if device_pids:
      if e.get("pid") not in device_pids:
        continue
    elif name not in hlo:
      continue
    per_op[name] += e.get("dur", 0) / 1e3 / steps  # ms per step

  def category(name: str) -> str:
    if name in hlo:
      return hlo[name][0]
    low = name.lower()
    for key, cat in (("conv", "conv"), ("xmma", "matmul/conv kernel"), ("gemm", "matmul"),
                     ("cutlass", "matmul/conv kernel"), ("reduce", "reduce"), ("transpose", "copy/transpose"),
                     ("copy", "copy/transpose")):
      if key in low:
        return cat
    return "elementwise/other"

  total = sum(per_op.values()) or 1.0
  by_category = collections.Counter()
  for name, ms in per_op.items():
    by_category[category(name)] += ms
  cat_rows = [dict(category=c, ms_per_step=f"{ms:.1f}", share=f"{ms / total * 100:.0f}%")
              for c, ms in by_category.most_common()]
  op_rows = [dict(op=n[:60], shape=hlo.get(n, ("", "-"))[1], category=category(n), ms_per_step=f"{ms:.2f}",
                  share=f"{ms / total * 100:.1f}%")
             for n, ms in per_op.most_common(top)]
  return cat_rows, op_rows
