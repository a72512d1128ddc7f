"""LMC curves: endpoints, identical models, vmapped curve vs a per-alpha loop, BN reset;
K models: barrier matrices and the K-way average."""

import itertools
import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tna_jax.alignment import interpolation, repair
from tna_jax.core import data, evaluate, models, train
from tna_jax.fusion import model_soups
from test_permutations import random_variables

MEAN, STD = (0.5,), (0.25,)


class TinyNet(nn.Module):
  """Dense -> BatchNorm -> relu -> Dense: small enough to check statistics by hand."""

  num_classes: int = 4
  bn_momentum: float = 0.9
  use_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16, name="hidden")(x.reshape(x.shape[0], -1))
    if self.use_bn:
      x = nn.BatchNorm(momentum=self.bn_momentum, use_running_average=not train, name="bn")(x)
    return nn.Dense(self.num_classes, name="head")(nn.relu(x))


def _setup(use_bn=False, n=300):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
  labels = rng.integers(0, 4, n).astype(np.int32)
  model = TinyNet(use_bn=use_bn)
  x = jnp.zeros((1, 4, 4, 1))
  va = model.init(jax.random.key(1), x, train=False)
  vb = model.init(jax.random.key(2), x, train=False)
  if use_bn:  # distinct running statistics, so interpolating them matters
    vb = {**vb, "batch_stats": jax.tree.map(lambda s: s + 0.5, vb["batch_stats"])}
  return model, va, vb, evaluate.make_batches(images, labels, 64), images


def _eval(model, variables, batches):
  return jax.device_get(evaluate.evaluate(evaluate.inference_fn(model), variables, batches, MEAN, STD))


def test_make_batches_counts_every_example_once():
  _, _, _, batches, _ = _setup(n=300)
  assert batches.images.shape[:2] == (5, 64)
  assert float(batches.weights.sum()) == 300


def test_curve_endpoints_equal_individual_evaluations():
  model, va, vb, batches, _ = _setup()
  curve = jax.device_get(interpolation.lmc_curve(model, va, vb, jnp.linspace(0, 1, 5), batches, MEAN, STD))
  for idx, v in ((0, va), (-1, vb)):
    single = _eval(model, v, batches)
    assert curve["loss"][idx] == pytest.approx(float(single["loss"]), rel=1e-5)
    assert curve["accuracy"][idx] == pytest.approx(float(single["accuracy"]), abs=1e-6)


def test_identical_models_have_zero_barrier():
  model, va, _, batches, _ = _setup()
  alphas = jnp.linspace(0, 1, 7)
  curve = jax.device_get(interpolation.lmc_curve(model, va, va, alphas, batches, MEAN, STD))
  result = interpolation.barriers(alphas, curve["loss"], curve["accuracy"])
  assert result["loss_barrier"] == pytest.approx(0.0, abs=1e-5)
  assert result["accuracy_barrier_pp"] == pytest.approx(0.0, abs=1e-4)
  assert result["accuracy_barrier_rel"] == pytest.approx(0.0, abs=1e-6)


# chunk 0 = automatic (one at a time on CPU), 1 = one at a time, 7 = all seven vmapped.
@pytest.mark.parametrize("use_bn,chunk", [(False, 0), (False, 1), (False, 2), (False, 7), (True, 0), (True, 3),
                                          (True, 7)])
def test_curve_in_one_call_equals_per_alpha_loop(use_bn, chunk):
  model, va, vb, batches, _ = _setup(use_bn)
  alphas = jnp.linspace(0, 1, 7)
  curve = jax.device_get(interpolation.lmc_curve(model, va, vb, alphas, batches, MEAN, STD, alpha_chunk=chunk))
  for i, alpha in enumerate(np.asarray(alphas)):
    single = _eval(model, interpolation.interpolate(va, vb, alpha), batches)
    assert curve["loss"][i] == pytest.approx(float(single["loss"]), rel=1e-5)
    assert curve["accuracy"][i] == pytest.approx(float(single["accuracy"]), abs=1e-6)


def test_negative_alpha_chunk_is_a_clear_error():
  model, va, vb, batches, _ = _setup()
  with pytest.raises(ValueError, match=r"alpha_chunk=-1; allowed: 0 \(automatic\)"):
    interpolation.lmc_curve(model, va, vb, jnp.linspace(0, 1, 3), batches, MEAN, STD, alpha_chunk=-1)


