"""The sweep experiment and the report command: grids, one compiled program per shape, the
mean and spread over seeds, K-model fusion, tidy CSVs and the combination of workdirs.

(A sweep killed midway and resumed is in tests/runs/test_preemption.py, through `main`.)
"""

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tna_jax.alignment import measurement
from tna_jax.config import grid, loader, schema
from tna_jax.core import data, execution, models, sharding, train
from tna_jax.errors import ConfigError
from tna_jax.experiments import sweep
from tna_jax.runs import aggregate, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The columns sweep_rows.csv documents (README, "Sweeps"), in order, for an MLP without alignment.
DOCUMENTED_COLUMNS = ["point", "mask.fixed_fraction", "pruning_fraction", "model.width", "variant", "label", "seed",
                      "init_seed", "curve", "accuracy_a", "accuracy_b", "accuracy_mid", "loss_barrier",
                      "accuracy_barrier_pp", "accuracy_barrier_rel", "loss_barrier_alpha", "accuracy_barrier_alpha",
                      "loss_barrier_mean", "loss_barrier_max", "accuracy_barrier_pp_mean", "accuracy_barrier_pp_max",
                      "mean_endpoint_accuracy", "fused_accuracy", "fused_loss", "fusion_gain_pp"]


def tiny_config(grid_text="mask.fixed_fraction+pruning_fraction=0,0.3; model.width=8,16", seeds=2):
  config = loader.apply_preset(loader.defaults("sweep"), "quick")
  config.num_train, config.num_test, config.model.depth, config.lmc.num_alphas = 512, 200, 1, 3
  config.sweep.grid, config.sweep.seeds = grid_text, seeds
  return config


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
  """2 ratios x 2 widths x 2 seeds of vanilla, TNA-PFN and pruning, counting the compiled
  training programs (one `make_train_epochs` each)."""
  built = []
  original = train.make_train_epochs

  def counting(*args, **kwargs):
    built.append(args[0])
    return original(*args, **kwargs)

  workdir = tmp_path_factory.mktemp("sweep")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train, "make_train_epochs", counting)
    results = sweep.run(tiny_config(), str(workdir))
  return workdir, results, built


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_points_that_share_shapes_train_as_one_compiled_program(tiny_sweep):
  _, results, built = tiny_sweep
  # Per width and seed: vanilla (which a ratio of 0 is, for TNA-PFN and pruning alike), TNA-PFN
  # at 0.3 and pruning at 0.3, 2 models each: 3 x 2 seeds x 2 models = 12 models per width.
  assert results["programs"] == len(built) == 2
  assert results["models"] == 24
  assert [m.width for m in built] == [8, 16]


def test_the_csv_has_one_row_per_point_variant_and_seed_with_the_documented_columns(tiny_sweep):
  workdir, results, _ = tiny_sweep
  rows = read_csv(workdir / "sweep_rows.csv")
  assert list(rows[0]) == DOCUMENTED_COLUMNS
  keys = [(r["point"], r["variant"], r["seed"]) for r in rows]
  assert len(keys) == len(set(keys)) == 4 * 3 * 2 == len(results["rows"])
  assert {r["label"] for r in rows} >= {"vanilla", "TNA-PFN (30 % fixed)", "pruning at init (30 %)"}


def test_models_that_train_identically_are_measured_identically(tiny_sweep):
  _, results, _ = tiny_sweep
  by = {(r["mask.fixed_fraction"], r["model.width"], r["variant"], r["seed"]): r for r in results["rows"]}
  for width in (8, 16):
    for seed in (0, 1):
      vanilla = by[(0.0, width, "vanilla", seed)]
      for same in (by[(0.3, width, "vanilla", seed)], by[(0.0, width, "tna", seed)], by[(0.0, width, "pruning", seed)]):
        assert same["loss_barrier"] == vanilla["loss_barrier"] and same["accuracy_a"] == vanilla["accuracy_a"]
      assert by[(0.3, width, "tna", seed)]["accuracy_a"] != vanilla["accuracy_a"]
  assert by[(0.0, 8, "vanilla", 0)]["accuracy_a"] != by[(0.0, 8, "vanilla", 1)]["accuracy_a"]  # seeds differ


def test_the_summary_is_the_mean_and_spread_over_seeds(tiny_sweep):
  workdir, results, _ = tiny_sweep
  assert len(results["summary"]) == 4 * 3
  for row in results["summary"]:
    members = [r for r in results["rows"] if r["point"] == row["point"] and r["variant"] == row["variant"]]
    assert row["n"] == len(members) == 2
    for metric in ("loss_barrier", "accuracy_barrier_pp", "mean_endpoint_accuracy", "fused_accuracy"):
      values = np.array([m[metric] for m in members])
      assert row[metric] == pytest.approx(values.mean())
      assert row[f"{metric}_std"] == pytest.approx(values.std(ddof=1))
      assert row[f"{metric}_ci95"] == pytest.approx(12.706205 * values.std(ddof=1) / np.sqrt(2), rel=1e-5)
  assert len(read_csv(workdir / "sweep_summary.csv")) == len(results["summary"])
  assert (workdir / "sweep.png").stat().st_size > 10_000 and (workdir / "sweep.pdf").exists()


def test_spread_matches_a_hand_computation():
  result = aggregate.spread([1.0, 2.0, 3.0, 4.0])
  std = np.sqrt(((1.5 ** 2 + 0.5 ** 2) * 2) / 3)
  assert result == pytest.approx({"mean": 2.5, "std": std, "ci95": 3.182446 * std / 2.0}, rel=1e-6)
  assert aggregate.spread([7.0]) == {"mean": 7.0, "std": 0.0, "ci95": 0.0}


