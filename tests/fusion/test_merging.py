"""Merging operators against hand computations, masks kept bit for bit, greedy soups over an operator,
and the operators through the soup and ColD experiments."""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tna_jax.config import loader
from tna_jax.core import data, evaluate, masks, models, optim, train
from tna_jax.experiments import cold as cold_experiment
from tna_jax.fusion import merging, model_soups
from tna_jax.runs import saved_runs

MEAN, STD = (0.5,), (0.29,)
ROOT = pathlib.Path(__file__).resolve().parents[2]
OPERATORS = ("task_arithmetic", "ties", "dare")


def _trees(k=3, seed=0):
  """A base and k models of two leaves (a matrix and a vector), stacked."""
  rng = np.random.default_rng(seed)
  base = {"w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32), "b": {"c": jnp.asarray(rng.normal(size=6),
                                                                                         jnp.float32)}}
  models_ = [jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), jnp.float32), base) for _ in range(k)]
  return base, train.stack(models_)


def test_task_arithmetic_with_lambda_one_over_k_is_the_uniform_soup():
  base, stacked = _trees()
  summed = merging.task_arithmetic(base, stacked, lam=1 / 3, normalize=False)  # Ilharco et al.'s sum
  chex.assert_trees_all_close(summed, merging.uniform(base, stacked), rtol=1e-5, atol=1e-6)
  # mergekit's default (normalized weights, lambda 1) is the same mean.
  chex.assert_trees_all_close(merging.task_arithmetic(base, stacked), merging.uniform(base, stacked), rtol=1e-5,
                              atol=1e-6)
  # Weights 0 leave models out: the soup of models 0 and 2 alone.
  chex.assert_trees_all_close(merging.task_arithmetic(base, stacked, weights=jnp.array([1.0, 0.0, 1.0])),
                              jax.tree.map(lambda x: (x[0] + x[2]) / 2, stacked), rtol=1e-5, atol=1e-6)


def test_ties_with_density_one_and_one_model_is_that_model():
  base, stacked = _trees(k=1)
  chex.assert_trees_all_close(merging.ties(base, stacked, density=1.0), train.unstack(stacked, 0), rtol=1e-6,
                              atol=1e-6)


def test_ties_on_three_models_with_conflicting_signs_is_the_hand_computed_merge():
  base = {"w": jnp.ones(5)}
  taus = np.array([[0.5, -0.2, 0.1, 0.0, 3.0],
                   [-0.4, 0.3, 0.2, -1.0, 1.0],
                   [0.3, -0.1, -0.6, 2.0, -1.0]], np.float32)
  stacked = {"w": base["w"][None] + taus}
  # density 0.6 of 5 entries: each model keeps its floor(3) = 3 largest magnitudes.
  #   tau_1 keeps 3.0, 0.5, -0.2    -> [ 0.5, -0.2,  0  ,  0  ,  3.0]
  #   tau_2 keeps -1.0, 1.0, -0.4   -> [-0.4,  0  ,  0  , -1.0,  1.0]
  #   tau_3 keeps 2.0, -1.0, -0.6   -> [ 0  ,  0  , -0.6,  2.0, -1.0]
  # Elected signs (sign of the column sums 0.1, -0.2, -0.6, 1.0, 3.0): +, -, -, +, +.
  # Disjoint mean of the agreeing non-zero entries:
  #   entry 0: only tau_1's 0.5 is +          -> 0.5    (tau_2's -0.4 disagrees)
  #   entry 1: only tau_1's -0.2              -> -0.2
  #   entry 2: only tau_3's -0.6              -> -0.6
  #   entry 3: only tau_3's 2.0 is +          -> 2.0    (tau_2's -1.0 disagrees)
  #   entry 4: tau_1's 3.0 and tau_2's 1.0    -> 2.0    (tau_3's -1.0 disagrees)
  # lambda 0.5: 1 + 0.5 * [0.5, -0.2, -0.6, 2.0, 2.0].
  merged = merging.ties(base, stacked, density=0.6, lam=0.5)
  np.testing.assert_allclose(merged["w"], [1.25, 0.9, 0.7, 2.0, 2.0], rtol=1e-6)
  # Without normalize the agreeing entries are summed: entry 4 is 3.0 + 1.0.
  unnormalized = merging.ties(base, stacked, density=0.6, lam=0.5, normalize=False)
  np.testing.assert_allclose(unnormalized["w"], [1.25, 0.9, 0.7, 2.0, 3.0], rtol=1e-6)


