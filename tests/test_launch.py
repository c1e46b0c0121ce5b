"""launch/: the TPU VM and SLURM scripts in --dry-run mode print the commands they would run."""

import os
import subprocess

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
  assert delete == "gcloud compute tpus tpu-vm delete pod --zone us-central2-b --quiet "
  lines, stderr = _dry_run("tpu_vm.sh", "configs/latent.py", "runs/local", TPU_NAME="pod", ZONE="z", KEEP="1",
                           CREATE="0")
  assert "not gs://" in stderr and not any("create" in x or "delete" in x for x in lines)


def test_slurm_prints_the_job_and_each_tasks_command():
  lines, _ = _dry_run("slurm_gpu.sh", "configs/cifar10_ddpm.py", "/shared/run", "--config.mesh.fsdp=8", NODES="4")
  assert lines[0].startswith("sbatch --nodes=4 --gpus-per-node=8") and lines[0].endswith(
      "configs/cifar10_ddpm.py /shared/run --config.mesh.fsdp=8")
  assert "DJ_NUM_PROCESSES=4" in lines[1] and "--config.mesh.fsdp=8" in lines[1]
