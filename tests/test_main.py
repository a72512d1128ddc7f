"""The command line end to end: a tiny lmc run, and clear errors for bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tna_jax.core import evaluate
from tna_jax.runs import saved_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.num_train=1024", "--config.num_test=500", "--config.model.depth=2", "--config.model.width=64",
        "--config.lmc.num_alphas=5"]


def run_main(config, workdir, *flags):
  cmd = [sys.executable, "-m", "tna_jax.main", f"--config={config}", f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lmc")
  result = run_main("configs/fmnist_mlp.py:quick", workdir, *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_lmc_run_prints_the_table_and_writes_results(tiny_run):
  workdir, result = tiny_run
  for header in ("variant", "loss barrier", "acc barrier pp", "acc barrier rel", "vanilla", "tna", "pruning"):
    assert header in result.stdout
  assert "fused acc %" not in result.stdout  # the K-model table only for K > 2
  results = json.loads((workdir / "results.json").read_text())
  assert results["models"] == ["vanilla_0", "vanilla_1", "tna_0", "tna_1", "pruning_0", "pruning_1"]
  assert len(results["alphas"]) == 5 and set(results["curves"]) == {"vanilla", "tna", "pruning"}
  for row in results["summary"]:
    assert np.isfinite([row["loss_barrier"], row["accuracy_barrier_pp"], row["accuracy_barrier_rel"]]).all()
    # The curve's endpoints are the trained models, evaluated the same way as after training.
    curve = results["curves"][row["variant"]]
    assert curve["accuracy"][0] == pytest.approx(results["final"][f"{row['variant']}_0"]["test_accuracy"], abs=1e-6)
    # With K = 2 the barrier matrix holds the pair's barrier and the fusion is the curve's midpoint (alpha 0.5).
    section = results["k_models"][row["variant"]]
    assert section["loss_barrier"] == [[0.0, row["loss_barrier"]], [row["loss_barrier"], 0.0]]
    assert section["fused_accuracy"] == pytest.approx(100 * curve["accuracy"][2], abs=1e-4)
    assert section["fused_loss"] == pytest.approx(curve["loss"][2], rel=1e-5)
  assert (workdir / "lmc_curves.png").stat().st_size > 10_000 and (workdir / "lmc_curves.pdf").read_bytes()[:5] == b"%PDF-"
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 1 and len(json.loads(lines[0])["test_accuracy"]) == 6
  # Every epoch's speed from the compiled epoch's cost analysis: 6 MLPs 784-64-64-10 over 8 steps of 128 do at
  # least the forward and the weight-gradient matmuls (2 x 2 FLOPs per multiply-add), every step counted.
  record = json.loads(lines[0])
  assert record["train_flops"] > 6 * 1024 * 2 * 2 * (784 * 64 + 64 * 64 + 64 * 10)
  assert record["train_flops_per_s"] > 0 and 0 < record["train_mfu"] < 2
  assert "MFU %" in result.stdout and results["train_speed"]["train_mfu_pct"] > 0
  for phase in ("train", "lmc"):  # per-epoch scalars; the curves, the table and hparams
    assert any((workdir / "tensorboard" / phase).iterdir()), f"TensorBoard event file of {phase} missing"
  assert (workdir / "results.json").stat().st_mode & 0o777 == 0o644 and "NaN" not in (workdir / "results.json").read_text()
  assert not (workdir / ".lock").exists() and (workdir / "config.json").exists()


def test_checkpoints_are_readable_with_orbax_alone(tiny_run):
  workdir, _ = tiny_run
  with ocp.StandardCheckpointer() as checkpointer:
    init = checkpointer.restore(str(workdir / "checkpoints" / "init"))
    mask = checkpointer.restore(str(workdir / "checkpoints" / "mask"))
    tna = checkpointer.restore(str(workdir / "checkpoints" / "tna_0"))
    pruned = checkpointer.restore(str(workdir / "checkpoints" / "pruning_1"))
  kernel0, m = np.asarray(init["params"]["fc1"]["kernel"]), np.asarray(mask["fc1"]["kernel"]).astype(bool)
  assert 0.3 < m.mean() < 0.5
  np.testing.assert_array_equal(np.asarray(tna["params"]["fc1"]["kernel"])[m], kernel0[m])
  assert (np.asarray(pruned["params"]["fc1"]["kernel"])[m] == 0).all()


def test_existing_results_are_not_overwritten(tiny_run):
  workdir, _ = tiny_run
  before = (workdir / "results.json").read_bytes()
  result = run_main("configs/fmnist_mlp.py:quick", workdir, *TINY)
  assert result.returncode == 2
  assert "already holds a finished run (results.json)" in result.stderr and "--config.overwrite=True" in result.stderr
  assert (workdir / "results.json").read_bytes() == before


@pytest.mark.parametrize("flag,message", [
    ("--config.model.name=resnet99", "model.name='resnet99' is not supported; allowed: mlp, cnn, resnet20"),
    ("--config.dataset=imagenet", "dataset='imagenet' is not supported; allowed: fashion_mnist, mnist"),
    ("--config.mask.fixed_fraction=1.0", "mask.fixed_fraction=1.0 is out of range"),
    ("--config.variants=vanilla,magic", "variants='magic' is not supported"),
    ("--config.data_dir=/nonexistent/fmnist", "apt-get install -y dataset-fashion-mnist"),
    ("--config.dataset=cifar10", "tfds build cifar10"),
])
def test_bad_input_gives_one_clear_message_and_writes_nothing(tmp_path, flag, message):
  workdir = tmp_path / "run"
  result = run_main("configs/fmnist_mlp.py:quick", workdir, flag)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists() or not any(workdir.iterdir())


# Which keys apply to which model is checked key by key in tests/config/test_configs.py; here, that the
# CLI shows them (the MLP reads model.depth, the fed config's CNN does not).
@pytest.mark.parametrize("config,models,depth_shown", [("configs/fmnist_mlp.py", "6", True),
                                                      ("configs/fed_fmnist_cnn.py:quick", None, False)])
def test_dry_run_prints_the_keys_that_apply_and_the_plan_and_writes_nothing(tmp_path, config, models, depth_shown):
  result = run_main(config, tmp_path / "run", "--dry_run", "--dry_run_device=tpu_v5e", "--dry_run_devices=8")
  assert result.returncode == 0, result.stderr[-2000:]
  keys = [line.split(":")[0].strip() for line in result.stdout.splitlines() if ":" in line]
  assert ("depth" in keys) == depth_shown  # model.depth: only models that read it (the MLP, not ResNet20 or the CNN)
  assert "name" in keys and "batch_size" in keys
  for line in ("experiment", "parameters_per_model", "models_trained_together", "step_total_mib"):
    assert line in result.stdout
  if models:
    assert any(l.split()[:2] == ["models_trained_together", models] for l in result.stdout.splitlines())
    # Time estimates from the epoch's cost analysis: here (CPU, measured peak) and on 8 TPU v5e chips.
    estimates = {l.split(" at ")[0]: float(l.split(" each)")[1].split()[0].replace(",", ""))
                 for l in result.stdout.splitlines() if l.startswith("estimated_epoch (")}
    assert 0 < estimates["estimated_epoch (8 x tpu_v5e"] < estimates["estimated_epoch (1 x cpu"]
  assert not (tmp_path / "run").exists()


def test_load_run_restores_the_models_and_reproduces_the_curve_endpoints(tiny_run, tmp_path):
  workdir, _ = tiny_run
  run = saved_runs.load_run(workdir)
  assert run.config.model.width == 64 and run.config.num_test == 500
  assert [row["variant"] for row in run.summary] == ["vanilla", "tna", "pruning"]
  assert set(run.models) == {f"{v}_{i}" for v in ("vanilla", "tna", "pruning") for i in (0, 1)}
  assert {"mask", "init"} <= set(run.checkpoint_names) and "train" not in run.checkpoint_names
  ds = run.dataset()
  batches = evaluate.make_batches(ds.test_images, ds.test_labels, run.config.eval_batch_size)
  for variant in ("vanilla", "tna"):
    for i, end in ((0, 0), (1, -1)):
      scores = evaluate.evaluate(evaluate.inference_fn(run.model), run.models[f"{variant}_{i}"], batches, ds.mean, ds.std)
      assert float(scores["accuracy"]) == pytest.approx(run.curves[variant]["accuracy"][end], abs=1e-6)
      assert float(scores["loss"]) == pytest.approx(run.curves[variant]["loss"][end], rel=1e-5)
  assert 0 < sum(int(np.sum(leaf)) for leaf in jax.tree.leaves(run.masks["mask"])) < sum(
      leaf.size for leaf in jax.tree.leaves(run.masks["mask"]))
  with pytest.raises(saved_runs.RunNotFoundError, match="no finished run"):
    saved_runs.load_run(tmp_path)


def test_dry_run_on_an_unknown_device_names_the_known_ones(tmp_path):
  result = run_main("configs/fmnist_mlp.py:quick", tmp_path / "run", "--dry_run", "--dry_run_device=tpu_v9")
  assert result.returncode == 2
  assert "--dry_run_device='tpu_v9' is not a known device; allowed: tpu_v4, tpu_v5e" in result.stderr
  assert "Traceback" not in result.stderr
