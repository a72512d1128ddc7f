"""Runs survive preemption and mistakes, end to end through `python -m tna_jax.main`.

Preemption is a real SIGKILL: `TNA_KILL_AFTER=PHASE:STEP` makes the run kill itself right
after recording that step (deterministic), and one test kills a run from outside at
whatever moment it has reached. Results must then equal an uninterrupted run's bit for bit
(on this machine), and metrics must hold each step once.
"""

import concurrent.futures
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tna_jax.runs import checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[2]
LMC = ["--config=configs/fmnist_mlp.py:quick", "--config.num_train=1024", "--config.num_test=500",
       "--config.model.width=32", "--config.lmc.num_alphas=3", "--config.variants=vanilla,tna"]
# Each experiment: its flags, and where to preempt it (a step with no checkpoint after it
# where possible, so resuming also has to drop that step's metrics).
EXPERIMENTS = {
    "lmc": (LMC + ["--config.num_epochs=4", "--config.checkpoint.every=2"], "train:3"),
    "fed": (["--config=configs/fed_fmnist_cnn.py:quick", "--config.num_rounds=3", "--config.algorithms=fedavg,fedpfn",
             "--config.num_test=200", "--config.model.name=mlp", "--config.model.depth=1", "--config.model.width=32"],
            "fedpfn:2"),
    "soup": (["--config=configs/soup_vit_fmnist.py:quick", "--config.model.name=mlp", "--config.pretrain.num_epochs=2",
              "--config.pretrain.num_train=512", "--config.pretrain.batch_size=64", "--config.split.start=512",
              "--config.split.num_train=256", "--config.split.num_heldout=128", "--config.soup.num_models=2",
              "--config.soup.augment=none", "--config.soup.epochs=2", "--config.num_test=200",
              "--config.batch_size=64", "--config.eval_batch_size=200"], "finetune_none:1"),
    "sweep": (["--config=configs/default_sweep.py:quick", "--config.num_train=512", "--config.num_test=200",
               "--config.model.depth=1", "--config.model.width=16", "--config.lmc.num_alphas=3",
               "--config.sweep.grid=mask.fixed_fraction+pruning_fraction=0.2,0.4", "--config.sweep.seeds=1"],
              "measure:1"),  # the resumed point reuses vanilla's measurement from the history
    "cold": (["--config=configs/cold_fmnist.py:quick", "--config.model.name=mlp", "--config.base.source=init",
              "--config.cold.rounds=2", "--config.cold.tasks=0/1/2,3/4/5", "--config.cold.unseen_tasks=6/7",
              "--config.cold.examples_per_task=128", "--config.num_test=200", "--config.batch_size=64",
              "--config.eval_batch_size=200"], "fusion:2"),
}


def run_main(workdir, *flags, env=None, cwd=ROOT):
  cmd = [sys.executable, "-m", "tna_jax.main", f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def is_timing(key):
  """Keys that hold measured speed (seconds, FLOP/s, MFU): they differ between any two runs."""
  return "seconds" in key or "mfu" in key or key.endswith("per_s")


def without_timings(obj):
  if isinstance(obj, dict):
    return {k: without_timings(v) for k, v in obj.items() if not is_timing(k)}
  if isinstance(obj, list):
    return [without_timings(v) for v in obj]
  return obj


def metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_checkpoints(workdir):
  """Every output checkpoint, and the last numbered checkpoint of every phase, as numpy."""
  found = {}
  for path in sorted((workdir / "checkpoints").iterdir()):
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())
    if steps:
      with ocp.StandardCheckpointer() as checkpointer:
        found[f"{path.name}/{steps[-1]}"] = checkpointer.restore(path / str(steps[-1]) / "default")
    else:
      found[path.name] = checkpoints.restore(path)
  return found


def tree_digest(directory):
  """A digest of every file's relative path and bytes under `directory`."""
  digest = hashlib.sha256()
  for path in sorted(p for p in directory.rglob("*") if p.is_file()):
    digest.update(str(path.relative_to(directory)).encode() + path.read_bytes())
  return digest.hexdigest()