def test_bn_reset_reestimates_statistics_from_training_batches():
  model, va, vb, batches, images = _setup(use_bn=True)
  reset_images = jnp.asarray(images[:256].reshape(4, 64, 4, 4, 1))
  stats = interpolation.reestimate_batch_stats(model, va, reset_images, MEAN, STD)
  # By hand: mean over batches of each batch's mean and (biased) variance of the BN input.
  x = (images[:256].reshape(4, 64, -1).astype(np.float32) / 255 - MEAN[0]) / STD[0]
  h = x @ np.asarray(va["params"]["hidden"]["kernel"]) + np.asarray(va["params"]["hidden"]["bias"])
  np.testing.assert_allclose(stats["bn"]["mean"], h.mean(1).mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["bn"]["var"], h.var(1).mean(0), rtol=1e-4, atol=1e-5)
  # The reset curve differs from the raw one (the statistics of vb were shifted) but is
  # still one consistent evaluation per alpha.
  alphas = jnp.linspace(0, 1, 3)
  raw = jax.device_get(interpolation.lmc_curve(model, va, vb, alphas, batches, MEAN, STD))
  reset = jax.device_get(interpolation.lmc_curve(model, va, vb, alphas, batches, MEAN, STD, bn_mode="reset",
                                       reset_images=reset_images))
  assert not np.allclose(raw["loss"], reset["loss"])
  expected = _eval(model, {**va, "batch_stats": stats}, batches)
  assert reset["loss"][0] == pytest.approx(float(expected["loss"]), rel=1e-5)


def test_barriers_on_a_known_curve():
  alphas = np.linspace(0, 1, 5)
  loss = np.array([1.0, 1.5, 2.5, 2.0, 2.0])  # line: 1, 1.25, 1.5, 1.75, 2
  accuracy = np.array([0.9, 0.8, 0.5, 0.7, 0.8])  # line: .9 .875 .85 .825 .8
  result = interpolation.barriers(alphas, loss, accuracy)
  assert result["loss_barrier"] == pytest.approx(1.0)
  assert result["loss_barrier_alpha"] == 0.5
  assert result["accuracy_barrier_pp"] == pytest.approx(35.0)
  assert result["accuracy_barrier_rel"] == pytest.approx(0.35 / 0.85)


def _mlp_pair():
  """Two library MLPs (REPAIR needs a model with a permutation spec) on _setup's data."""
  model = models.get_model({"name": "mlp", "depth": 2, "width": 16}, 4)
  return model, *(random_variables(model, (4, 4, 1), seed) for seed in (0, 1))


def test_repair_curve_keeps_endpoints_and_repairs_the_midpoint():
  model, va, vb = _mlp_pair()
  _, _, _, batches, images = _setup()
  reset_images = jnp.asarray(images[:256].reshape(4, 64, 4, 4, 1))
  alphas = jnp.linspace(0, 1, 3)
  raw = jax.device_get(interpolation.lmc_curve(model, va, vb, alphas, batches, MEAN, STD))
  repaired = jax.device_get(interpolation.lmc_curve(model, va, vb, alphas, batches, MEAN, STD, repair=True,
                                          reset_images=reset_images))
  np.testing.assert_allclose(repaired["loss"][[0, -1]], raw["loss"][[0, -1]], rtol=1e-5)
  # The midpoint is the repaired interpolation, computed here step by step.
  x = data.normalize(reset_images.reshape(256, 4, 4, 1), MEAN, STD)
  sites = repair.sites(model, va)
  target = interpolation.interpolate(*(repair.channel_stats(model, v, x, sites) for v in (va, vb)), 0.5)
  mid = _eval(model, repair.repair(model, interpolation.interpolate(va, vb, 0.5), x, target), batches)
  assert repaired["loss"][1] == pytest.approx(float(mid["loss"]), rel=1e-4)
  assert not repaired["loss"][1] == pytest.approx(raw["loss"][1], rel=1e-3)
  with pytest.raises(ValueError, match="need reset_images"):
    interpolation.lmc_curve(model, va, vb, alphas, batches, MEAN, STD, repair=True)


def _all_pair_curves(model, variables, batches, alphas):
  """{(i, j): curve from model i to model j} for every i < j, as the lmc experiment measures them."""
  return {(i, j): jax.device_get(interpolation.lmc_curve(model, variables[i], variables[j], alphas, batches, MEAN, STD))
          for i, j in itertools.combinations(range(len(variables)), 2)}


