"""W-Asymmetric and σ-Asymmetric baselines: the fixed patterns, one shared init, and both variants
trained through `main` with their fixed entries bit-identical afterwards."""

import itertools
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tna_jax.alignment import permutations
from tna_jax.config import loader, schema
from tna_jax.core import asymmetric, masks, models
from tna_jax.errors import ConfigError
from tna_jax.experiments import sweep
from tna_jax.runs import reporting, saved_runs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = (6, 6, 1)  # fc1 fan-in 36
SPEC = asymmetric.WAsymSpec(fixed_per_unit=8, scale=0.5, seed=3)


def _init(model, seed=0):
  return models.init_variables(model, jax.random.key(seed), SHAPE)


def _mlp(**kwargs):
  return models.MLP(num_classes=10, depth=2, width=16, **kwargs)


def test_fixed_sets_are_different_subsets_of_the_requested_size():
  sets = asymmetric.fixed_sets(np.random.default_rng(0), 36, 16, 8)
  assert sets.shape == (36, 16) and (sets.sum(0) == 8).all()
  assert len({tuple(column) for column in sets.T}) == 16
  # As tight as it gets: 6 units, 6 subsets of 2 of 4 entries: every subset once, redrawn until so.
  tight = asymmetric.fixed_sets(np.random.default_rng(1), 4, 6, 2)
  assert {tuple(np.flatnonzero(column)) for column in tight.T} == set(itertools.combinations(range(4), 2))
  with pytest.raises(ConfigError, match="only 6 subsets of 2 entries, fewer than its 7 units"):
    asymmetric.fixed_sets(np.random.default_rng(1), 4, 7, 2)


def _conv_variables():
  """A conv stack as flax lays it out: kernels [kh, kw, in, out] (a unit's row: its kh * kw * in fan-in)."""
  keys = jax.random.split(jax.random.key(0), 3)
  return {"params": {"conv1": {"kernel": 0.1 * jax.random.normal(keys[0], (3, 3, 1, 6)), "bias": jnp.zeros(6)},
                     "conv2": {"kernel": 0.1 * jax.random.normal(keys[1], (3, 3, 6, 8)), "bias": jnp.zeros(8)},
                     "head": {"kernel": 0.1 * jax.random.normal(keys[2], (8, 10)), "bias": jnp.zeros(10)}}}


