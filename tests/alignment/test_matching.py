"""Weight and activation matching: recover known permutations, optimal assignments, and
agree between the on-device (optax) and host (scipy) solvers."""

import collections
import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tna_jax.alignment import interpolation, matching, permutations
from tna_jax.core import evaluate, models, tree_utils
from tna_jax.errors import ConfigError
from test_permutations import PERM_SEED, TINY_MODELS, inverse, random_variables, tiny

MEAN, STD = (0.5,), (0.25,)


def _images(shape, batches: int, batch_size: int = 16, seed: int = 0) -> np.ndarray:
  """uint8 inputs: images, or byte ids for the text model (which `_stats` leaves as they are)."""
  return np.random.default_rng(seed).integers(0, 256, (batches, batch_size) + shape, dtype=np.uint8)


def _stats(shape):
  if len(shape) == 1:  # byte ids: normalization with mean 0 and std 1/255 is the identity (`text_data`)
    return (0.0,), (1 / 255,)
  return MEAN * shape[-1], STD * shape[-1]


def _permuted_copy(name):
  model, variables, _ = tiny(name)
  spec = permutations.spec_for(model, variables)
  perms = permutations.random_permutations(spec, jax.random.key(PERM_SEED))
  return model, spec, variables, perms, permutations.permute_variables(spec, variables, perms)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20-batchnorm", "vit", "vit-lora", "text"])
def test_weight_matching_undoes_a_random_permutation_and_closes_the_barrier(name):
  model, spec, variables, perms, moved = _permuted_copy(name)
  result = matching.weight_matching(spec, variables["params"], moved["params"], seed=1)
  undo = inverse(perms)
  for p in spec.names:
    np.testing.assert_array_equal(result.perms[p], undo[p], err_msg=p)
  assert result.iterations >= 2  # at least one sweep that improves and one that confirms
  assert result.objective > result.initial_objective
  aligned = permutations.permute_variables(spec, moved, result.perms)
  chex.assert_trees_all_close(aligned, variables, rtol=1e-6)

  shape = TINY_MODELS[name][1]
  images = _images(shape, 1, 64)[0]
  batches = evaluate.make_batches(images, np.arange(64, dtype=np.int32) % 10, 32)
  alphas = jnp.linspace(0.0, 1.0, 3)
  curve = jax.device_get(interpolation.lmc_curve(model, variables, aligned, alphas, batches, *_stats(shape)))
  assert interpolation.barriers(alphas, curve["loss"], curve["accuracy"])["loss_barrier"] == pytest.approx(0.0, abs=1e-5)
  np.testing.assert_allclose(curve["loss"], curve["loss"][0], rtol=1e-5)
  unaligned = jax.device_get(interpolation.lmc_curve(model, variables, moved, alphas, batches, *_stats(shape)))
  assert abs(unaligned["loss"][1] - unaligned["loss"][0]) > 1e-3  # without matching the midpoint is another net


@pytest.mark.parametrize("name", ["mlp", "resnet20-layernorm", "vit"])
def test_activation_matching_undoes_a_random_permutation(name):
  model, spec, variables, perms, moved = _permuted_copy(name)
  shape = TINY_MODELS[name][1]
  aligned, result = matching.align("activation", model, variables, moved, images=_images(shape, 2),
                                   mean=_stats(shape)[0], std=_stats(shape)[1])
  undo = inverse(perms)
  for p in spec.names:
    np.testing.assert_array_equal(result.perms[p], undo[p], err_msg=p)
  sited = dict(spec.sites)
  # Heads and head dims have no activation site: weight matching finds them (>= 2 sweeps).
  assert result.iterations == 1 if all(p in sited for p in spec.names) else result.iterations >= 3
  assert result.objective == pytest.approx(1.0, abs=1e-4) and result.initial_objective < 0.5
  chex.assert_trees_all_close(aligned, variables, rtol=1e-6)


def _two_mlps(depth, width, shape=(3, 3, 1)):
  model = models.get_model({"name": "mlp", "depth": depth, "width": width}, 4)
  return model, random_variables(model, shape, 0)["params"], random_variables(model, shape, 1)["params"]


def _objective(spec, a, b) -> float:
  """Sum over permuted leaves of <a, b>, computed without the matching code."""
  axes = spec.leaf_axes()
  dots = tree_utils.map_with_path_str(lambda p, x, y: float(jnp.vdot(x, y)) if any(axes[p]) else 0.0, a, b)
  return sum(jax.tree.leaves(dots))