def test_dare_without_drops_is_task_arithmetic_or_ties_exactly():
  base, stacked = _trees()
  jax.tree.map(np.testing.assert_array_equal,
               merging.dare(base, stacked, drop_rate=0.0, combine="task_arithmetic"),
               merging.task_arithmetic(base, stacked))
  jax.tree.map(np.testing.assert_array_equal, merging.dare(base, stacked, drop_rate=0.0, combine="ties"),
               merging.ties(base, stacked, density=1.0))


def test_dare_keeps_one_minus_p_of_the_entries_rescaled_and_is_seeded_per_leaf():
  p = 0.3
  taus = {"a": jnp.ones((2, 4000)), "b": jnp.ones((2, 4000))}
  dropped = merging.drop(taus, p, seed=7)
  for leaf in jax.tree.leaves(dropped):
    leaf = np.asarray(leaf)
    kept = leaf != 0
    standard_error = np.sqrt(p * (1 - p) / kept.size)
    assert abs(kept.mean() - (1 - p)) < 3 * standard_error
    np.testing.assert_allclose(leaf[kept], 1 / (1 - p), rtol=1e-6)  # survivors rescaled
  # Keyed per leaf by its path: the two equal-shaped leaves drop different entries, and each
  # model of a leaf its own.
  assert not np.array_equal(dropped["a"] != 0, dropped["b"] != 0)
  assert not np.array_equal(dropped["a"][0] != 0, dropped["a"][1] != 0)
  base, stacked = _trees()
  same = [merging.dare(base, stacked, drop_rate=p, seed=s) for s in (1, 1, 2)]
  jax.tree.map(np.testing.assert_array_equal, same[0], same[1])
  assert not np.array_equal(same[0]["w"], same[2]["w"])


@pytest.mark.parametrize("name", merging.NAMES)
def test_a_tna_soup_merged_by_any_operator_keeps_the_fixed_entries_of_the_base_bit_exact(name):
  base = {"w": jnp.full((8, 16), 0.1), "b": jnp.full((16,), -0.3)}
  fixed = masks.fixed_mask(base, 0.4, seed=3)
  rng = np.random.default_rng(0)
  stacked = train.stack([jax.tree.map(lambda x, m: jnp.where(m, x, x + rng.normal(size=x.shape)), base, fixed)
                         for _ in range(3)])
  merged = merging.Merger(name, density=0.5)(base, stacked, fixed=fixed)
  for leaf, b, m in zip(*(jax.tree.leaves(t) for t in (merged, base, fixed))):
    leaf, b, m = np.asarray(leaf), np.asarray(b), np.asarray(m)
    np.testing.assert_array_equal(leaf[m].view(np.uint32), b[m].view(np.uint32))
    assert not np.allclose(leaf[~m], b[~m])  # the trainable entries did merge
  jax.tree.map(np.testing.assert_array_equal, merging.merge(name, base, stacked, fixed=fixed,
                                                            **merging.Merger(name, density=0.5).hyperparameters()),
               merged)


def test_bad_operators_and_hyperparameters_are_named():
  with pytest.raises(ValueError, match="merge operator='tiez' is not supported; allowed: uniform, task_arithmetic"):
    merging.Merger("tiez")
  with pytest.raises(ValueError, match="merging.density=0 is out of range"):
    merging.Merger("ties", density=0)
  with pytest.raises(ValueError, match="soup.methods='greedy:tiez'"):
    merging.soup_operator("greedy:tiez")
  assert merging.soup_operator("greedy") == (True, "uniform")
  assert merging.soup_operator("greedy:ties") == (True, "ties")
  assert merging.soup_operator("dare") == (False, "dare")


# ----------------------------------------------------------------------------- greedy soups over an operator


