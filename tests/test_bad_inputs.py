"""Bad input through the real command line: every case exits 1 with one `error:` line naming the key, file or
variable and its value, and no traceback (the config values themselves are also checked in-process by
test_config_check). Cases run as subprocesses, four at a time."""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import ROOT

FASHION = os.path.join(ROOT, "configs", "fashion_mnist.py")
LATENT = os.path.join(ROOT, "configs", "latent.py")


def _files(tmp):
  """Bad files the cases point at."""
  (tmp / "a_file").write_text("not a folder")
  (tmp / "broken.py").write_text("def get_config(:\n  pass\n")
  (tmp / "raises.py").write_text("def get_config():\n  return {}['missing']\n")
  from PIL import Image
  Image.new("L", (8, 8), 255).save(tmp / "mask_8x8.png")
  Image.new("L", (28, 28), 100).save(tmp / "mask_gray.png")
  (tmp / "not_an_image.png").write_text("text")
  return tmp


# (name, extra args, extra env, pattern the one error line must match). {tmp} is the test's folder; the default
# config is fashion_mnist and the default workdir {tmp}/run.
CASES = [
    ("unknown key", ["--config.modle.ch=64"], {}, r"--config\.modle\.ch=64: unknown config key 'modle\.ch'; "
     r"did you mean 'model\.ch'\?"),
    ("unknown leaf", ["--config.model.chh=3"], {}, r"unknown config key 'model\.chh'; did you mean 'model\.ch'"),
    ("unset section", ["--config.autoencoder.ch=3"], {}, r"config\.autoencoder is None in this config"),
    ("missing config file", ["--config={tmp}/nope.py"], {}, r"config file '.*/nope\.py' does not exist.*"
     r"configs/latent\.py"),
    ("broken config file", ["--config={tmp}/broken.py"], {}, r"config file .*/broken\.py line 1: invalid syntax"),
    ("config file raises", ["--config={tmp}/raises.py"], {}, r"config file .*/raises\.py line 2 .*KeyError"),
    ("unknown variant", [f"--config={LATENT}:foo"], {}, r"latent\.py line \d+ .*unknown variant \['foo'\]"),
    ("int expected", ["--config.model.ch=abc"], {}, r"--config\.model\.ch=abc: invalid literal for int"),
    ("unclosed tuple", ["--config.model.ch_mult=(1,2"], {}, r"--config\.model\.ch_mult=\(1,2"),
    ("section overwritten", ["--config.model=3"], {}, r"--config\.model=3"),
    ("ch_mult not ints", ["--config.model.ch_mult=foo"], {}, r"config\.model\.ch_mult=\('foo',\) is invalid"),
    ("ch zero", ["--config.model.ch=0"], {}, r"config\.model\.ch=0 is invalid: must be an int >= 1"),
    ("dropout", ["--config.model.dropout=2.0"], {}, r"config\.model\.dropout=2\.0 is invalid: must be in \[0, 1\)"),
    ("ema decay", ["--config.optim.ema_decay=1.5"], {}, r"config\.optim\.ema_decay=1\.5 is invalid"),
    ("warmup", ["--config.optim.warmup_steps=-5"], {}, r"config\.optim\.warmup_steps=-5 is invalid"),
    ("nan policy", ["--config.optim.nan_policy=ignore"], {}, r"config\.optim\.nan_policy='ignore' is invalid: "
     r"choose one of \('stop', 'skip'\)"),
    ("keep zero", ["--config.keep_checkpoints=0"], {}, r"config\.keep_checkpoints=0 is invalid: must be an int >= 1"),
    ("batch zero", ["--config.batch_size=0"], {}, r"config\.batch_size=0 is invalid"),
    ("seed", ["--config.seed=-1"], {}, r"config\.seed=-1 is invalid"),
    ("mode", ["--config.mode=evaluate"], {}, r"config\.mode='evaluate' is invalid: choose one of"),
    ("dataset", ["--config.data.dataset=svhn"], {}, r"config\.data\.dataset='svhn' is invalid"),
    ("data dir", ["--config.data.data_dir={tmp}/nowhere"], {}, r"config\.data\.data_dir='.*/nowhere' is invalid: "
     r"no such folder"),
    ("timesteps vs preview", ["--config.diffusion.num_timesteps=10"], {}, r"config\.sample\.num_steps=.* is invalid|"
     r"config\.sample\.preview_steps=\d+ is invalid: .*num_timesteps=10"),
    ("guidance", ["--config.sample.guidance_scale=-1"], {}, r"config\.sample\.guidance_scale=-1\.0 is invalid"),
    ("latent preview steps", [f"--config={LATENT}", "--config.sample.preview_steps=2000"], {},
     r"config\.sample\.preview_steps=2000 is invalid"),
    ("sample without checkpoint", [f"--config={LATENT}", "--config.mode=sample"], {}, r"no finished autoencoder in"),
    ("workdir is a file", ["--workdir={tmp}/a_file"], {}, r"--workdir='.*/a_file' is a file: expected a folder"),
    ("workdir under a file", ["--workdir={tmp}/a_file/run"], {}, r"--workdir='.*/a_file/run' cannot be created"),
    ("workdir unwritable", ["--workdir=/proc/no/run"], {}, r"--workdir='/proc/no/run' is not writable"),
    ("no workdir", ["--workdir="], {}, r"--workdir"),
    ("positional argument", ["extra"], {}, r"unexpected arguments \['extra'\]"),
    ("DJ_TRACEBACK", [], {"DJ_TRACEBACK": "yes"}, r"DJ_TRACEBACK='yes' is invalid: expected '1'"),
    ("unknown DJ_ variable", [], {"DJ_TRACBACK": "1"}, r"DJ_TRACBACK is unknown; did you mean DJ_TRACEBACK\?"),
    ("DJ_NUM_PROCESSES", [], {"DJ_COORDINATOR_ADDRESS": "127.0.0.1:1234", "DJ_NUM_PROCESSES": "x",
                              "DJ_PROCESS_ID": "0"}, r"DJ_NUM_PROCESSES='x' is invalid"),
    ("DJ_PROCESS_ID", [], {"DJ_COORDINATOR_ADDRESS": "127.0.0.1:1234", "DJ_NUM_PROCESSES": "2",
                           "DJ_PROCESS_ID": "5"}, r"DJ_PROCESS_ID='5' is invalid: expected this process's index"),
    ("DJ_PROCESS_ID unset", [], {"DJ_COORDINATOR_ADDRESS": "127.0.0.1:1234", "DJ_NUM_PROCESSES": "2"},
     r"DJ_PROCESS_ID is unset"),
    ("DJ_COORDINATOR_ADDRESS", [], {"DJ_COORDINATOR_ADDRESS": "localhost", "DJ_NUM_PROCESSES": "2",
                                    "DJ_PROCESS_ID": "0"}, r"DJ_COORDINATOR_ADDRESS='localhost' is invalid: "
     r"expected host:port"),
    ("DJ_INIT_TIMEOUT", [], {"DJ_INIT_TIMEOUT": "-1"}, r"DJ_INIT_TIMEOUT='-1' is invalid"),
    ("DJ_DISTRIBUTED", [], {"DJ_DISTRIBUTED": "yes"}, r"DJ_DISTRIBUTED='yes' is invalid: expected 'auto'"),
    ("DJ_DISTRIBUTED without a cluster", [], {"DJ_DISTRIBUTED": "auto"}, r"distributed start-up failed "
     r"\(DJ_DISTRIBUTED=auto\): .*JAX detected no TPU pod or SLURM job here"),
    ("mesh", ["--config.mesh.fsdp=3"], {"DJ_CPU_DEVICES": "1"}, r"config\.mesh\.data=-1, config\.mesh\.fsdp=3 is "
     r"invalid: 3 does not divide the 1 devices"),
    ("partition rule", ['--config.mesh.partition_rules=(("(", "fsdp"),)'], {"DJ_CPU_DEVICES": "1"},
     r"config\.mesh\.partition_rules\[0\]=\('\(', 'fsdp'\) is invalid: the regex does not compile"),
    ("gs workdir offline", ["--workdir=gs://diffusion-jax-offline/run"], {}, r"--workdir='gs://diffusion-jax-offline/"
     r"run' cannot be reached: .*"),
    ("DJ_CPU_DEVICES", [], {"DJ_CPU_DEVICES": "0"}, r"DJ_CPU_DEVICES='0' is invalid: expected how many XLA:CPU "
     r"devices"),
    # mode=edit (checked before any checkpoint is read)
    ("edit task missing", ["--config.mode=edit"], {}, r"config\.edit\.task=None is invalid: mode=edit needs a task: "
     r"set --config\.edit\.task to one of \('inpaint'"),
    ("edit task unknown", ["--config.mode=edit", "--config.edit.task=colorize"], {}, r"edit\.task='colorize'"),
    ("box outside", ["--config.mode=edit", "--config.edit.task=inpaint", "--config.edit.box=0,0,40,5"], {},
     r"config\.edit\.box='0,0,40,5' is invalid: the box must be non-empty and inside the 28x28 image"),
    ("box empty", ["--config.mode=edit", "--config.edit.task=inpaint", "--config.edit.box=3,3,3,9"], {},
     r"config\.edit\.box='3,3,3,9' is invalid: the box must be non-empty"),
    ("mask size", ["--config.mode=edit", "--config.edit.task=inpaint", "--config.edit.mask={tmp}/mask_8x8.png"], {},
     r"config\.edit\.mask='.*mask_8x8\.png' is invalid: the mask is 8x8, the images are 28x28"),
    ("mask not binary", ["--config.mode=edit", "--config.edit.task=inpaint",
                         "--config.edit.mask={tmp}/mask_gray.png"], {}, r"edit\.mask=.* must be binary"),
    ("strength zero", ["--config.mode=edit", "--config.edit.task=img2img", "--config.edit.strength=0.0"], {},
     r"config\.edit\.strength=0\.0 is invalid: must be in \(0, 1\]"),
    ("strength above one", ["--config.mode=edit", "--config.edit.task=img2img", "--config.edit.strength=1.5"], {},
     r"config\.edit\.strength=1\.5 is invalid"),
    ("image file missing", ["--config.mode=edit", "--config.edit.task=img2img", "--config.edit.images={tmp}/no.png"],
     {}, r"config\.edit\.images='.*/no\.png' is invalid: .*no\.png does not exist"),
    ("image does not decode", ["--config.mode=edit", "--config.edit.task=img2img",
                               "--config.edit.images={tmp}/not_an_image.png"], {},
     r"config\.edit\.images='.*not_an_image\.png' is invalid: image file .* does not decode"),
    ("index out of range", ["--config.mode=edit", "--config.edit.task=img2img", "--config.edit.images=test:99999"],
     {}, r"config\.edit\.images='test:99999' is invalid: the test split of fashion_mnist has 10000 images"),
    ("upscale without SR model", ["--config.mode=edit", "--config.edit.task=upscale"], {},
     r"config\.edit\.task='upscale' is invalid: this model .* cannot upscale: upscaling needs a super-resolution"),
    ("outpaint extend", ["--config.mode=edit", "--config.edit.task=outpaint", "--config.edit.extend=0"], {},
     r"config\.edit\.extend=0 is invalid: must be an int >= 1"),
]