@pytest.mark.parametrize("make", [lambda: _init(_mlp()), _conv_variables], ids=["mlp", "conv"])
def test_wasym_start_fixes_distinct_sets_per_unit_in_every_kernel_and_nothing_else(make):
  variables = make()
  start, mask = asymmetric.wasym_start(variables, SPEC)
  again, _ = asymmetric.wasym_start(variables, SPEC)
  other, other_mask = asymmetric.wasym_start(variables, asymmetric.WAsymSpec(8, 0.5, seed=4))
  flat_init, flat_start = (dict(tree_leaves(t)) for t in (variables["params"], start["params"]))
  flat_mask = dict(tree_leaves(mask))
  assert set(flat_mask) == set(flat_init)
  for path, fixed in flat_mask.items():
    init, value = flat_init[path], flat_start[path]
    if not path.endswith("kernel"):  # biases train normally, as in the authors' code
      assert not fixed.any() and np.array_equal(value, init)
      continue
    fan_in, units = math.prod(init.shape[:-1]), init.shape[-1]  # a conv unit's row: its kh * kw * in fan-in
    columns = fixed.reshape(fan_in, units)
    assert (columns.sum(0) == min(8, fan_in // 2)).all(), path
    assert len({tuple(c) for c in columns.T}) == units, f"{path}: two units share their fixed set"
    np.testing.assert_array_equal(value[~fixed], init[~fixed])  # the rest keeps the shared init
    assert not np.isin(value[fixed], init).any() and np.std(value[fixed]) == pytest.approx(0.5, rel=0.25)
  # Reproducible from the seed; another seed draws other sets and values.
  jax.tree.map(np.testing.assert_array_equal, start, again)
  assert not np.array_equal(flat_mask["head/kernel"], dict(tree_leaves(other_mask))["head/kernel"])
  assert not np.array_equal(flat_start["head/kernel"], dict(tree_leaves(other["params"]))["head/kernel"])


def tree_leaves(tree):
  return [(jax.tree_util.keystr(p, simple=True, separator="/"), np.asarray(x))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def test_only_the_identity_keeps_the_wasym_pattern():
  """Permuting units moves the fixed pattern (matching treats fixed entries as moving with their
  units); since every unit's set differs, a pattern permuted by anything but the identity differs."""
  model = _mlp()
  variables = _init(model)
  _, mask = asymmetric.wasym_start(variables, SPEC)
  spec = permutations.spec_for(model, variables)
  identity = permutations.identity(spec)
  same = permutations.apply_permutation(spec, mask, identity)
  jax.tree.map(np.testing.assert_array_equal, same, mask)
  for seed in range(5):
    swapped = {**identity, "fc1": identity["fc1"].at[jnp.array([seed, seed + 1])].set(jnp.array([seed + 1, seed]))}
    moved = permutations.apply_permutation(spec, mask, swapped)
    assert not np.array_equal(moved["fc1"]["kernel"], mask["fc1"]["kernel"])


def test_wasym_with_nothing_fixed_is_vanilla():
  variables = _init(_mlp())
  start, mask = masks.training_start("wasym", variables, masks.MaskSpec(), 0.4,
                                     asymmetric.WAsymSpec(fixed_per_unit=0))
  jax.tree.map(np.testing.assert_array_equal, start, variables)
  assert masks.fraction_fixed(mask) == 0.0


def test_figlu_is_sigmoid_of_x_times_fixed_f_times_x():
  x = jax.random.normal(jax.random.key(1), (3, 5))
  layer = models.FiGLU(scale=2.0)
  params = layer.init(jax.random.key(2), x)
  f = np.asarray(params["params"]["gate"])
  assert f.shape == (5, 5) and np.std(f) == pytest.approx(2.0, rel=0.5)
  expected = np.asarray(x) / (1 + np.exp(-(np.asarray(x) @ f)))
  np.testing.assert_allclose(layer.apply(params, x), expected, rtol=1e-5, atol=1e-6)


def test_sigma_asym_shares_every_other_parameter_of_the_init_and_fixes_only_f():
  model = _mlp()
  figlu = asymmetric.variant_model("sigma_asym", model, figlu_scale=0.5)
  assert asymmetric.variant_model("wasym", model) is model
  plain, gated = _init(model), _init(figlu)
  assert set(gated["params"]) == {"fc1", "fc2", "head", "figlu1", "figlu2"}
  for name in ("fc1", "fc2", "head"):
    jax.tree.map(np.testing.assert_array_equal, gated["params"][name], plain["params"][name])
  start, mask = masks.training_start("sigma_asym", gated, masks.MaskSpec(), 0.4)
  assert all(mask[name]["gate"].all() for name in ("figlu1", "figlu2"))
  assert not any(m.any() for name in ("fc1", "fc2", "head") for m in jax.tree.leaves(mask[name]))
  assert [g for g, _ in asymmetric.model_groups(model, ["vanilla", "sigma_asym", "tna"], 0.5)] == [model, figlu]
  with pytest.raises(ValueError, match="no FiGLU gates"):
    masks.training_start("sigma_asym", plain, masks.MaskSpec(), 0.4)
  with pytest.raises(ConfigError, match="model.name='mlp' only"):
    asymmetric.variant_model("sigma_asym", models.CNN(num_classes=10))
  with pytest.raises(ConfigError, match="no permutation spec"):
    permutations.describe(figlu)


def test_labels_read_as_a_paper_names_the_variants():
  assert reporting.variant_label("wasym", 0.4, 0.4, fixed_per_unit=64) == "W-Asymmetric (64 fixed per unit)"
  assert reporting.variant_label("sigma_asym", 0.4, 0.4, fixed_per_unit=64) == "σ-Asymmetric (FiGLU)"


def test_sweep_plan_trains_sigma_asym_in_its_own_program_and_each_asymmetric_model_once():
  config = loader.defaults("sweep")
  config.variants = "vanilla,tna,wasym,sigma_asym"
  config.sweep.grid = "mask.fixed_fraction=0.2,0.4;wasym.fixed_per_unit=0,16"
  config.sweep.seeds = 2
  schema.validate(config)
  programs, where = sweep.plan(config)
  assert [sorted({job.variant for job in jobs}) for jobs in programs] == [["tna", "vanilla", "wasym"], ["sigma_asym"]]
  per_variant = {v: sum(job.variant == v for jobs in programs for job in jobs) for v in ("vanilla", "tna", "wasym")}
  # Per seed: vanilla once (wasym with 0 fixed is vanilla), tna per ratio, wasym once whatever the mask ratio.
  assert per_variant == {"vanilla": 2, "tna": 4, "wasym": 2} and len(programs[1]) == 2
  assert sweep.replicate(config, 1).wasym.seed == config.wasym.seed + 1


def run_main(workdir, *flags):
  cmd = [sys.executable, "-m", "tna_jax.main", "--config=configs/default_lmc.py:quick", f"--workdir={workdir}",
         "--config.num_train=512", "--config.num_test=200", "--config.model.width=32", "--config.lmc.num_alphas=3",
         *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def asym_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("asym")
  result = run_main(workdir, "--config.variants=vanilla,wasym,sigma_asym", "--config.wasym.fixed_per_unit=8",
                    "--config.wasym.scale=0.1", "--config.sigma_asym.scale=0.5")
  assert result.returncode == 0, result.stderr[-3000:]
  return saved_runs.load_run(workdir)


def test_wasym_and_sigma_asym_train_through_main_with_their_fixed_entries_bit_identical(asym_run):
  results = asym_run.results
  assert results["models"] == ["vanilla_0", "vanilla_1", "wasym_0", "wasym_1", "sigma_asym_0", "sigma_asym_1"]
  assert [row["variant"] for row in results["summary"]] == ["vanilla", "wasym", "sigma_asym"]
  init = asym_run.restore("init")
  expected, mask = asymmetric.wasym_start(init, asymmetric.WAsymSpec(8, 0.1, 0))
  figlu = asymmetric.variant_model("sigma_asym", asym_run.model, 0.5)
  figlu_init = models.init_variables(figlu, jax.random.key(0), (28, 28, 1))
  for i in range(2):
    trained = asym_run.models[f"wasym_{i}"]["params"]
    for path, fixed in tree_leaves(mask):
      value, start = dict(tree_leaves(trained))[path], dict(tree_leaves(expected["params"]))[path]
      np.testing.assert_array_equal(value[fixed], start[fixed])  # bit for bit, after training
      if fixed.any():
        assert not np.array_equal(value[~fixed], start[~fixed]), f"{path}: the free entries did not train"
    gated = asym_run.models[f"sigma_asym_{i}"]["params"]
    for layer in ("figlu1", "figlu2"):
      np.testing.assert_array_equal(gated[layer]["gate"], figlu_init["params"][layer]["gate"])
    assert not np.array_equal(gated["fc1"]["kernel"], init["params"]["fc1"]["kernel"])
  # The curves were measured with each variant's own module: the FiGLU curve starts at sigma_asym_0's accuracy.
  for variant in ("wasym", "sigma_asym"):
    assert results["curves"][variant]["accuracy"][0] == pytest.approx(
        results["final"][f"{variant}_0"]["test_accuracy"], abs=1e-6)


def test_a_misspelt_variant_gives_one_line_and_exit_2_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  result = run_main(workdir, "--config.variants=vanilla,wasymm")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "variants='wasymm' is not supported" in result.stderr and "Traceback" not in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.parametrize("overrides,message", [
    ({"variants": "vanilla,sigma_asym", "align": "weight"}, "'sigma_asym' cannot be aligned"),
    ({"variants": "sigma_asym", "repair": True}, "'sigma_asym' cannot be aligned"),
    ({"variants": "sigma_asym", "model.name": "cnn"}, "model.name='mlp' only"),
    ({"variants": "wasym", "wasym.scale": 0.0}, "wasym.scale=0.0 must be > 0"),
    ({"variants": "wasym", "wasym.fixed_per_unit": -1}, "wasym.fixed_per_unit=-1 must be >= 0"),
])
def test_configs_refuse_what_the_asymmetric_variants_cannot_do(overrides, message):
  config = loader.defaults("lmc")
  for key, value in overrides.items():
    section, _, leaf = key.rpartition(".")
    (config[section] if section else config)[leaf] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    schema.validate(config)