def test_grid_points_are_every_combination_with_tied_keys_moving_together():
  keys = schema.declared("sweep")
  axes = grid.parse("mask.fixed_fraction+pruning_fraction=0.1,0.5; model.depth=1,3", keys)
  assert grid.points(axes) == [
      {"mask.fixed_fraction": 0.1, "pruning_fraction": 0.1, "model.depth": 1},
      {"mask.fixed_fraction": 0.1, "pruning_fraction": 0.1, "model.depth": 3},
      {"mask.fixed_fraction": 0.5, "pruning_fraction": 0.5, "model.depth": 1},
      {"mask.fixed_fraction": 0.5, "pruning_fraction": 0.5, "model.depth": 3}]
  assert grid.points(grid.parse("", keys)) == [{}]


@pytest.mark.parametrize("grid_text,match", [
    ("model.width=8,x", "value 'x' of 'model.width' is not a int"),
    ("model.widht=8", "'model.widht' is not a key of the sweep"),
    ("num_train=100,200", "'num_train' may not be swept"),
    ("model.width=8,8", "lists 8 twice"),
    ("model.width", "is not KEY=V1,V2"),
    ("model.width=8; model.width=16", "sets 'model.width' on two axes"),
    ("mask.fixed_fraction=0.2,1.5", "mask.fixed_fraction=1.5 is out of range"),
    ("mask.granularity=weight,channel", "granularity='channel'"),
    ("model.width+model.name=8", "ties keys of different types"),
])
def test_a_bad_grid_is_rejected_naming_the_bad_part(grid_text, match):
  with pytest.raises(ConfigError, match=match):
    schema.validate(tiny_config(grid_text))


def test_the_k_way_average_of_identical_models_is_that_model_with_zero_barriers():
  config = tiny_config()
  config.num_models, config.model.width = 3, 16
  dataset = data.load_dataset("fashion_mnist", "", 256, 200)
  model = models.get_model(config.model, dataset.num_classes)
  variables = models.init_variables(model, jax.random.key(0), dataset.image_shape, "flax")
  stacked = train.stack([variables] * 3)
  measure_with = measurement.make_measurement(config, model, stacked, dataset, execution.policy(sharding.make_mesh(1)))
  curves, _, rows = measurement.measure_curves(config, stacked, ["vanilla"], {}, measure_with)
  k_models, _ = measurement.measure_k_models(config, stacked, ["vanilla"], curves, measure_with)
  section = k_models["vanilla"]
  assert np.max(np.abs(section["loss_barrier"])) < 1e-5 and section["loss_barrier_max"] < 1e-5
  assert section["accuracy_barrier_pp_max"] == 0.0
  assert section["fused_accuracy"] == pytest.approx(rows[0]["accuracy_a"]) == section["mean_endpoint_accuracy"]
  assert section["fused_loss"] == pytest.approx(float(curves["vanilla"]["loss"][0]), rel=1e-5)


def test_report_combines_a_sweep_and_an_lmc_run(tiny_sweep, tmp_path):
  workdir, results, _ = tiny_sweep
  lmc_config = tiny_config().to_dict()
  lmc_config.update(experiment="lmc", init_seed=5)
  lmc_config["model"]["width"] = 32
  lmc_row = {"variant": "tna", "curve": "raw", "bn_mode": "raw", "repair": False, "accuracy_a": 80.0,
             "accuracy_b": 81.0, "accuracy_mid": 79.0, "loss_barrier": 0.05, "accuracy_barrier_pp": 1.5,
             "accuracy_barrier_rel": 0.02}
  lmc_dir = tmp_path / "lmc_run"
  lmc_dir.mkdir()
  (lmc_dir / "results.json").write_text(json.dumps({
      "config": lmc_config, "summary": [lmc_row],
      "k_models": {"tna": {"variant": "tna", "bn_mode": "raw", "fused_accuracy": 79.0}}}))
  out = tmp_path / "report"
  cmd = [sys.executable, "-m", "tna_jax.report", str(workdir), str(lmc_dir), f"--out={out}"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = read_csv(out / "report_rows.csv")
  assert len(rows) == len(results["rows"]) + 1
  (lmc,) = [r for r in rows if r["workdir"] == str(lmc_dir)]
  assert lmc["model.width"] == "32" and lmc["seed"] == "5" and lmc["fused_accuracy"] == "79.0"
  assert "experiment" not in rows[0]  # the kind of run is not a setting
  summary = read_csv(out / "report_summary.csv")
  assert any(r["model.width"] == "32" and r["n"] == "1" for r in summary)
  assert (out / "report.png").exists() and "TNA-PFN (30 % fixed)" in result.stdout

  bad = subprocess.run([sys.executable, "-m", "tna_jax.report", str(tmp_path / "nothing"), f"--out={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "has no results.json" in bad.stderr and "Traceback" not in bad.stderr


def test_the_dry_run_plan_estimates_each_compiled_program_and_their_sum(monkeypatch):
  # Each program's estimate is `plan._time_estimates` (compiled and checked for lmc in test_main);
  # here, that the sweep's plan has one per program, with its models, and sums them.
  estimated = []

  def estimate(config, model, variables, num_models, *args):
    estimated.append((config.model.width, num_models))
    return {}, {"1 x cpu": 100.0 * config.model.width}

  monkeypatch.setattr(plan, "_time_estimates", estimate)
  out = plan.plan(tiny_config())  # widths 8 and 16: two programs of 12 models each
  assert estimated == [(8, 12), (16, 12)] and out["models_trained_together"] == 24
  assert out["program 0"] == "12 models of 6,370 parameters, 800 s on 1 x cpu" and "program 2" not in out
  assert out["estimated_run (1 x cpu)"] == "2,400 s (40.0 min)"
