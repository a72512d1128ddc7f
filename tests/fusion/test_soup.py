"""Uniform and greedy soups, soups of matched models, per-model learning rates and budgets, and
the soup experiment."""

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

from tna_jax.alignment import permutations
from tna_jax.config import loader
from tna_jax.core import data, evaluate, masks, models, optim, train
from tna_jax.errors import ConfigError
from tna_jax.experiments import soup as soup_experiment
from tna_jax.fusion import model_soups
from tna_jax.runs import metric_writer

MEAN, STD = (0.5,), (0.29,)
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _dataset(n=384, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 6, 6, 1), dtype=np.uint8)
  labels = (images.reshape(n, -1)[:, :4].argmax(1)).astype(np.int32)  # learnable
  return data.Dataset("synthetic", images[:256], labels[:256], images[256:], labels[256:], 4, MEAN, STD)


def _mlp():
  return models.get_model(ml_collections.ConfigDict(dict(name="mlp", depth=1, width=16)), 4)


@pytest.fixture(scope="module")
def trained_models():
  """Four models fine-tuned from one init with learning-rate factors 0.3, 1, 3 and 0 (the init)."""
  ds, model = _dataset(), _mlp()
  variables = models.init_variables(model, jax.random.key(0), ds.image_shape)
  opt = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.05, momentum=0.9))
  tx = optax.chain(optim.make_optimizer(opt, 100), model_soups.per_model_run())
  states = train.stack([model_soups.set_run(train.init_train_state(tx, variables, masks.no_mask(variables["params"])), f,
                                     1000) for f in (0.3, 1.0, 3.0, 0.0)])
  states, _ = train.fit(model, tx, states, [0, 1, 2, 3], ds, num_epochs=2, batch_size=32, eval_batch_size=64,
                        progress=False)
  return ds, model, states


def test_uniform_soup_is_the_mean_of_the_params():
  trees = [{"a": jax.random.normal(jax.random.key(i), (3, 4)), "b": {"c": jnp.full((2,), float(i))}} for i in range(5)]
  stacked = train.stack(trees)
  expected = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *trees)
  chex.assert_trees_all_close(model_soups.uniform_soup(stacked), expected, rtol=1e-6)
  weights = np.array([1.0, 0.0, 2.0, 0.0, 1.0])
  weighted = jax.tree.map(lambda *xs: np.tensordot(weights, np.stack(xs), axes=1) / weights.sum(), *trees)
  chex.assert_trees_all_close(model_soups.uniform_soup(stacked, weights), weighted, rtol=1e-6)


def test_a_soup_keeps_the_fixed_entries_of_the_base_bit_exact():
  base = {"w": jnp.full((64,), 0.1)}  # 0.1 * 3 / 3 != 0.1 in float32: a plain mean would drift
  fixed = {"w": jnp.arange(64) % 2 == 0}
  stacked = train.stack([{"w": jnp.where(fixed["w"], base["w"], i + 1.0)} for i in range(3)])
  fused = masks.keep_fixed(model_soups.uniform_soup(stacked), base, fixed)
  np.testing.assert_array_equal(np.asarray(fused["w"])[::2].view(np.uint32), np.asarray(base["w"])[::2].view(np.uint32))
  np.testing.assert_allclose(fused["w"][1::2], 2.0)


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_aligning_permuted_copies_to_the_first_makes_their_uniform_soup_the_first(method):
  ds, model = _dataset(), _mlp()
  first = models.init_variables(model, jax.random.key(0), ds.image_shape)
  spec = permutations.spec_for(model, first)
  copies = [permutations.permute_variables(spec, first, permutations.random_permutations(spec, jax.random.key(k)))
            for k in (1, 2)]
  stacked = train.stack([first, *copies])
  # Unaligned, the copies' units sit elsewhere: their soup is not model 0.
  assert not np.allclose(model_soups.uniform_soup(stacked)["params"]["fc1"]["kernel"], first["params"]["fc1"]["kernel"])
  images = jnp.asarray(ds.train_images[:128].reshape((4, 32) + ds.image_shape))
  aligned, results = model_soups.align_to_first(method, model, stacked, images=images, mean=MEAN, std=STD)
  assert len(results) == 2
  for k in range(3):
    jax.tree.map(np.testing.assert_array_equal, train.unstack(aligned, k), first)
  chex.assert_trees_all_close(model_soups.uniform_soup(aligned), first, rtol=1e-6)


