"""The experiment runtime's parts: workdir states, the lock, verified checkpoints, phases."""

import json
import logging
import os
import pathlib
import socket

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tna_jax.alignment import interpolation
from tna_jax.config import loader, schema
from tna_jax.errors import ConfigError
from tna_jax.experiments import lmc as lmc_experiment
from tna_jax.runs import checkpoints, files, reporting, runtime, workdir


def _config(**values):
  return ml_collections.ConfigDict(dict(overwrite=False, checkpoint=loader.checkpoint_config(), **values))


def _flip_bytes(directory: pathlib.Path) -> None:
  """Flips three bytes in the middle of the largest array data file of a checkpoint."""
  data = max((p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  for i in range(len(raw) // 2, len(raw) // 2 + 3):
    raw[i] ^= 0xFF
  data.write_bytes(bytes(raw))


def test_workdir_states_decide_fresh_resume_refuse_or_stage(tmp_path):
  root = tmp_path / "run"
  config = {"lr": 0.1, "overwrite": False, "checkpoint": {"every": 1}}
  plan = workdir.plan(root, config, overwrite=False)
  assert (plan.directory, plan.resume, plan.staged) == (files.path(root), False, False)
  assert not root.exists(), "planning writes nothing"

  workdir.start(plan, config).release()
  assert json.loads((root / "config.json").read_text()) == config
  assert workdir.plan(root, {**config, "checkpoint": {"every": 5}}, overwrite=False).resume  # resumable key
  with pytest.raises(ConfigError, match="unfinished run whose config differs in lr"):
    workdir.plan(root, {**config, "lr": 0.2}, overwrite=False)

  (root / "results.json").write_text("{}")
  with pytest.raises(ConfigError, match="already holds a finished run"):
    workdir.plan(root, config, overwrite=False)
  staged = workdir.plan(root, {**config, "lr": 0.2}, overwrite=True)
  assert staged.staged and staged.directory == files.path(tmp_path / "run.next") and not staged.resume

  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(ConfigError, match="files that are not a tna_jax run"):
    workdir.plan(foreign, config, overwrite=False)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ConfigError, match="is a file"):
    workdir.plan(tmp_path / "file", config, overwrite=False)


def test_an_overwrite_swaps_in_only_when_complete_and_keeps_the_old_run(tmp_path):
  root = tmp_path / "run"
  root.mkdir()
  (root / "config.json").write_text("{}")
  (root / "results.json").write_text('{"old": true}')
  plan = workdir.plan(root, {"new": 1}, overwrite=True)
  workdir.start(plan, {"new": 1}).release()
  assert (root / "results.json").read_text() == '{"old": true}', "the old run is untouched while the new one runs"
  (tmp_path / "run.next" / "results.json").write_text('{"new": true}')
  backup = workdir.complete(plan)
  assert (root / "results.json").read_text() == '{"new": true}'
  assert (pathlib.Path(backup) / "results.json").read_text() == '{"old": true}'
  assert not (tmp_path / "run.next").exists()


def test_an_interrupted_swap_is_finished_by_the_next_command(tmp_path):
  staging = tmp_path / "run.next"  # killed after moving the old run away, before moving the new one in
  staging.mkdir()
  (staging / "config.json").write_text("{}")
  (staging / "results.json").write_text('{"new": true}')
  with pytest.raises(ConfigError, match="finished run"):
    workdir.plan(tmp_path / "run", {}, overwrite=False)
  assert (tmp_path / "run" / "results.json").read_text() == '{"new": true}'


def test_a_live_lock_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path):
  lock = workdir.Lock(files.path(tmp_path))
  lock.acquire()
  with pytest.raises(ConfigError, match="in use by a live run"):
    workdir.Lock(files.path(tmp_path)).acquire()
  lock.release()
  assert not (tmp_path / ".lock").exists()
  dead = {"host": socket.gethostname(), "pid": 2**22 + 12345, "token": "x", "heartbeat": 0}  # no such pid
  (tmp_path / ".lock").write_text(json.dumps(dead))
  taker = workdir.Lock(files.path(tmp_path))
  taker.acquire()
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  taker.release()
  other_host = {"host": "elsewhere", "pid": 1, "token": "y", "heartbeat": 1e18}  # heartbeat fresh
  (tmp_path / ".lock").write_text(json.dumps(other_host))
  with pytest.raises(ConfigError, match="host elsewhere"):
    workdir.Lock(files.path(tmp_path)).acquire()


def test_a_flipped_byte_in_a_checkpoint_is_detected_and_named(tmp_path):
  tree = {"params": {"kernel": np.arange(4096, dtype=np.float32).reshape(64, 64), "bias": np.zeros(64, np.float32)}}
  checkpoints.save(tmp_path / "model", tree)
  np.testing.assert_array_equal(checkpoints.restore(tmp_path / "model")["params"]["kernel"], tree["params"]["kernel"])
  _flip_bytes(tmp_path / "model")
  with pytest.raises(checkpoints.CheckpointError, match=r"model is corrupt: \['params'\]\['kernel'\]"):
    checkpoints.restore(tmp_path / "model")

  steps = checkpoints.StepCheckpoints(tmp_path / "phase", keep=2)
  steps.save(1, tree, {"history": [{"loss": 1.0}]})
  steps.close()
  _flip_bytes(tmp_path / "phase" / "1")
  with pytest.raises(checkpoints.CheckpointError, match="phase/1 is corrupt.*resumes from the checkpoint before it"):
    checkpoints.StepCheckpoints(tmp_path / "phase").restore(1, tree)


def test_changed_history_json_in_a_checkpoint_is_detected(tmp_path):
  steps = checkpoints.StepCheckpoints(tmp_path, keep=2)
  steps.save(1, {"w": np.ones(3, np.float32)}, {"history": [{"loss": 0.5}]})
  steps.close()
  meta_file = tmp_path / "1" / "_CHECKPOINT_METADATA"
  meta_file.write_text(meta_file.read_text().replace("0.5", "0.25"))
  with pytest.raises(checkpoints.CheckpointError, match="#meta"):
    checkpoints.StepCheckpoints(tmp_path).restore(1, {"w": np.ones(3, np.float32)})


def test_steps_are_saved_every_n_keep_n_and_always_the_last(tmp_path):
  steps = checkpoints.StepCheckpoints(tmp_path, keep=2, every=3, last=7)
  assert [s for s in range(1, 8) if steps.due(s)] == [3, 6, 7]
  for s in (3, 6, 7):
    steps.save(s, {"w": np.full(2, s, np.float32)}, {"history": list(range(s))})
  state, meta = steps.restore(steps.latest_step(), {"w": np.zeros(2, np.float32)})
  assert steps.latest_step() == 7 and sorted(os.listdir(tmp_path)) == ["6", "7"]
  np.testing.assert_array_equal(state["w"], [7, 7]) and meta["history"] == list(range(7))
  steps.close()


def test_a_diverged_step_is_an_error_and_the_last_good_checkpoint_stays(tmp_path):
  with runtime.Run(_config(), str(tmp_path)) as run:
    run.start()
    phase = run.phase("train", total=5, unit="epoch", names=["a", "b"])
    state, history = phase.restore({"w": jnp.zeros(2)})
    assert history == []
    phase.record({"epoch": 1, "train_loss": [0.5, 0.4]}, state)
    with pytest.raises(runtime.DivergedError, match=r"not finite at epoch 2 \(models b\).*epoch 1\) is kept"):
      phase.record({"epoch": 2, "train_loss": [0.3, float("nan")]}, state)
    assert phase.checkpoints.latest_step() == 1
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1], "the diverged step is not recorded"
  assert not (tmp_path / "results.json").exists() and not (tmp_path / ".lock").exists()


