"""bench/: the scripts run and print their tables (so they cannot rot); timings are never asserted."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vs_peers_prints_this_projects_rows_and_how_to_get_the_peer(tmp_path):
  fake = tmp_path / "diffusers"  # a diffusers that fails to import: the script must fall back, not crash
  fake.mkdir()
  (fake / "__init__.py").write_text("raise ImportError('diffusers is not installed')\n")
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
  out = subprocess.run([sys.executable, "bench/vs_peers.py", "--cases", "fmnist_small", "--batch", "8", "--steps",
                        "2", "--rounds", "1", "--sample-steps", "2", "--no-rss"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "no peer (ImportError: diffusers is not installed)" in out.stdout
  assert "pip install --no-deps diffusers==0.42.1" in out.stdout
  rows = [line for line in out.stdout.splitlines() if line.startswith("| fmnist_small")]
  assert [r.split(" | ")[1] for r in rows] == ["train step", "sampling network evaluation"]
  for r in rows:
    cells = r.split(" | ")
    assert cells[3] == "1,112,801 / -"  # the fmnist_small U-Net, parameter for parameter
    assert float(cells[4]) > 0 and float(cells[5]) > 0 and cells[6] == "-"
  assert re.search(r"backend cpu, (\d+) devices", out.stdout)


@pytest.mark.slow
def test_vs_peers_builds_the_same_unet_as_diffusers():
  """Equal parameter counts on both sides for every case (needs torch and diffusers: the slow tier)."""
  pytest.importorskip("diffusers")
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  import jax
  from vs_peers import CASES, PEER_COMMON
  from diffusers import UNet2DModel
  from diffusion_jax import build, train
  from diffusion_jax.config import load_config
  for case in CASES.values():
    parts = build.build_components(load_config("cifar10_ddpm", case["overrides"]))
    x, t = jax.numpy.zeros((1, *parts.input_shape)), jax.numpy.zeros((1,), jax.numpy.int32)
    params = jax.eval_shape(lambda: parts.model.init(jax.random.key(0), x, t,
                                                     **train.example_condition(parts.model, parts.input_shape)))
    ours = sum(x.size for x in jax.tree.leaves(params))
    peer = sum(p.numel() for p in UNet2DModel(**case["peer"], **PEER_COMMON).parameters())
    assert ours == peer, (case["peer"]["block_out_channels"], ours, peer)


def test_vs_peers_peer_step_does_the_work_of_this_projects_config():
  """--peer-step same gives the peer the config's gradient clipping and EMA (DDPM's 1.0 and 0.9999), an override
  of them too; --peer-step adam leaves it Adam alone; the table's header says which."""
  import argparse
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  from vs_peers import peer_step_extras, peer_step_text
  args = argparse.Namespace(peer_step="same", set=[], batch=0)
  assert peer_step_extras("ddpm_cifar10", args) == (1.0, 0.9999)
  assert peer_step_text(1.0, 0.9999) == "Adam + clip_grad_norm_(1) + EMAModel(0.9999)"
  args.set = ["optim.grad_clip=0.0", "optim.ema_decay=0.999"]
  assert peer_step_extras("fmnist_small", args) == (0.0, 0.999)
  assert peer_step_text(0.0, 0.999) == "Adam + EMAModel(0.999)"
  assert peer_step_extras("ddpm_cifar10", argparse.Namespace(peer_step="adam", set=[], batch=0)) == (0.0, 0.0)
  assert peer_step_text(0.0, 0.0) == "Adam"


@pytest.mark.slow
def test_vs_peers_peer_clips_and_keeps_an_ema():
  """The peer's step with clipping and an EMA (needs torch and diffusers: the slow tier): after one step the
  EMA has moved from its start by (1 - decay) of the parameters' change, the warm-up decay min(d, 2/11)."""
  pytest.importorskip("diffusers")
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  import torch
  from vs_peers import CASES, Peer
  peer = Peer(CASES["fmnist_small"], 2, 1, 2, "cpu", False, grad_clip=1.0, ema_decay=0.9999)  # one step in __init__
  start = [p.detach().clone() for p in peer.model.parameters()]
  ema_start = [s.clone() for s in peer.ema.shadow_params]
  peer.train_steps(1)
  decay = min(0.9999, (1 + 1) / (10 + 1))  # EMAModel's warm-up (1+n)/(10+n), n = 1 at its second step
  for p0, p1, e0, e1 in zip(start, peer.model.parameters(), ema_start, peer.ema.shadow_params):
    torch.testing.assert_close(e1, decay * e0 + (1 - decay) * p1.detach(), rtol=1e-5, atol=1e-6)
  assert any(not torch.equal(p0, p1) for p0, p1 in zip(start, peer.model.parameters()))