def test_the_average_of_k_identical_models_is_that_model_and_their_barriers_are_zero():
  model, va, _, batches, _ = _setup(use_bn=True)
  fused = model_soups.uniform_soup(train.stack([va] * 3))
  chex.assert_trees_all_close(fused, va, rtol=1e-6)
  alphas = jnp.linspace(0, 1, 5)
  result = interpolation.pairwise_barriers(alphas, _all_pair_curves(model, [va] * 3, batches, alphas), 3)
  np.testing.assert_allclose(result["loss_barrier"], np.zeros((3, 3)), atol=1e-5)
  np.testing.assert_allclose(result["accuracy_barrier_pp"], np.zeros((3, 3)), atol=1e-4)
  assert result["loss_barrier_max"] == pytest.approx(0.0, abs=1e-5)
  single = _eval(model, va, batches)
  assert result["endpoint_accuracy"] == pytest.approx([float(single["accuracy"])] * 3, abs=1e-6)
  scores = jax.device_get(interpolation.evaluate_point(model, fused, batches, MEAN, STD))
  assert float(scores["loss"]) == pytest.approx(float(single["loss"]), rel=1e-5)


def test_barrier_matrix_of_three_models_holds_each_pairs_barrier_once_per_direction():
  model, va, vb, batches, _ = _setup()
  vc = model.init(jax.random.key(3), jnp.zeros((1, 4, 4, 1)), train=False)
  variables = [va, vb, vc]
  alphas = jnp.linspace(0, 1, 7)
  curves = _all_pair_curves(model, variables, batches, alphas)
  result = interpolation.pairwise_barriers(alphas, curves, 3)
  for key in interpolation.MATRIX_BARRIERS:
    matrix = np.asarray(result[key])
    assert matrix.shape == (3, 3) and (matrix == matrix.T).all() and (np.diag(matrix) == 0).all()
    by_hand = {pair: interpolation.barriers(alphas, c["loss"], c["accuracy"])[key] for pair, c in curves.items()}
    assert [matrix[pair] for pair in by_hand] == list(by_hand.values())
    assert result[f"{key}_mean"] == pytest.approx(np.mean(list(by_hand.values())))
    assert result[f"{key}_max"] == max(by_hand.values())
  # One direction per pair suffices: the curve from model 2 back to model 0 has the same loss barrier.
  back = jax.device_get(interpolation.lmc_curve(model, vc, va, alphas, batches, MEAN, STD))
  assert interpolation.barriers(alphas, back["loss"], back["accuracy"])["loss_barrier"] == pytest.approx(
      result["loss_barrier"][2][0], rel=1e-4, abs=1e-6)
  for i, v in enumerate(variables):
    assert result["endpoint_accuracy"][i] == pytest.approx(float(_eval(model, v, batches)["accuracy"]), abs=1e-6)
  with pytest.raises(ValueError, match="exactly one curve per pair"):
    interpolation.pairwise_barriers(alphas, {(0, 1): curves[(0, 1)]}, 3)


def test_the_average_of_two_models_scores_as_their_curves_midpoint_in_each_bn_mode():
  model, va, vb, batches, images = _setup(use_bn=True)
  reset_images = jnp.asarray(images[:256].reshape(4, 64, 4, 4, 1))
  fused = model_soups.uniform_soup(train.stack([va, vb]))
  points = {}
  for bn_mode in interpolation.BN_MODES:
    curve = jax.device_get(interpolation.lmc_curve(model, va, vb, jnp.linspace(0, 1, 3), batches, MEAN, STD,
                                                   bn_mode=bn_mode, reset_images=reset_images))
    points[bn_mode] = jax.device_get(interpolation.evaluate_point(model, fused, batches, MEAN, STD, bn_mode=bn_mode,
                                                                  reset_images=reset_images))
    assert float(points[bn_mode]["loss"]) == pytest.approx(float(curve["loss"][1]), rel=1e-5)
    assert float(points[bn_mode]["accuracy"]) == pytest.approx(float(curve["accuracy"][1]), abs=1e-6)
  assert not float(points["raw"]["loss"]) == pytest.approx(float(points["reset"]["loss"]), rel=1e-3)
  with pytest.raises(ValueError, match="needs reset_images"):
    interpolation.evaluate_point(model, fused, batches, MEAN, STD, bn_mode="reset")


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--config.num_train=512", "--config.num_test=500", "--config.model.width=32", "--config.variants=vanilla,tna",
         "--config.lmc.num_alphas=3"]