def test_a_nan_curve_has_nan_barriers_never_zero():
  alphas = np.linspace(0, 1, 5)
  result = interpolation.barriers(alphas, np.array([0.1, np.nan, 0.2, 0.2, 0.1]), np.full(5, 0.1))
  assert all(np.isnan(v) for v in result.values())
  assert reporting.format_table([result], (("b", "accuracy_barrier_pp", ".2f"),)).splitlines()[-1].strip() == "nan"
  with pytest.raises(runtime.DivergedError, match="non-finite"):
    lmc_experiment.check_finite_curves({"vanilla": {"loss": [0.1, np.nan], "accuracy": [0.5, 0.5]}})


def test_results_are_strict_json_with_null_for_non_finite_values_and_mode_0644(tmp_path):
  old = os.umask(0o022)
  try:
    files.write_json(tmp_path / "results.json", {"x": np.float32(np.nan), "y": [1.0, np.inf], "z": jnp.ones(2)})
  finally:
    os.umask(old)
  text = (tmp_path / "results.json").read_text()
  assert json.loads(text) == {"x": None, "y": [1.0, None], "z": [1.0, 1.0]} and "NaN" not in text
  assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "no temporary file is left behind"


def test_checkpoint_keys_are_validated():
  config = loader.defaults("lmc")
  config.checkpoint.keep = 0
  with pytest.raises(ConfigError, match="checkpoint.keep=0 must be >= 1"):
    schema.validate(config)


def test_jax_arrays_on_device_round_trip_through_step_checkpoints_without_orbax_warnings(tmp_path, caplog):
  steps = checkpoints.StepCheckpoints(tmp_path)
  tree = {"a": jax.random.normal(jax.random.key(0), (3, 5)), "b": {}}
  steps.save(1, tree, {"history": []})
  steps.close()
  with caplog.at_level(logging.WARNING):
    resumed = checkpoints.StepCheckpoints(tmp_path)  # as a resumed run opens them
    restored, _ = resumed.restore(1, tree)
  np.testing.assert_array_equal(restored["a"], np.asarray(tree["a"]))
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # a resume's log stays clean
  resumed.close()