def test_scaling_prints_the_memory_table_and_fsdp_shards_the_state():
  """bench/scaling.py on 2 host devices with fsdp=2 (a small U-Net for speed): its rows and the 16 GiB estimate
  print, and the SD-sized state per device is half of its replicated size (params, EMA, two Adam moments)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "bench/scaling.py", "--devices", "2", "--fsdp", "2", "--batch", "4", "--steps",
                        "1", "--set", "model.ch=32", "--set", "model.ch_mult=(1,2)", "--set", "model.num_res_blocks=1",
                        "--set", "model.attn_resolutions=(16,)"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.stdout.splitlines()
          if line.startswith("| ddpm_cifar10") or line.startswith("| sd_sized")}
  small = rows["ddpm_cifar10 model.ch=32 model.ch_mult=(1,2) model.num_res_blocks=1 model.attn_resolutions=(16,)"]
  assert small[2:6] == ["2", "1", "2", "4"]  # devices, data, fsdp, batch
  assert float(small[10]) > 0  # ms per step
  sd = rows["sd_sized (shapes only)"]
  params = float(sd[1].rstrip("M")) * 1e6
  replicated_mb = params * 4 * 4 / 2 ** 20  # float32 params, EMA, Adam's mu and nu
  assert 0.49 * replicated_mb < float(sd[6].replace(",", "")) < 0.51 * replicated_mb
  assert re.search(r"\| 2 \| 2 \| 2 \| [\d.]+ \| [\d,]+M params \|", out.stdout)


def test_levers_times_each_variant_and_reports_one_that_does_not_build():
  """bench/levers.py, a small U-Net on 1 host device: one row per variant that builds, ratios against the first;
  an XLA option this jaxlib lacks is one line, not a crash; the autodiff GroupNorm variant (with a config override
  equal to the base's) and autodiff's Dense / 1x1 conv kernel gradients and 3x3 conv gradients compute the same first
  loss as the written-out ones: the same forward."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "bench/levers.py", "--config", "cifar10_ddpm", "--batch", "4", "--cpu-devices",
                        "1", "--set", "model.ch=16", "--set", "model.ch_mult=(1,2)", "--set", "model.num_res_blocks=1",
                        "--set", "model.attn_resolutions=(16,)", "--set", "model.dropout=0.0", "--variant", "base",
                        "--variant", "ad=gn:autodiff;model.dropout=0.0", "--variant", "bad=xla:xla_no_such_option=1",
                        "--variant", "w4=wtile:4;model.conv_impl=winograd",
                        "--variant", "dense=dense:autodiff;conv:autodiff",
                        "--rounds", "1", "--steps", "1",
                        "--pipelined"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert re.search(r"variant bad: \w+: .*xla_no_such_option", out.stdout)
  losses = dict(re.findall(r"compiled (\w+) in [\d.]+ s \(first loss ([\d.]+)\)", out.stdout))
  assert sorted(losses) == ["ad", "base", "dense", "w4"] and losses["ad"] == losses["dense"] == losses["base"]
  assert abs(float(losses["w4"]) - float(losses["base"])) < 1e-3  # F(4x4) Winograd: the same model, other rounding
  rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.stdout.splitlines()
          if re.match(r"\| (base|ad|w4|dense) \|", line)}
  assert sorted(rows) == ["ad", "base", "dense", "w4"] and rows["base"][4] == "1.000x"
  assert all(float(r[2]) > 0 and float(r[8]) > 0 for r in rows.values())  # ms_per_step, ms_pipelined


def test_levers_stops_compiling_past_its_budget_and_still_prints_the_table():
  """--budget-s: no variant is compiled once the budget is spent (a run under a device's time limit); the ones
  compiled are still timed and tabled."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "bench/levers.py", "--config", "cifar10_ddpm", "--batch", "2", "--cpu-devices",
                        "1", "--set", "model.ch=8", "--set", "model.ch_mult=(1,2)", "--set", "model.num_res_blocks=1",
                        "--set", "model.attn_resolutions=(16,)", "--variant", "base",
                        "--variant", "late=model.dropout=0.0",
                        "--budget-s", "0.001", "--rounds", "1", "--steps", "1"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "variant late: not compiled, past --budget-s 0.001" in out.stdout
  assert re.search(r"^\| base \| [\d.]+ \| [\d.]+ \|", out.stdout, re.M) and "| late |" not in out.stdout


@pytest.mark.parametrize("wide", [False, True])
def test_profile_categories_split_convolutions_into_forward_and_both_gradients(wide):
  """bench/common.py's profile tables: each of a conv's three convolutions (forward, input gradient, filter
  gradient) named as such, whether XLA:CPU runs it alone (Eigen, the wide models' options) or in a YNNPACK fusion."""
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  import jax
  import jax.numpy as jnp
  from common import _hlo_categories

  from diffusion_jax.models import layers
  x, kernel = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))
  loss = lambda x, kernel: jnp.sum(layers.xla_conv(x, kernel) ** 2)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile(
      layers.WIDE_MODEL_CPU_XLA_OPTIONS if wide else {})
  kinds = sorted(kind for kind, _ in _hlo_categories(compiled.as_text()).values() if kind.startswith("conv"))
  assert kinds == ["conv filter gradient", "conv forward", "conv input gradient"]


