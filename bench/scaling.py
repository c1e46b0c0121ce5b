"""Memory and speed of the train step over (devices, fsdp): per-device bytes of the train state and what XLA's
compiled memory analysis reserves, ms per step and images/s; an SD-sized U-Net's state by shapes only.

python bench/scaling.py [--devices 1,2,4,8] [--fsdp 1,2,4,8] [--batch 16] [--steps 3] [--no-time] [--sd-compile B]
  [--set model.ch=32 ...]

On CPU each device count runs in its own process with that many XLA:CPU host devices (the count is fixed when
JAX starts); on an accelerator pass the real count (e.g. --devices 1). The model is DDPM's CIFAR-10 U-Net
(configs/cifar10_ddpm.py, 35.7M params). The SD-sized U-Net (latent 64x64x4, ch 320, ch_mult (1,2,4,4), 2 res
blocks, cross-attention to a 768-d context at 64/32/16, 64-channel heads: ~860M params as Stable Diffusion 1.x)
is never allocated: its state comes from jax.eval_shape and the FSDP shardings, so its rows count only the
train state (params, EMA, Adam's two moments), not activations; `--sd-compile B` also compiles its whole train
step (B images per device, text-conditional, without and with remat) from abstract inputs for XLA's memory
analysis, which counts the temporaries (activations, gradients, gathered layers) too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

GIB = 1024 ** 3
SD_OVERRIDES = ["data.image_size=64", "data.channels=4", "model.ch=320", "model.ch_mult=(1,2,4,4)",
                "model.num_res_blocks=2", "model.attn_resolutions=(64,32,16)", "model.context_dim=768",
                "model.head_channels=64", "model.dropout=0.0"]


def state_bytes_per_device(abstract_state, shardings) -> int:
  """Bytes of the train state one device holds under these shardings (each leaf's shard shape)."""
  import jax
  leaves = zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings))
  return sum(int(np.prod(s.shard_shape(tuple(x.shape)))) * x.dtype.itemsize for x, s in leaves)


def child(devices: int, fsdps: list[int], batch: int, steps: int, sd_compile: int = 0, overrides=()
          ) -> list[dict]:
  import jax
  from common import TrainStepSetup

  from diffusion_jax.config import load_config
  from diffusion_jax.parallel.mesh import make_mesh
  rows = []
  for fsdp in fsdps:
    if fsdp > devices or devices % fsdp:
      continue
    mesh = make_mesh(jax.devices()[:devices], fsdp=fsdp)
    setup = TrainStepSetup(load_config("cifar10_ddpm", [f"batch_size={batch}", f"mesh.fsdp={fsdp}", *overrides]),
                           mesh)
    state, shardings, data, key = setup.state, setup.shardings, setup.batch, setup.key
    t0 = time.perf_counter()
    compiled = setup.step.lower(state, data, key, None).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    row = dict(model=" ".join(["ddpm_cifar10", *overrides]), params=setup.params, devices=devices,
               data=devices // fsdp, fsdp=fsdp, batch=batch,
               state_mb=state_bytes_per_device(state, shardings) / 2 ** 20,
               argument_mb=getattr(memory, "argument_size_in_bytes", 0) / 2 ** 20 if memory else float("nan"),
               temp_mb=getattr(memory, "temp_size_in_bytes", 0) / 2 ** 20 if memory else float("nan"),
               compile_s=compile_s, ms=float("nan"))
    if steps:
      state, m = compiled(state, data, key, None)
      jax.block_until_ready(m)
      times = []
      for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, data, key, None)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
      row["ms"] = float(np.median(times)) * 1e3
    rows.append(row)
    del state, compiled, setup
    # The SD-sized U-Net on the same mesh: shapes only.
    _, abstract, sd_shardings = sd_abstract_state(mesh)
    rows.append(dict(model="sd_sized (shapes only)", params=sum(x.size for x in jax.tree.leaves(abstract.params)),
                     devices=devices, data=devices // fsdp, fsdp=fsdp, batch="-",
                     state_mb=state_bytes_per_device(abstract, sd_shardings) / 2 ** 20,
                     argument_mb=float("nan"), temp_mb=float("nan"), compile_s=float("nan"), ms=float("nan")))
    if sd_compile:
      rows += sd_compiled_rows(mesh, sd_compile)
  return rows


def sd_abstract_state(mesh, remat: bool = False):
  """The SD-sized U-Net's (components, abstract train state, state shardings on `mesh`): shapes only."""
  import jax
  from diffusion_jax import build, train
  from diffusion_jax.config import load_config
  from diffusion_jax.parallel.mesh import FSDP_AXIS, state_shardings
  config = load_config("cifar10_ddpm", SD_OVERRIDES + [f"mesh.fsdp={mesh.shape[FSDP_AXIS]}", f"model.remat={remat}"])
  parts = build.build_components(config)
  init = train.train_state_init_fn(parts.model, parts.tx, parts.input_shape, parts.schedule.num_timesteps)
  abstract = jax.eval_shape(init, jax.random.key(0))
  return parts, abstract, state_shardings(abstract, mesh)


