"""The launch scripts' dry runs print the exact commands and run none of them."""

import os
import shlex
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


@pytest.fixture
def trap_path(tmp_path):
  """A PATH whose gcloud, srun, nvidia-smi and python3 fail loudly: a dry run must call none."""
  for tool in ("gcloud", "srun", "sbatch", "nvidia-smi", "python3", "pip"):
    fake = tmp_path / tool
    fake.write_text(f"#!/bin/sh\necho 'dry run executed {tool}' >&2\nexit 99\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  return f"{tmp_path}{os.pathsep}{os.environ['PATH']}"


def _launch(script, *args, env=None, path):
  result = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PATH": path, **(env or {})}, check=False)
  assert "dry run executed" not in result.stderr
  return result


def _commands(stdout):
  """Each printed line as the argument list the shell would run."""
  return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def test_tpu_pod_dry_run(trap_path):
  result = _launch("tpu_pod.sh", "--name", "pod", "--zone", "us-central2-b", "--accelerator", "v4-32", "--config",
                   "configs/fmnist_mlp.py:quick", "--workdir", "/tmp/my run", "--spot", "--fetch", "out", "--delete",
                   "--dry-run", "--", "--config.num_epochs=3", path=trap_path)
  assert result.returncode == 0, result.stderr
  create, archive, scp, setup, train, fetch, delete = _commands(result.stdout)
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-central2-b",
                    "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]
  assert archive[:2] == ["git", "-C"] and archive[3:5] == ["archive", "--format=tar.gz"]
  tarball = archive[5].removeprefix("--output=")
  assert scp[4:7] == ["scp", tarball, "pod:~/tna_jax.tar.gz"] and "--worker=all" in scp
  assert setup[4] == "ssh" and "--worker=all" in setup and 'pip install -U "jax[tpu]"' in setup[-1]
  assert train[4] == "ssh" and "--worker=all" in train
  command = train[-1].removeprefix("--command=")
  assert command.startswith("cd ~/tna_jax && TNA_DISTRIBUTED=1 python3 -m tna_jax.main")
  # The remote shell gets the workdir with its space intact and the extra flag after it.
  assert shlex.split(command)[-3:] == ["--config=configs/fmnist_mlp.py:quick", "--workdir=/tmp/my run",
                                      "--config.num_epochs=3"]
  assert fetch[4:7] == ["scp", "--recurse", "pod:/tmp/my run"] and "--worker=0" in fetch
  assert delete[4:6] == ["delete", "pod"]


def test_tpu_pod_requires_its_arguments(trap_path):
  result = _launch("tpu_pod.sh", "--zone", "z", "--config", "c.py", "--workdir", "w", "--dry-run", path=trap_path)
  assert result.returncode == 2 and "--name is required" in result.stderr and not result.stdout
  result = _launch("tpu_pod.sh", "--name", "p", "--zone", "z", "--config", "c.py", "--workdir", "w", "--dry-run",
                   path=trap_path)
  assert result.returncode == 2 and "--accelerator is required" in result.stderr
  result = _launch("tpu_pod.sh", "--bogus", path=trap_path)
  assert result.returncode == 2 and "unknown argument --bogus" in result.stderr


def test_gpu_host_dry_run_one_process_for_all_gpus(trap_path):
  result = _launch("gpu_host.sh", "--config", "configs/resnet20.py", "--workdir", "/tmp/w", "--install",
                   "--dry-run", "--", "--config.num_epochs=1", path=trap_path)
  assert result.returncode == 0, result.stderr
  install_jax, install_repo, train = _commands(result.stdout)
  assert install_jax == ["python3", "-m", "pip", "install", "-U", "jax[cuda12]"]
  assert install_repo == ["python3", "-m", "pip", "install", "-e", REPO]
  assert train == ["python3", "-m", "tna_jax.main", "--config=configs/resnet20.py", "--workdir=/tmp/w",
                   "--distributed=off", "--config.num_epochs=1"]


def test_gpu_host_dry_run_one_process_per_gpu(trap_path):
  result = _launch("gpu_host.sh", "--config", "c.py", "--workdir", "w", "--processes", "2", "--gpus", "4,5",
                   "--port", "4321", "--dry-run", path=trap_path)
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  assert len(commands) == 2
  for i, (command, gpu) in enumerate(zip(commands, ("4", "5"))):
    assert command == ["env", f"CUDA_VISIBLE_DEVICES={gpu}", "JAX_COORDINATOR_ADDRESS=127.0.0.1:4321",
                       "JAX_NUM_PROCESSES=2", f"JAX_PROCESS_ID={i}", "python3", "-m", "tna_jax.main",
                       "--config=c.py", "--workdir=w", "--distributed=on"]
  result = _launch("gpu_host.sh", "--config", "c.py", "--workdir", "w", "--processes", "3", "--gpus", "0,1",
                   "--dry-run", path=trap_path)
  assert result.returncode == 2 and "needs as many GPUs" in result.stderr


def test_slurm_dry_run(trap_path):
  result = _launch("slurm.sbatch", "configs/resnet20.py", "/shared/run", "--config.num_epochs=2",
                   env={"DRY_RUN": "1"}, path=trap_path)
  assert result.returncode == 0, result.stderr
  assert _commands(result.stdout) == [["srun", "--kill-on-bad-exit=1", "python3", "-m", "tna_jax.main",
                                       "--config=configs/resnet20.py", "--workdir=/shared/run", "--distributed=on",
                                       "--config.num_epochs=2"]]
  with open(os.path.join(LAUNCH, "slurm.sbatch")) as f:
    directives = [line.split()[1] for line in f if line.startswith("#SBATCH")]
  assert "--ntasks-per-node=8" in directives and "--gpus-per-node=8" in directives
  result = _launch("slurm.sbatch", "configs/resnet20.py", env={"DRY_RUN": "1"}, path=trap_path)
  assert result.returncode == 2 and "usage" in result.stderr


def test_tpu_help_says_that_rerunning_a_preempted_spot_run_resumes_it(trap_path):
  result = _launch("tpu_pod.sh", "--help", path=trap_path)
  assert result.returncode == 0
  text = " ".join(result.stdout.split())
  assert "--spot creates a Spot (preemptible) slice" in text and "run the SAME command again" in text
  assert "continues from its last checkpoint" in text and "gs://" in text