def test_one_permutation_is_solved_exactly():
  """With one hidden layer, weight matching is a single assignment: brute force agrees."""
  model, a, b = _two_mlps(depth=1, width=6)
  spec = permutations.spec_for(model, {"params": a})
  result = matching.weight_matching(spec, a, b)

  def objective(perm):
    return _objective(spec, a, permutations.apply_permutation(spec, b, {"fc1": jnp.asarray(perm)}))

  best = max(itertools.permutations(range(6)), key=objective)
  np.testing.assert_array_equal(result.perms["fc1"], best)
  assert result.objective == pytest.approx(objective(best), rel=1e-5)
  assert result.initial_objective == pytest.approx(objective(range(6)), rel=1e-5)
  assert result.iterations <= 2


def test_solvers_agree_and_descent_never_lowers_the_objective():
  model, a, b = _two_mlps(depth=3, width=12)
  spec = permutations.spec_for(model, {"params": a})
  scipy_result = matching.weight_matching(spec, a, b, solver="scipy", seed=3)
  device_result = matching.weight_matching(spec, a, b, solver="hungarian", seed=3)
  assert scipy_result.iterations == device_result.iterations
  for p in spec.names:
    np.testing.assert_array_equal(scipy_result.perms[p], device_result.perms[p])
  assert scipy_result.objective >= scipy_result.initial_objective
  moved = permutations.apply_permutation(spec, b, scipy_result.perms)
  assert scipy_result.objective == pytest.approx(_objective(spec, a, moved), rel=1e-5)
  one_sweep = matching.weight_matching(spec, a, b, max_iterations=1, seed=3)
  assert one_sweep.iterations == 1
  assert one_sweep.initial_objective <= one_sweep.objective <= scipy_result.objective + 1e-4


def test_unknown_method_or_solver_is_a_config_error():
  model, variables, _ = tiny("mlp")
  with pytest.raises(ConfigError, match=r"align='magic' is not supported; allowed: weight, activation"):
    matching.align("magic", model, variables, variables)
  with pytest.raises(ConfigError, match=r"matching.solver='lapjv' is not supported; allowed: auto, hungarian, scipy"):
    matching.align("weight", model, variables, variables, solver="lapjv")


def test_benchmark_baseline_does_the_same_work():
  """The host loop of `matching_speedup` takes the same sweeps to the same permutations."""
  from tna_jax.bench import matching_speed as bench  # pylint: disable=g-import-not-at-top
  model, a, b = _two_mlps(depth=3, width=12)
  spec = permutations.spec_for(model, {"params": a})
  result = matching.weight_matching(spec, a, b, solver="scipy", seed=5)
  perms, sweeps = bench.host_weight_matching(spec, a, b, seed=5)
  assert sweeps == result.iterations >= 2
  for p in spec.names:
    np.testing.assert_array_equal(perms[p], result.perms[p])


class UserMLP(nn.Module):
  """A user's own flax model: auto-named layers, no library conventions."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(24)(x))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(10)(x)


def test_a_registered_user_model_is_aligned_by_weight_matching(monkeypatch):
  monkeypatch.setattr(permutations, "_DESCRIPTIONS", dict(permutations._DESCRIPTIONS))  # registry restored after
  model = UserMLP()
  variables = {"params": model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]}
  with pytest.raises(ConfigError, match="no permutation spec for model UserMLP"):
    permutations.spec_for(model, variables)
  permutations.register(UserMLP, lambda m: permutations.chain(["Dense_0", "Dense_1", "Dense_2"]))
  spec = permutations.spec_for(model, variables)
  assert dict(spec.sizes) == {"Dense_0": 24, "Dense_1": 16}
  moved = permutations.permute_variables(spec, variables, permutations.random_permutations(spec, jax.random.key(3)))
  aligned, result = matching.align("weight", model, variables, moved)
  assert result.iterations >= 2
  chex.assert_trees_all_close(aligned, variables, rtol=1e-6)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
  np.testing.assert_allclose(model.apply(moved, x), model.apply(variables, x), rtol=1e-5, atol=1e-6)


def test_compiled_searches_are_kept_up_to_the_bound(monkeypatch):
  """The cache of compiled searches keeps the most recently used ones and drops the oldest."""
  monkeypatch.setattr(matching, "MAX_EXECUTABLES", 2)
  monkeypatch.setattr(matching, "_EXECUTABLES", collections.OrderedDict())
  pairs = {width: _two_mlps(depth=1, width=width) for width in (3, 4, 5)}

  def search(width):
    model, a, b = pairs[width]
    return matching.weight_matching(permutations.spec_for(model, {"params": a}), a, b, solver="scipy")

  assert search(3).compile_seconds > 0
  assert search(4).compile_seconds > 0
  assert search(3).compile_seconds == 0  # kept, and now the most recently used
  assert search(5).compile_seconds > 0  # drops width 4, the least recently used
  assert len(matching._EXECUTABLES) == 2  # pylint: disable=protected-access
  assert search(3).compile_seconds == 0
  assert search(4).compile_seconds > 0