@pytest.fixture(scope="module")
def finetuned():
  """A base and four models fine-tuned from it with learning-rate factors 0.3, 1, 3 and 0 (the base)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (384, 6, 6, 1), dtype=np.uint8)
  labels = images.reshape(384, -1)[:, :4].argmax(1).astype(np.int32)
  ds = data.Dataset("synthetic", images[:256], labels[:256], images[256:], labels[256:], 4, MEAN, STD)
  model = models.get_model(ml_collections.ConfigDict(dict(name="mlp", depth=1, width=16)), 4)
  base = models.init_variables(model, jax.random.key(0), ds.image_shape)
  opt = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.05, momentum=0.9))
  tx = optax.chain(optim.make_optimizer(opt, 100), model_soups.per_model_run())
  states = train.stack([model_soups.set_run(train.init_train_state(tx, base, masks.no_mask(base["params"])), f, 1000)
                        for f in (0.3, 1.0, 3.0, 0.0)])
  states, _ = train.fit(model, tx, states, [0, 1, 2, 3], ds, num_epochs=2, batch_size=32, eval_batch_size=64,
                        progress=False)
  return model, base, states.variables, evaluate.make_batches(ds.test_images, ds.test_labels, 64)


def _reference_greedy(model, merger, base, stacked, batches):
  """The greedy rule as a Python loop: soup(S) = the operator over the models of S alone (a
  sub-stack: so weights 0 must mean "left out"), the next model accepted if strictly better."""
  apply_fn = evaluate.inference_fn(model)
  acc = jax.jit(lambda v: evaluate.evaluate(apply_fn, v, batches, MEAN, STD)["accuracy"])
  k = jax.tree.leaves(stacked)[0].shape[0]
  soup = lambda chosen: merging.merge_variables(merger, base, train.stack([train.unstack(stacked, i)
                                                                           for i in sorted(chosen)]))
  individual = [float(acc(train.unstack(stacked, i))) for i in range(k)]
  order = sorted(range(k), key=lambda i: -individual[i])
  chosen = [order[0]]
  best = float(acc(soup(chosen)))
  for i in order[1:]:
    candidate = float(acc(soup(chosen + [i])))
    if candidate > best:
      chosen, best = chosen + [i], candidate
  return sorted(chosen), best


def test_greedy_soup_over_an_operator_matches_a_reference_loop(finetuned):
  model, base, stacked, heldout = finetuned
  merger = merging.Merger("ties", density=0.5)
  result = model_soups.greedy_soup(model, stacked, heldout, MEAN, STD, merger=merger, base=base)
  chosen, best = _reference_greedy(model, merger, base, stacked, heldout)
  assert np.flatnonzero(np.asarray(result.ingredients)).tolist() == chosen
  assert float(result.heldout_accuracy) == pytest.approx(best, abs=1e-6)
  weights = jnp.asarray(result.ingredients, jnp.float32)
  chex.assert_trees_all_close(result.variables, merging.merge_variables(merger, base, stacked, weights=weights),
                              rtol=1e-5, atol=1e-6)


def test_greedy_soup_with_the_uniform_operator_is_the_plain_greedy_soup(finetuned):
  model, base, stacked, heldout = finetuned
  plain = model_soups.greedy_soup(model, stacked, heldout, MEAN, STD)
  uniform = model_soups.greedy_soup(model, stacked, heldout, MEAN, STD, merger=merging.Merger("uniform"), base=base)
  jax.tree.map(np.testing.assert_array_equal, plain, uniform)


# ----------------------------------------------------------------------------- the experiments


# Every operator through the soup experiment's CLI: tests/fusion/test_soup.py's end-to-end run lists them all.
def test_a_bad_soup_method_is_one_line_exit_2_and_no_workdir(tmp_path):
  bad = subprocess.run([sys.executable, "-m", "tna_jax.main", "--config=configs/soup_vit_fmnist.py:quick",
                        f"--workdir={tmp_path / 'bad'}", "--config.soup.methods=uniform,tiez"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      "error: soup.methods='tiez' is not supported; allowed: uniform, greedy, task_arithmetic, ties, dare, "
      "greedy:task_arithmetic, greedy:ties, greedy:dare."]
  assert not (tmp_path / "bad").exists()


def test_cold_fusion_by_ties_runs_and_keeps_the_fixed_entries(tmp_path, capsys):
  config = loader.apply_preset(loader.defaults("cold"), "quick")
  config.model = ml_collections.ConfigDict(dict(name="mlp", depth=1, width=16))
  config.base.source = "init"
  config.cold.update(tasks="0/1/2,3/4/5", unseen_tasks="", examples_per_task=128, rounds=1, merge="ties")
  config.variants = "tna"
  config.num_test, config.batch_size, config.eval_batch_size = 200, 64, 200
  cold_experiment.run(config, str(tmp_path))
  assert "fused by ties" in capsys.readouterr().out
  saved = json.loads((tmp_path / "results.json").read_text())
  assert all(len(per_round) == 2 and 0 < per_round[1] <= 1 for per_round in saved["accuracy"]["tna"].values())
  run = saved_runs.load_run(tmp_path)
  base, fused, mask = (run.restore(name) for name in ("base", "tna_round1", "tna_mask"))
  for b, f, m in zip(*(jax.tree.leaves(t) for t in (base["params"], fused["params"], mask))):
    m = np.asarray(m)
    np.testing.assert_array_equal(np.asarray(f)[m], np.asarray(b)[m])