def _reference_greedy(model, stacked, batches):
  """Greedy soup as a plain Python loop over separately evaluated candidates."""
  apply_fn = evaluate.inference_fn(model)
  acc = jax.jit(lambda v: evaluate.evaluate(apply_fn, v, batches, MEAN, STD)["accuracy"])
  k = jax.tree.leaves(stacked)[0].shape[0]
  individual = [float(acc(train.unstack(stacked, i))) for i in range(k)]
  order = sorted(range(k), key=lambda i: -individual[i])
  chosen, best = [order[0]], individual[order[0]]
  for i in order[1:]:
    candidate = float(acc(model_soups.uniform_soup(train.stack([train.unstack(stacked, j) for j in chosen + [i]]))))
    if candidate > best:
      chosen, best = chosen + [i], candidate
  return sorted(chosen), best, individual


def test_greedy_soup_matches_a_reference_loop_and_never_loses_to_the_best_model(trained_models):
  ds, model, states = trained_models
  heldout = evaluate.make_batches(ds.test_images, ds.test_labels, 64)
  result = model_soups.greedy_soup(model, states.variables, heldout, MEAN, STD)
  chosen, best, individual = _reference_greedy(model, states.variables, heldout)
  assert np.flatnonzero(np.asarray(result.ingredients)).tolist() == chosen
  assert float(result.heldout_accuracy) == pytest.approx(best, abs=1e-6)
  np.testing.assert_allclose(result.individual_accuracy, individual, atol=1e-6)
  # Evaluated on its own, the soup is at least as accurate on held-out data as the best model.
  soup_accuracy = float(evaluate.evaluate(evaluate.inference_fn(model), result.variables, heldout, MEAN, STD)
                        ["accuracy"])
  assert soup_accuracy >= max(individual) - 1e-6
  assert int(result.order[0]) == int(np.argmax(individual))
  assert not result.ingredients[3] or individual[3] == max(individual)  # the untrained model stays out


def test_greedy_soup_of_one_good_model_bad_models_and_a_copy_is_the_good_model(trained_models):
  ds, model, states = trained_models
  good = train.unstack(states.variables, 1)
  noise = lambda s: jax.tree.map(lambda p: p + 3.0 * jax.random.normal(jax.random.key(s), p.shape), good)
  # A copy of the good model leaves the average, and so its accuracy, unchanged: no improvement, so it stays out.
  stacked = train.stack([noise(1), good, noise(2), good])
  result = model_soups.greedy_soup(model, stacked, evaluate.make_batches(ds.test_images, ds.test_labels, 64), MEAN, STD)
  assert np.asarray(result.ingredients).tolist() == [False, True, False, False]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), result.variables, good)


def test_per_model_run_scales_the_learning_rate_and_stops_after_the_budget():
  ds, model = _dataset(), _mlp()
  variables = models.init_variables(model, jax.random.key(0), ds.image_shape)
  fixed = masks.fixed_mask(variables["params"], 0.4, seed=3)
  opt = ml_collections.ConfigDict(dict(name="adamw", learning_rate=1e-2, weight_decay=1e-2))
  images, labels = jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels)

  def train_epochs(tx, state, epochs):
    epoch = jax.jit(train.make_epoch_fn(model, tx, batch_size=32, mean=MEAN, std=STD))
    for e in range(epochs):
      state, _ = epoch(state, jax.random.key(e), images, labels)
    return state.params

  run_tx = optax.chain(optim.make_optimizer(opt, 100), model_soups.per_model_run())
  start = lambda factor, steps: model_soups.set_run(train.init_train_state(run_tx, variables, fixed), factor, steps)
  scaled = train_epochs(run_tx, start(3.0, 10_000), 2)
  plain_tx = optim.make_optimizer(ml_collections.ConfigDict({**opt.to_dict(), "learning_rate": 3e-2}), 100)
  plain = train_epochs(plain_tx, train.init_train_state(plain_tx, variables, fixed), 2)
  chex.assert_trees_all_close(scaled, plain, rtol=1e-4, atol=1e-6)
  # A budget of one epoch: the second epoch changes nothing.
  steps = len(ds.train_labels) // 32
  jax.tree.map(np.testing.assert_array_equal, train_epochs(run_tx, start(1.0, steps), 2),
               train_epochs(run_tx, start(1.0, steps), 1))
  assert not np.allclose(scaled["head"]["kernel"], variables["params"]["head"]["kernel"])
  for p0, p1, m in zip(*(jax.tree.leaves(t) for t in (variables["params"], scaled, fixed))):
    np.testing.assert_array_equal(np.asarray(p0)[np.asarray(m)], np.asarray(p1)[np.asarray(m)])


def _tiny_soup_config(**overrides):
  config = loader.apply_preset(loader.defaults("soup"), "quick")
  config.model = ml_collections.ConfigDict(dict(name="mlp", depth=1, width=16))  # compiles fast; ViTs: test_transformers
  config.pretrain.update(num_train=512, batch_size=64)
  config.split.update(start=512, num_train=256, num_heldout=128)
  config.soup.update(num_models=2, lr_factors="1", epochs="1", augment="none")
  config.num_test, config.batch_size, config.eval_batch_size = 200, 64, 200
  config.update(overrides)
  return config