def _main(workdir, *flags):
  cmd = [sys.executable, "-m", "tna_jax.main", "--config=configs/fmnist_mlp.py:quick", f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_lmc_experiment_with_three_models_weight_alignment_and_repair(tmp_path):
  result = _main(tmp_path, *SMALL, "--config.num_models=3", "--config.align=weight", "--config.repair=True")
  assert result.returncode == 0, result.stderr[-3000:]
  for header in ("aligned loss barrier", "aligned acc barrier pp", "match iters", "match s", "raw+REPAIR",
                 "All 3 pairs of the 3 models", "max loss barrier", "fused acc %"):
    assert header in result.stdout
  results = json.loads((tmp_path / "results.json").read_text())
  # K models: every pair's barriers (the pair 0-1 from its unaligned, unrepaired curve) and the 3-way average.
  assert set(results["k_models"]) == {"vanilla", "tna"}
  for variant, section in results["k_models"].items():
    row = next(row for row in results["summary"] if row["variant"] == variant and not row["repair"])
    matrix = np.asarray(section["loss_barrier"])
    assert section["num_models"] == 3 and matrix.shape == (3, 3) and (matrix == matrix.T).all()
    assert matrix[0, 1] == row["loss_barrier"] and section["accuracy_barrier_pp"][0][1] == row["accuracy_barrier_pp"]
    assert section["loss_barrier_max"] == matrix.max() and section["loss_barrier_mean"] == pytest.approx(
        matrix[np.triu_indices(3, 1)].mean())
    finals = [results["final"][f"{variant}_{i}"]["test_accuracy"] for i in range(3)]
    assert section["mean_endpoint_accuracy"] == pytest.approx(100 * np.mean(finals), abs=1e-4)
    assert 0 < section["fused_accuracy"] <= 100 and section["fused_loss"] > 0
    assert section["fusion_gain_pp"] == pytest.approx(section["fused_accuracy"] - section["mean_endpoint_accuracy"])
  assert set(results["aligned_curves"]) == {"vanilla", "vanilla +REPAIR", "tna", "tna +REPAIR"}
  assert [row["curve"] for row in results["summary"]] == ["raw", "raw+REPAIR"] * 2
  for variant, alignment in results["alignment"].items():
    assert alignment["method"] == "weight" and alignment["iterations"] >= 1 and alignment["seconds"] > 0
    # Aligning permutes model 1 without changing what it computes; REPAIR keeps endpoints.
    for name in (variant, variant + " +REPAIR"):
      for curves in (results["curves"], results["aligned_curves"]):
        assert curves[name]["accuracy"][-1] == pytest.approx(results["curves"][variant]["accuracy"][-1], abs=1e-6)
  for row in results["summary"]:
    assert row["match_iterations"] == results["alignment"][row["variant"]]["iterations"]
    assert np.isfinite(row["aligned_loss_barrier"])
  assert (tmp_path / "lmc_curves_aligned.png").stat().st_size > 10_000
  assert (tmp_path / "checkpoints" / "tna_1_aligned").is_dir() and (tmp_path / "checkpoints" / "tna_perms").is_dir()


@pytest.mark.parametrize("flag,message", [
    ("--config.align=magic", "align='magic' is not supported; allowed: none, weight, activation"),
    ("--config.matching.solver=lapjv", "matching.solver='lapjv' is not supported; allowed: auto, hungarian, scipy"),
])
def test_bad_alignment_config_is_one_clear_error(tmp_path, flag, message):
  result = _main(tmp_path / "run", flag)
  assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()


def test_a_user_scoring_function_gives_the_built_in_curve_on_the_same_data():
  model = models.get_model(ml_collections.ConfigDict(dict(name="mlp", depth=1, width=16)), 10)
  a, b = (models.init_variables(model, jax.random.key(seed), (8, 8, 1)) for seed in (0, 1))
  rng = np.random.default_rng(0)
  batches = evaluate.make_batches(rng.integers(0, 256, (96, 8, 8, 1), dtype=np.uint8),
                                  rng.integers(0, 10, 96).astype(np.int32), 32)
  alphas, mean, std = jnp.linspace(0, 1, 5), (0.5,), (0.25,)
  built_in = interpolation.lmc_curve(model, a, b, alphas, batches, mean, std)
  apply_fn = evaluate.inference_fn(model)
  score = lambda variables, data: evaluate.evaluate(apply_fn, variables, data, mean, std)
  for chunk in (0, 2):
    user = interpolation.lmc_curve(None, a, b, alphas, score_fn=score, score_data=batches, alpha_chunk=chunk)
    np.testing.assert_allclose(user["loss"], built_in["loss"], rtol=1e-6)
    np.testing.assert_allclose(user["accuracy"], built_in["accuracy"], rtol=1e-6)
  # A closure returning a (loss, accuracy) tuple: e.g. a loss of the user's own (here the mean logit).
  images = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
  own = interpolation.lmc_curve(None, a, b, alphas, score_fn=lambda v: (model.apply(v, images, train=False).mean(), 0.0))
  expected = [float(model.apply(interpolation.interpolate(a, b, t), images, train=False).mean()) for t in alphas]
  np.testing.assert_allclose(own["loss"], expected, rtol=1e-5)
  with pytest.raises(ValueError, match="exactly one of batches"):
    interpolation.lmc_curve(model, a, b, alphas, batches, mean, std, score_fn=score)