def _run(case, tmp):
  name, extra, extra_env, _ = case
  args = [a.replace("{tmp}", str(tmp)) for a in extra]
  config = next((a for a in args if a.startswith("--config=")), f"--config={FASHION}")
  workdir = next((a for a in args if a.startswith("--workdir=")), f"--workdir={tmp / name.replace(' ', '_')}")
  rest = [a for a in args if a not in (config, workdir)]
  if workdir == "--workdir=":
    workdir = None
  env = {k: v for k, v in os.environ.items()
         if k == "DJ_CPU_DEVICES" or not k.startswith("DJ_") and k != "XLA_FLAGS"}
  env.update(extra_env)
  command = [sys.executable, "-m", "diffusion_jax.main", config, *([workdir] if workdir else []), *rest]
  return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_each_bad_input_is_one_error_line_naming_it(tmp_path):
  assert len(CASES) >= 35
  tmp = _files(tmp_path)
  with ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda case: _run(case, tmp), CASES))
  failures = []
  for (name, _, _, pattern), out in zip(CASES, results):
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    ok = (out.returncode == 1 and "Traceback" not in out.stderr and len(errors) == 1
          and out.stderr.rstrip().endswith(errors[0]) and re.search(pattern, errors[0]))
    if not ok:
      failures.append(f"{name}: rc={out.returncode}\n{out.stderr[-1500:]}")
  assert not failures, "\n\n".join(failures)
  # Nothing was written to a workdir of a run that failed validation.
  assert not any((tmp / name.replace(" ", "_")).exists() for name, *_ in CASES[:25] if name != "sample without "
                 "checkpoint")
  assert not os.path.exists(os.path.join(ROOT, "gs:"))  # the unreachable gs:// workdir made no local folder