# The soup config of the README, shrunk by :quick (a ViT of one block), with one augmentation: one fine-tuning program.
# Every merging operator (tests/fusion/test_merging.py checks their definitions) souped beside the plain soups.
SOUP_METHODS = ("uniform", "greedy", "task_arithmetic", "ties", "dare", "greedy:ties")
SOUP_FLAGS = ["--config=configs/soup_vit_fmnist.py:quick", "--config.soup.augment=none", "--config.align=weight",
              f"--config.soup.methods={','.join(SOUP_METHODS)}"]


def test_soup_experiment_with_weight_matching_end_to_end_writes_results_and_refuses_to_clobber(tmp_path):
  result = subprocess.run([sys.executable, "-m", "tna_jax.main", f"--workdir={tmp_path}", *SOUP_FLAGS], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert result.returncode == 0, result.stderr[-3000:]
  for text in ("uniform soup", "greedy soup", "best single", "vanilla+weight", "tna+weight", "held-out %",
               "Matching of each model onto model 0", "units moved", "task arithmetic", "TIES", "DARE", "greedy TIES"):
    assert text in result.stdout
  saved = json.loads((tmp_path / "results.json").read_text())
  k = saved["config"]["soup"]["num_models"]
  # The four kinds of soups, side by side: vanilla, TNA-PFN, and the same models matched.
  assert list(saved["variants"]) == ["vanilla", "tna", "vanilla+weight", "tna+weight"]
  for variant, r in saved["variants"].items():
    assert len(r["individual"]["test"]) == k and r["greedy"]["heldout"] >= r["best_single"]["heldout"]
    for kind in SOUP_METHODS:
      assert 0 < r[kind]["test"] <= 1 and 0 < r[kind]["heldout"] <= 1, (variant, kind)
      assert (tmp_path / "checkpoints" / f"{variant}_{kind.replace(':', '_')}").is_dir()
    assert r["greedy:ties"]["ingredients"] and len(r["greedy:ties"]["candidate_heldout"]) == k
    # With normalized weights and lambda 1 (the defaults), task arithmetic is the uniform soup up to float rounding.
    assert r["task_arithmetic"]["test"] == pytest.approx(r["uniform"]["test"], abs=0.011)
  for variant in ("vanilla", "tna"):
    matched = saved["variants"][f"{variant}+weight"]
    # Matching permutes units and so keeps what every model computes (to one held-out example, for float ties).
    np.testing.assert_allclose(matched["individual"]["heldout"], saved["variants"][variant]["individual"]["heldout"],
                               atol=1.5 / saved["config"]["split"]["num_heldout"])
    assert len(matched["alignment"]) == k - 1
    assert all(a["iterations"] >= 1 and a["units_moved"] >= 0 for a in matched["alignment"])
    assert (tmp_path / "checkpoints" / f"{variant}+weight_perms").is_dir()
  assert (tmp_path / "soup.png").stat().st_size > 10_000
  records = metric_writer.read_jsonl(str(tmp_path / "metrics.jsonl"))
  finetuned = [r for r in records if r["phase"].startswith("finetune_")]
  assert finetuned and all("heldout_accuracy" in r and len(r["models"]) == len(r["heldout_accuracy"]) for r in finetuned)
  pretrain_epochs = saved["config"]["pretrain"]["num_epochs"]
  assert [r["step"] for r in records if r["phase"] == "pretrain"] == list(range(1, pretrain_epochs + 1))
  assert any((tmp_path / "tensorboard").iterdir()), "TensorBoard event file missing"
  assert (tmp_path / "checkpoints" / "pretrained").is_dir()
  with pytest.raises(ConfigError, match=r"already holds a finished run \(results.json\)"):
    soup_experiment.run(_tiny_soup_config(), str(tmp_path))  # refused whatever the config


@pytest.mark.parametrize("key,value,match", [
    ("variants", "vanilla,fancy", "variants='fancy'.*vanilla, tna"),
    ("soup.num_models", 1, "num_models=1 must be >= 2"),
    ("soup.augment", "none,rotate", "augment='rotate'"),
    ("base.source", "orbax", "needs base.path"),
    ("soup.lr_factors", "1,x", "lr_factors='1,x'"),
    ("align", "rebasin", "align='rebasin'.*none, weight, activation"),
])
def test_bad_soup_configs_are_named(key, value, match):
  config = _tiny_soup_config()
  parent, _, leaf = key.rpartition(".")
  (config[parent] if parent else config)[leaf] = value
  with pytest.raises(ConfigError, match=match):
    soup_experiment.validate(config)
