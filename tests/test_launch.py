"""launch/: the TPU VM and SLURM scripts in --dry-run mode print the commands they would run."""

import os
import shlex
import subprocess

import pytest

from helpers import ROOT


def _dry_run(script, *args, **env):
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", script), "--dry-run", *args], capture_output=True,
                       text=True, env={**os.environ, **env}, timeout=60)
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines(), out.stderr


def test_tpu_vm_creates_copies_installs_runs_on_all_workers_and_deletes():
  lines, stderr = _dry_run("tpu_vm.sh", "configs/cifar10_ddpm.py", "gs://bucket/run", "--config.mesh.fsdp=4",
                           TPU_NAME="pod", ZONE="us-central2-b", ACCELERATOR_TYPE="v4-32")
  assert len(lines) == 5 and not stderr
  create, archive, scp, ssh, delete = lines
  assert create.startswith("gcloud compute tpus tpu-vm create pod --zone us-central2-b --accelerator-type v4-32")
  assert archive.startswith("tar -czf") and f"-C {ROOT}" in archive and "--exclude=./runs" in archive
  assert scp.startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in scp
  assert ssh.startswith("gcloud compute tpus tpu-vm ssh pod") and "--worker=all" in ssh
  for part in ("pip\\ install", "DJ_DISTRIBUTED=auto", "--config=configs/cifar10_ddpm.py",
               "--workdir=gs://bucket/run", "--config.mesh.fsdp=4"):
    assert part in ssh, (part, ssh)
  assert delete == "gcloud compute tpus tpu-vm delete pod --zone us-central2-b --quiet "  # printed, not run
  lines, stderr = _dry_run("tpu_vm.sh", "configs/latent.py", "runs/local", TPU_NAME="pod", ZONE="z", KEEP="1",
                           CREATE="0")
  assert "not gs://" in stderr and not any("create" in x or "delete" in x for x in lines)
  lines, _ = _dry_run("tpu_vm.sh", "configs/latent.py", "gs://b/r", TPU_NAME="pod", ZONE="z", CREATE="0")
  assert not any("delete" in x for x in lines)  # an existing TPU is not this script's to delete


def test_slurm_prints_the_job_and_each_tasks_command():
  lines, _ = _dry_run("slurm_gpu.sh", "configs/cifar10_ddpm.py", "/shared/run", "--config.mesh.fsdp=8", NODES="4")
  assert lines[0].startswith("sbatch --nodes=4 --gpus-per-node=8") and lines[0].endswith(
      "configs/cifar10_ddpm.py /shared/run --config.mesh.fsdp=8")
  assert "DJ_NUM_PROCESSES=4" in lines[1] and "--config.mesh.fsdp=8" in lines[1]


# Overrides a shell would split or expand if they were passed unquoted: spaces, both quotes, parentheses, commas.
_AWKWARD = ('--config.mesh.partition_rules=(("conv", "None,None,fsdp"),)', "--config.name=it's a \"run\"")


def test_tpu_vm_passes_workdir_and_overrides_with_spaces_and_quotes_as_one_argument_each():
  lines, _ = _dry_run("tpu_vm.sh", "configs/cifar10_ddpm.py", "gs://bucket/my run", *_AWKWARD, TPU_NAME="pod",
                      ZONE="z")
  ssh = shlex.split(next(x for x in lines if " ssh " in x))
  remote = shlex.split(ssh[ssh.index("--command") + 1])  # what the workers' shell splits the command string into
  python = remote[remote.index("diffusion_jax.main") + 1:]
  assert python == ["--config=configs/cifar10_ddpm.py", "--workdir=gs://bucket/my run", *_AWKWARD], python
  lines, _ = _dry_run("tpu_vm.sh", "configs/cifar10_ddpm.py", "gs://bucket/run", TPU_NAME="pod", ZONE="z")
  remote = shlex.split(shlex.split(next(x for x in lines if " ssh " in x))[-1])
  # No overrides: no empty argument after the workdir.
  assert remote[remote.index("diffusion_jax.main") + 1:] == ["--config=configs/cifar10_ddpm.py",
                                                              "--workdir=gs://bucket/run"]


def _fake_bin(directory, **scripts):
  os.makedirs(directory, exist_ok=True)
  for name, body in scripts.items():
    path = os.path.join(directory, name)
    with open(path, "w") as f:
      f.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
  return directory


# gcloud that logs each call and fails or is interrupted as FAKE_CREATE / FAKE_SSH say; a tar that archives nothing.
_GCLOUD = """echo "$*" >> "$FAKE_LOG"
case "$4" in  # gcloud compute tpus tpu-vm SUBCOMMAND
  create) if [ "$FAKE_CREATE" = fail ]; then exit 5; fi ;;
  ssh) case "$FAKE_SSH" in fail) exit 7 ;; term) kill -TERM "$PPID" ;; esac ;;
esac
exit 0
"""


@pytest.mark.parametrize("create, ssh, keep, status, deleted", [
    ("ok", "ok", "0", 0, True),
    ("ok", "fail", "0", 7, True),     # the run failed: still deleted, and the run's status is the script's
    ("ok", "term", "0", 143, True),   # killed (Ctrl-C, kill) during the run: still deleted
    ("ok", "fail", "1", 7, False),    # KEEP=1 keeps it even then
    ("fail", "ok", "0", 5, False),    # a failed create (the name may be someone else's TPU) deletes nothing
])
def test_tpu_vm_deletes_the_tpu_it_created_on_any_exit(tmp_path, create, ssh, keep, status, deleted):
  log = tmp_path / "gcloud.log"
  bin_dir = _fake_bin(str(tmp_path / "bin"), gcloud=_GCLOUD, tar="exit 0\n")
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_vm.sh"), "configs/cifar10_ddpm.py",
                        "gs://bucket/run"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "TPU_NAME": "pod",
                            "ZONE": "z", "KEEP": keep, "FAKE_LOG": str(log), "FAKE_CREATE": create, "FAKE_SSH": ssh})
  calls = log.read_text().splitlines()
  assert out.returncode == status, (out.returncode, calls, out.stderr)
  assert [c.split()[3] for c in calls] == ["create"] + (create == "ok") * ["scp", "ssh"] + deleted * ["delete"], calls
  if deleted:
    assert calls[-1] == "compute tpus tpu-vm delete pod --zone z --quiet"


def test_slurm_passes_workdir_and_overrides_with_spaces_and_quotes_as_one_argument_each(tmp_path):
  lines, _ = _dry_run("slurm_gpu.sh", "configs/cifar10_ddpm.py", "/shared/my run", *_AWKWARD, NODES="4", DJ_PORT="999")
  assert len(lines) == 2
  assert shlex.split(lines[0])[-4:] == ["configs/cifar10_ddpm.py", "/shared/my run", *_AWKWARD]
  command = shlex.split(lines[1])  # the command the job runs, as printed: quoted, so it splits back into its argv
  assert command[:4] == ["env", "DJ_COORDINATOR_ADDRESS=<first node>:999", "DJ_NUM_PROCESSES=4", "srun"]
  # Run what srun would start in each task, with a python that prints its rank and arguments, one per line.
  bin_dir = _fake_bin(str(tmp_path), python='echo "$DJ_PROCESS_ID"; printf "%s\\n" "$@"\n')
  task = subprocess.run(command[4:], capture_output=True, text=True, timeout=60,
                        env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "SLURM_PROCID": "3"})
  assert task.returncode == 0, task.stderr
  assert task.stdout.splitlines() == ["3", "-m", "diffusion_jax.main", "--config=configs/cifar10_ddpm.py",
                                      "--workdir=/shared/my run", *_AWKWARD]