def in_parallel(jobs):
  """Runs `run_main` jobs (workdir, flags, env) two at a time (the machine's cores): much
  of each run is single-threaded start-up and compilation."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    return list(pool.map(lambda job: run_main(job[0], *job[1], env=job[2]), jobs))


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
  """Per experiment: an uninterrupted run, and a run killed at `kill_after` then resumed."""
  root = tmp_path_factory.mktemp("preempted")
  names = sorted(EXPERIMENTS)
  first = in_parallel([job for name in names for job in (
      (root / name / "straight", EXPERIMENTS[name][0], None),
      (root / name / "resumed", EXPERIMENTS[name][0], {"TNA_KILL_AFTER": EXPERIMENTS[name][1]}))])
  killed_results = {name: (root / name / "resumed" / "results.json").exists() for name in names}
  resumed = in_parallel([(root / name / "resumed", EXPERIMENTS[name][0], None) for name in names])
  return {name: (root / name, first[2 * i], first[2 * i + 1], killed_results[name], resumed[i])
          for i, name in enumerate(names)}


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_a_killed_run_resumes_to_the_results_of_an_uninterrupted_one(preempted, experiment):
  tmp_path, straight, killed, killed_wrote_results, resumed = preempted[experiment]
  assert straight.returncode == 0, straight.stderr[-3000:]
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not killed_wrote_results
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming the unfinished run" in resumed.stdout

  a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("straight", "resumed"))
  assert without_timings(a) == without_timings(b)
  steps = [(r["phase"], r["step"]) for r in metrics(tmp_path / "resumed")]
  assert len(steps) == len(set(steps)), f"duplicate metrics steps: {steps}"
  assert without_timings(metrics(tmp_path / "straight")) == without_timings(metrics(tmp_path / "resumed"))
  ours, theirs = final_checkpoints(tmp_path / "straight"), final_checkpoints(tmp_path / "resumed")
  assert ours.keys() == theirs.keys() and ours
  for name in ours:
    for x, y in zip(jax.tree.leaves(ours[name]), jax.tree.leaves(theirs[name]), strict=True):
      np.testing.assert_array_equal(x, y, err_msg=name)


def test_overwrite_replaces_a_run_only_once_the_new_one_is_complete(tmp_path):
  workdir = tmp_path / "run"
  first = run_main(workdir, *LMC)
  assert first.returncode == 0, first.stderr[-2000:]
  before = tree_digest(workdir)
  old_results = (workdir / "results.json").read_bytes()

  killed = run_main(workdir, *LMC, "--config.overwrite=True", "--config.init_seed=7",
                    env={"TNA_KILL_AFTER": "train:1"})
  assert killed.returncode == -signal.SIGKILL
  assert tree_digest(workdir) == before, "a killed overwrite must leave the old run untouched"
  assert checkpoints.restore(workdir / "checkpoints" / "tna_0")  # and readable

  done = run_main(workdir, *LMC, "--config.overwrite=True", "--config.init_seed=7")
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads((workdir / "results.json").read_text())["config"]["init_seed"] == 7
  (backup,) = tmp_path.glob("run.previous-*")
  assert (backup / "results.json").read_bytes() == old_results
  assert not (tmp_path / "run.next").exists() and not (workdir / ".lock").exists()


def test_a_second_run_into_a_live_workdir_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
  workdir = tmp_path / "run"
  flags = LMC + ["--config.num_train=4000", "--config.num_epochs=12"]
  live = subprocess.Popen([sys.executable, "-m", "tna_jax.main", f"--workdir={workdir}", *flags], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    committed = lambda: [p for p in (workdir / "checkpoints" / "train").glob("*") if p.name.isdigit()]
    while not committed() and time.time() < deadline:
      time.sleep(0.05)
    live.send_signal(signal.SIGSTOP)  # alive but paused: whatever the machine's speed, it holds the workdir
    assert (workdir / ".lock").exists() and not (workdir / "results.json").exists(), "the run never started"
    second = run_main(workdir, *flags)
    assert second.returncode == 2 and "in use by a live run" in second.stderr
  finally:
    live.send_signal(signal.SIGKILL)  # preempted from outside, at whatever step it reached
    live.wait()
  resumed = run_main(workdir, *flags, "--config.checkpoint.every=6")  # checkpoint.every may change on resume
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "train: resuming after epoch" in resumed.stdout and (workdir / "results.json").exists()


def _corrupt_checkpoint(tmp_path):
  path = tmp_path / "corrupt_base"
  checkpoints.save(path, {"params": {"w": np.arange(10000, dtype=np.float32)}})
  data = max((p for p in path.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  data.write_bytes(bytes(raw))
  return path


SOUP = "--config=configs/soup_vit_fmnist.py:quick"
BAD_INPUTS = {
    "typo in a key": ([*LMC, "--config.mask.fixed_fractio=0.3"], "unknown config key"),
    "missing config file": (["--config=configs/no_such.py"], "config file 'configs/no_such.py' does not exist"),
    "bad preset": (["--config=configs/fmnist_mlp.py:quik"], "config preset='quik' is not supported"),
    "non-numeric value": ([*LMC, "--config.num_epochs=abc"], "--config.num_epochs=abc"),
    "batch larger than the data": ([*LMC, "--config.batch_size=5000"], "batch_size=5000 is out of range"),
    "zero eval batch": ([*LMC, "--config.eval_batch_size=0"], "eval_batch_size=0 must be >= 1"),
    "repeated variant": ([*LMC, "--config.variants=tna,tna"], "variants='tna,tna' names 'tna' twice"),
    "empty base.path": ([SOUP, "--config.base.source=orbax"], "needs base.path"),
    "corrupt base.path": ([SOUP, "--config.base.source=orbax", "--config.base.path={corrupt}"], "is corrupt"),
    "workdir is a file": ([*LMC], "is a file"),
    "workdir not writable": ([*LMC], "cannot be created"),
}


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
  """Every BAD_INPUTS case run once (two at a time): (workdir, result)."""
  root = tmp_path_factory.mktemp("mistakes")
  jobs = []
  for i, case in enumerate(sorted(BAD_INPUTS)):
    flags = [f.format(corrupt=_corrupt_checkpoint(root)) if "{corrupt}" in f else f for f in BAD_INPUTS[case][0]]
    workdir = root / f"run{i}"
    if case == "workdir is a file":
      workdir.write_text("notes")
    if case == "workdir not writable":
      workdir = pathlib.Path("/sys/fs/tna_jax_test_run")  # mkdir is refused there, even for root
    jobs.append((workdir, flags, None))
  return {case: (job[0], result) for case, job, result in zip(sorted(BAD_INPUTS), jobs, in_parallel(jobs))}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_each_mistake_is_one_line_exit_2_and_writes_nothing(mistakes, case):
  workdir, result = mistakes[case]
  message = BAD_INPUTS[case][1]
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr[-2000:]
  if case == "workdir is a file":
    assert workdir.read_text() == "notes"
  else:
    assert not workdir.exists()


def test_a_diverging_run_exits_non_zero_with_no_results(tmp_path):
  result = run_main(tmp_path / "run", *LMC, "--config.optimizer.learning_rate=1e6")
  assert result.returncode == 3
  assert "training diverged" in result.stderr and "Traceback" not in result.stderr
  assert not (tmp_path / "run" / "results.json").exists()
  assert not (tmp_path / "run" / "metrics.jsonl").exists() or "NaN" not in (tmp_path / "run" / "metrics.jsonl").read_text()


GCS_RUNNER = """
import functools, os, sys
import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