@pytest.mark.parametrize("process_id, expected", [
    (0, r"process 0 waited DJ_INIT_TIMEOUT=3s at 127\.0\.0\.1:\d+ for the other 1 process"),
    (1, r"process 1 could not reach the coordinator \(process 0\) at DJ_COORDINATOR_ADDRESS=127\.0\.0\.1:\d+"),
])
def test_a_process_whose_peers_never_come_ends_after_the_timeout(tmp_path, process_id, expected):
  from test_multiprocess import free_port
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "DJ_COORDINATOR_ADDRESS":
         f"127.0.0.1:{free_port()}", "DJ_NUM_PROCESSES": "2", "DJ_PROCESS_ID": str(process_id),
         "DJ_INIT_TIMEOUT": "3"}
  out = subprocess.run([sys.executable, "-m", "diffusion_jax.main", f"--config={FASHION}",
                        f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
  assert out.returncode == 1, out.stderr[-2000:]
  assert re.search(expected, out.stderr.strip().splitlines()[-1]), out.stderr[-2000:]
  assert not (tmp_path / "run").exists()


def test_a_process_told_another_process_count_is_one_line(tmp_path):
  """Process 1 says DJ_NUM_PROCESSES=3 to a coordinator that runs 2: JAX would run it as one of 2; it stops instead."""
  from test_multiprocess import free_port
  port, procs = free_port(), []
  for process_id, count in ((0, 2), (1, 3)):
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "DJ_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "DJ_NUM_PROCESSES": str(count), "DJ_PROCESS_ID": str(process_id), "DJ_INIT_TIMEOUT": "60"}
    procs.append(subprocess.Popen([sys.executable, "-m", "diffusion_jax.main", f"--config={FASHION}",
                                   f"--workdir={tmp_path / 'run'}"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  text=True, env=env, cwd=ROOT))
  try:
    err = procs[1].communicate(timeout=90)[1]
  finally:
    procs[0].kill()
    procs[0].communicate()
  assert procs[1].returncode == 1, err[-2000:]
  assert re.search(r"^error: distributed start-up: DJ_NUM_PROCESSES=3 for process 1, but the job at "
                   r"DJ_COORDINATOR_ADDRESS=127\.0\.0\.1:\d+ has 2 processes", err.strip().splitlines()[-1]), err[-2000:]