def sd_compiled_rows(mesh, batch_per_device: int) -> list[dict]:
  """The SD-sized U-Net's whole train step compiled (never run, nothing allocated) for this mesh, without and with
  model.remat: XLA's memory analysis per device. Inputs are abstract (shapes and shardings); the text condition is
  a table of 77-token, 768-d caption embeddings as SD 1.x's CLIP text encoder gives (the encoder itself is not in
  the step: it is frozen and runs once)."""
  import dataclasses
  import jax
  import jax.numpy as jnp
  from diffusion_jax import conditioning as C, train
  from diffusion_jax.parallel.mesh import FSDP_AXIS, batch_sharding, replicated
  devices, fsdp = mesh.size, mesh.shape[FSDP_AXIS]
  batch = batch_per_device * devices
  rows = []
  for remat in (False, True):
    parts, abstract, shardings = sd_abstract_state(mesh, remat)
    parts = dataclasses.replace(parts, condition=C.ConditionSpec("text", p_uncond=0.1, captions=(("a photo",),) * 10))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    data, rep = batch_sharding(mesh), replicated(mesh)
    spec = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    inputs = {"image": spec((batch, *parts.input_shape), jnp.float32, data), "label": spec((batch,), jnp.int32, data)}
    table = C.TextTable(context=spec((11, 77, 768), jnp.float32, rep), mask=spec((11, 77), jnp.int32, rep),
                        caption_rows=spec((10, 1), jnp.int32, rep), counts=spec((10,), jnp.int32, rep))
    t0 = time.perf_counter()
    compiled = train.compile_train_step(parts, mesh, shardings, batch_size=batch).lower(
        state, inputs, jax.random.key(1), table).compile()
    memory = compiled.memory_analysis()
    rows.append(dict(model=f"sd_sized compiled{' remat' if remat else ''}",
                     params=sum(x.size for x in jax.tree.leaves(abstract.params)), devices=devices,
                     data=devices // fsdp, fsdp=fsdp, batch=batch,
                     state_mb=state_bytes_per_device(abstract, shardings) / 2 ** 20,
                     argument_mb=memory.argument_size_in_bytes / 2 ** 20, temp_mb=memory.temp_size_in_bytes / 2 ** 20,
                     compile_s=time.perf_counter() - t0, ms=float("nan")))
  return rows


def largest_fitting_params(rows: list[dict], budget_gib: float = 16.0) -> list[dict]:
  """From the ddpm_cifar10 rows' compiled memory analysis: per-device bytes per parameter of the train state
  and of the arguments + temporaries; the params that fit `budget_gib` per device at those rates (a linear
  estimate: activations and gathered layers grow with the model as the state does)."""
  out = []
  for r in rows:
    if not r["model"].startswith("ddpm_cifar10"):
      continue
    per_param = (r["argument_mb"] + r["temp_mb"]) * 2 ** 20 / r["params"]
    out.append(dict(devices=r["devices"], fsdp=r["fsdp"], batch_per_device=r["batch"] // r["devices"],
                    bytes_per_param_per_device=f"{per_param:.1f}",
                    largest_model_on_16GiB=f"{budget_gib * GIB / per_param / 1e6:,.0f}M params"))
  return out


def fmt(rows: list[dict]) -> list[dict]:
  def cell(v):
    if isinstance(v, float):
      return "-" if v != v else f"{v:,.1f}"
    if isinstance(v, int) and v > 10_000:
      return f"{v / 1e6:,.1f}M"
    return v
  out = []
  for r in rows:
    r = {k: cell(v) for k, v in r.items()}
    if r["ms"] != "-" and r["batch"] != "-":
      r["images_per_s"] = f"{int(r['batch']) / float(r['ms'].replace(',', '')) * 1e3:.1f}"
    else:
      r["images_per_s"] = "-"
    out.append(r)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--fsdp", default="1,2,4,8")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--no-time", action="store_true", help="memory only (compile, no steps)")
  parser.add_argument("--sd-compile", type=int, default=0, metavar="B",
                      help="also compile the SD-sized step (B images per device, without and with remat) for its "
                           "memory analysis; minutes per mesh on a CPU")
  parser.add_argument("--set", action="append", default=[], help="override of the ddpm_cifar10 config, e.g. "
                      "--set model.ch=32 (a smaller model)")
  parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  from common import host_memory_as_main
  host_memory_as_main()
  fsdps = [int(f) for f in args.fsdp.split(",")]
  steps = 0 if args.no_time else args.steps
  if args.child:
    print("ROWS " + json.dumps(child(args.child, fsdps, args.batch, steps, args.sd_compile, args.set)))
    return
  rows = []
  accelerator = any(p in os.environ.get("JAX_PLATFORMS", "") for p in ("cuda", "gpu", "tpu"))
  for n in (int(d) for d in args.devices.split(",")):
    env = dict(os.environ)
    if not accelerator:
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--fsdp", args.fsdp, "--batch",
           str(args.batch), "--steps", str(args.steps), "--sd-compile", str(args.sd_compile)] + (
               ["--no-time"] if args.no_time else []) + [f"--set={o}" for o in args.set]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
      sys.exit(f"the {n}-device run failed:\n{out.stderr[-3000:]}")
    rows += json.loads(next(line for line in out.stdout.splitlines() if line.startswith("ROWS "))[5:])
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from common import print_table
  import jax
  print(f"\nbackend {jax.default_backend()}; MB per device (state: params, EMA, Adam moments; argument / temp: "
        "XLA's compiled memory analysis of the whole step)\n")
  print_table(fmt(rows))
  print("\nLargest model per 16 GiB device at these rates (linear estimate from the compiled analysis):\n")
  print_table(largest_fitting_params(rows))


if __name__ == "__main__":
  main()