BUCKETS = os.path.abspath(sys.argv[1])  # the offline stand-in for gs://: gs://B/P lives at BUCKETS/B/P


class OfflineGCS(DirFileSystem):
  protocol = ("gs", "gcs")

  def __init__(self, *args, **kwargs):
    super().__init__(path=BUCKETS, fs=LocalFileSystem())

  def _join(self, path):
    strip = lambda p: p.removeprefix("gs://")
    return super()._join([strip(p) for p in path] if isinstance(path, (list, tuple)) else strip(path))


for protocol in ("gs", "gcs"):  # epath reaches gs:// through fsspec
  fsspec.register_implementation(protocol, OfflineGCS, clobber=True)
# orbax writes arrays with tensorstore's own GCS driver: point it at the same directory, and
# answer its bucket-capabilities query (a network call) offline.
from orbax.checkpoint._src.path import gcs_utils
from orbax.checkpoint._src.serialization import tensorstore_utils
gcs_utils.is_hierarchical_namespace_enabled = lambda path: False
original = tensorstore_utils.build_kvstore_tspec
tensorstore_utils.build_kvstore_tspec = functools.wraps(original)(
    lambda directory, *a, **k: original(os.path.join(BUCKETS, os.fspath(directory).removeprefix("gs://"))
                                        if os.fspath(directory).startswith("gs://") else directory, *a, **k))

from absl import app
from tna_jax import main
sys.argv = ["main"] + sys.argv[2:]
app.run(main.main, flags_parser=main.parse_flags)
"""


def test_a_bucket_workdir_is_written_through_the_path_abstraction_only(tmp_path):
  runner = tmp_path / "gcs_runner.py"
  runner.write_text(GCS_RUNNER)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  flags = [f.replace("configs/", f"{ROOT}/configs/") for f in LMC]
  cmd = [sys.executable, str(runner), str(tmp_path / "buckets"), "--workdir=gs://bucket/run", *flags]
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  killed = subprocess.run(cmd + ["--config.num_epochs=2"], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**env, "TNA_KILL_AFTER": "train:1"})
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  result = subprocess.run(cmd + ["--config.num_epochs=2"], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Results in gs://bucket/run" in result.stdout and "Resuming" in result.stdout
  run = tmp_path / "buckets" / "bucket" / "run"
  for name in ("results.json", "config.json", "metrics.jsonl", "lmc_curves.png"):
    assert (run / name).stat().st_size > 0, name
  assert list((run / "tensorboard" / "train").iterdir())
  assert checkpoints.restore(run / "checkpoints" / "tna_1")
  assert not any(cwd.iterdir()), f"something was written beside the bucket: {list(cwd.iterdir())}"
  assert [r["step"] for r in metrics(run)] == [1, 2]