def test_profile_categories_and_flops_of_the_native_convs():
  """The native kernels' custom calls: named by direction in the profile tables, and their FLOPs (which XLA's cost
  analysis counts as 0) added by native_conv_flops as XLA counts its own convs (the taps reading padding left out)."""
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  import jax
  import jax.numpy as jnp
  from common import _hlo_categories, native_conv_flops

  from diffusion_jax.models import layers, native
  if native.host_unsupported_reason():
    pytest.skip(f"native CPU kernels not for this host: {native.host_unsupported_reason()}")
  x, kernel = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 32))
  loss = lambda x, kernel: jnp.sum(layers.xla_conv(x, kernel) ** 2)
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
  kinds = sorted(kind for kind, _ in _hlo_categories(text).values() if kind.startswith("conv"))
  assert kinds == ["conv filter gradient (native)", "conv forward (native)", "conv input gradient (native)"]
  with layers.native_convs(False):
    xla = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).cost_analysis()["flops"]
  # 22 of the 8 x 3 (output, tap) pairs per axis read inside x
  assert native_conv_flops(text, devices=2) == 2 * 3 * 2 * (2 * 22 * 22 * 16 * 32)
  assert abs(native_conv_flops(text, devices=1) - xla) < 0.01 * xla  # XLA's own count (and the loss's few)


def test_xla_cpu_repros_time_each_slow_form_and_its_workaround():
  """bench/xla_cpu_repros.py at tiny shapes: one row per case, both forms timed (the gloo case over 2 processes)."""
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": ROOT}
  out = subprocess.run([sys.executable, "bench/xla_cpu_repros.py", "--small", "--reps", "1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| ") and line[2:7] != "case "]
  from diffusion_jax.models import native
  native_case = ["conv3x3_filter_grad"] if native.host_unsupported_reason() is None else []
  assert [r[0].lstrip("| ") for r in rows] == ["repeat_broadcast", "conv2x2_filter_grad", "conv_grad_in_scan",
                                               *native_case, "gloo_tuple_all_reduce"]
  for r in rows:
    assert float(r[2]) > 0 and float(r[4]) > 0 and r[5].endswith("x")
  bad = subprocess.run([sys.executable, "bench/xla_cpu_repros.py", "--cases", "nope"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "--cases nope: expected some of repeat_broadcast," in bad.stderr


@pytest.mark.slow  # 50 s on 2 cores (2 processes compile 2 steps each); the 2-process test checks the flat step
def test_processes_times_both_gradient_reductions_over_two_gloo_processes():
  """bench/processes.py on a tiny U-Net over 2 local processes: a row per form, both timed; bad input is one line."""
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": ROOT}
  tiny = ["--set=model.ch=8", "--set=model.ch_mult=(1,)", "--set=model.attn_resolutions=()", "--set=data.image_size=8"]
  out = subprocess.run([sys.executable, "bench/processes.py", "--no-peer", "--batch", "4", "--steps", "1",
                        "--rounds", "1", *tiny], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| fmnist_small")]
  assert [r[1] for r in rows] == ["this project, gradients as one flat vector (the default here)",
                                  "this project, XLA's tuple all-reduce (one buffer per parameter)"]
  assert all(float(r[2]) > 0 and r[4].endswith("x") for r in rows)
  bad = subprocess.run([sys.executable, "bench/processes.py", "--processes", "3"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "--processes 3: expected at least 2, dividing the global batch" in bad.stderr


def test_native_convs_times_xlas_and_ours_per_dtype():
  """bench/native_convs.py --small: a row per dtype and shape; ours timed where the kernels take the conv (float32
  where the host runs them, bfloat16 where it has AMX or AVX512-BF16), 'not taken' otherwise."""
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": ROOT}
  out = subprocess.run([sys.executable, "bench/native_convs.py", "--small", "--steps", "1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| ") and line[2:7] != "dtype"]
  assert [r[0].lstrip("| ") for r in rows] == ["float32"] * 3 + ["bfloat16"] * 3
  from diffusion_jax.models import native
  for r in rows:
    takes = native.available() and (r[0].lstrip("| ") == "float32" or native.bf16_available())
    assert float(r[2].split()[0]) > 0 and float(r[4].split()[0]) > 0
    assert (r[3].endswith("x") and r[5].rstrip(" |").endswith("x")) if takes else r[3] == "not taken"
