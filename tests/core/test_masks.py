"""Masks are reproducible and have the requested fraction; frozen entries never move."""

import dataclasses
import zlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tna_jax.core import masks, optim, tree_utils
from tna_jax.errors import ConfigError


def _params(key=0):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  return {
      "Dense_0": {"kernel": jax.random.normal(k1, (300, 400)), "bias": jnp.zeros(400)},
      "Dense_1": {"kernel": jax.random.normal(k2, (400, 500)), "bias": jax.random.normal(k3, (500,))},
  }


def test_mask_fraction_matches_request():
  for fraction in (0.0, 0.1, 0.4, 0.9):
    mask = masks.fixed_mask(_params(), fraction, seed=3)
    assert masks.fraction_fixed(mask) == pytest.approx(fraction, abs=0.005)


def test_mask_is_reproducible_and_depends_on_seed_and_path_not_leaf_order():
  params = _params()
  a = masks.fixed_mask(params, 0.4, seed=1)
  b = masks.fixed_mask(params, 0.4, seed=1)
  c = masks.fixed_mask(params, 0.4, seed=2)
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a["Dense_0"]["kernel"], c["Dense_0"]["kernel"])
  # The same leaf path gives the same draw whatever else is in the tree.
  alone = masks.fixed_mask({"Dense_1": params["Dense_1"]}, 0.4, seed=1)
  np.testing.assert_array_equal(alone["Dense_1"]["kernel"], a["Dense_1"]["kernel"])
  # Different leaves of the same shape get different draws.
  twins = masks.fixed_mask({"x": jnp.zeros(1000), "y": jnp.zeros(1000)}, 0.5, seed=1)
  assert not np.array_equal(twins["x"], twins["y"])


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_fixed_fraction_out_of_range_is_a_clear_error(bad):
  with pytest.raises(ConfigError, match=r"fixed_fraction=.*0 <= fixed_fraction < 1"):
    masks.fixed_mask(_params(), bad, seed=0)


def test_neuron_granularity_fixes_whole_units_across_kernel_and_bias():
  params = _params()
  mask = masks.fixed_mask(params, 0.5, seed=0, granularity="neuron")
  for layer in ("Dense_0", "Dense_1"):
    kernel, bias = np.asarray(mask[layer]["kernel"]), np.asarray(mask[layer]["bias"])
    assert (kernel == kernel[:1]).all(), "a unit's column must be all fixed or all free"
    np.testing.assert_array_equal(kernel[0], bias)
    assert 0.35 < bias.mean() < 0.65
  with pytest.raises(ConfigError, match="granularity='channel'.*weight, neuron"):
    masks.fixed_mask(params, 0.5, seed=0, granularity="channel")


def test_include_and_exclude_select_leaves_by_path():
  params = _params()
  only_kernels = masks.fixed_mask(params, 0.5, seed=0, include="kernel")
  assert not np.asarray(only_kernels["Dense_1"]["bias"]).any()
  assert np.asarray(only_kernels["Dense_1"]["kernel"]).any()
  no_first = masks.fixed_mask(params, 0.5, seed=0, exclude=r"^Dense_0/")
  assert not np.asarray(no_first["Dense_0"]["kernel"]).any()
  np.testing.assert_array_equal(no_first["Dense_1"]["kernel"], only_kernels["Dense_1"]["kernel"])
  with pytest.raises(ConfigError, match="include='\\('"):
    masks.fixed_mask(params, 0.5, seed=0, include="(")


@pytest.mark.parametrize("names,preset,selected", [
    (["fc1", "fc2", "fc3", "head"], "first", {"fc1"}),
    (["fc1", "fc2", "fc3", "head"], "middle", {"fc2", "fc3"}),
    (["fc1", "fc2", "fc3", "head"], "last", {"head"}),
    (["fc1", "fc2", "fc3", "head"], "all", {"fc1", "fc2", "fc3", "head"}),
    (["block1_1", "conv1", "head", "norm1"], "first", {"conv1"}),  # a ResNet: its stem reads the input
    (["block1_1", "conv1", "head", "norm1"], "middle", {"block1_1", "norm1"}),
])
def test_layer_presets_mask_only_their_layers(names, preset, selected):
  params = {name: {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)} for name in names}
  mask = masks.fixed_mask(params, 0.5, seed=0, include=preset)
  assert {name for name in names if np.asarray(mask[name]["kernel"]).any()} == selected


def test_a_layer_preset_the_model_lacks_is_a_clear_error():
  with pytest.raises(ConfigError, match="include='middle'.*no middle layers"):
    masks.fixed_mask({"fc1": {"kernel": jnp.zeros((2, 2))}, "head": {"kernel": jnp.zeros((2, 2))}}, 0.5, seed=0,
                     include="middle")
  with pytest.raises(ConfigError, match="include='first'.*no input layer"):
    masks.fixed_mask({"Dense_0": {"kernel": jnp.zeros((2, 2))}}, 0.5, seed=0, include="first")


def test_reverse_and_prune():
  params = _params()
  mask = masks.fixed_mask(params, 0.3, seed=0)
  assert masks.fraction_fixed(masks.reverse(mask)) == pytest.approx(1 - masks.fraction_fixed(mask))
  pruned = masks.prune(params, mask)
  for p, q, m in zip(jax.tree.leaves(params), jax.tree.leaves(pruned), jax.tree.leaves(mask)):
    assert (np.asarray(q)[np.asarray(m)] == 0).all()
    np.testing.assert_array_equal(np.asarray(q)[~np.asarray(m)], np.asarray(p)[~np.asarray(m)])


def _opt(name, **kw):
  cfg = dict(name=name, learning_rate=0.05, momentum=0.9, weight_decay=5e-2, schedule="cosine", warmup_steps=5)
  cfg.update(kw)
  return optim.make_optimizer(ml_collections.ConfigDict(cfg), total_steps=200)


@pytest.mark.parametrize("name,nesterov", [("sgd", False), ("sgd", True), ("adam", False), ("adamw", False)])
def test_frozen_entries_stay_bit_identical_under_momentum_and_weight_decay(name, nesterov):
  params = _params()
  mask = masks.fixed_mask(params, 0.4, seed=7)
  tx = _opt(name, nesterov=nesterov)

  @jax.jit
  def run(params):
    def step(carry, key):
      params, state = carry
      grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)
      updates, state = tx.update(grads, state, params, fixed_mask=mask)
      return (optax.apply_updates(params, updates), state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(jax.random.key(1), 200))
    return params

  trained = run(params)
  for before, after, m in zip(jax.tree.leaves(params), jax.tree.leaves(trained), jax.tree.leaves(mask)):
    before, after, m = np.asarray(before), np.asarray(after), np.asarray(m)
    np.testing.assert_array_equal(before[m].view(np.uint32), after[m].view(np.uint32))
    assert (before[~m] != after[~m]).mean() > 0.99, "trainable entries must move"


def test_update_without_mask_fails_instead_of_training_everything():
  params = _params()
  tx = _opt("sgd")
  with pytest.raises(TypeError, match="fixed_mask"):
    tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("cfg,match", [
    (dict(name="rmsprop"), "optimizer.name='rmsprop'.*sgd, adam, adamw"),
    (dict(name="sgd", schedule="linear"), "optimizer.schedule='linear'.*constant, cosine"),
    (dict(name="sgd", learning_rate=0.0), "learning_rate=0.0 must be > 0"),
])
def test_bad_optimizer_config_is_a_clear_error(cfg, match):
  with pytest.raises(ConfigError, match=match):
    _opt(**cfg)


# ----------------------------------------------------------------------------- the mask of a config


def _mask_section(**overrides) -> ml_collections.ConfigDict:
  section = dict(fixed_fraction=0.4, granularity="weight", include="", exclude="", seed=7)
  return ml_collections.ConfigDict({**section, **overrides})


@pytest.mark.parametrize("overrides", [{}, {"granularity": "neuron"}, {"include": "kernel", "exclude": "^Dense_1/"}])
def test_from_config_draws_the_mask_the_hand_unpacked_call_draws(overrides):
  section = _mask_section(**overrides)
  by_hand = masks.fixed_mask(_params(), section.fixed_fraction, seed=section.seed, granularity=section.granularity,
                             include=section.include, exclude=section.exclude)
  chex.assert_trees_all_equal(masks.from_config(_params(), section), by_hand)
  assert masks.fraction_fixed(by_hand) > 0


def test_mask_spec_round_trip_and_redraw():
  federated = _mask_section(granularity="neuron", include="kernel", redraw="every_round", select="random")
  spec = masks.MaskSpec.from_config(federated)
  assert dataclasses.asdict(spec) == federated.to_dict()
  assert masks.MaskSpec.from_config(dataclasses.asdict(spec)) == spec
  assert hash(masks.MaskSpec.from_config(federated)) == hash(spec)  # a static argument of a compiled round
  # The lmc and soup configs have no `redraw`: one mask for the run.
  assert masks.MaskSpec.from_config(_mask_section()).redraw == "never"
  spec = masks.MaskSpec.from_config(_mask_section())
  params = _params()
  jax.tree.map(np.testing.assert_array_equal, spec.draw(params),
               masks.fixed_mask(params, spec.fixed_fraction, seed=spec.seed))
  redrawn = jax.jit(spec.draw)(params, jnp.uint32(spec.seed + 1))  # a traced seed, as a federated round has
  jax.tree.map(np.testing.assert_array_equal, redrawn,
               masks.fixed_mask(params, spec.fixed_fraction, seed=spec.seed + 1))
  with pytest.raises(ConfigError, match="mask.redraw='always'.*never, every_round"):
    masks.MaskSpec(redraw="always")


def test_frozen_except_freezes_what_the_pattern_does_not_name():
  params = _params()
  frozen = masks.frozen_except(params, "^Dense_1/")
  assert np.asarray(frozen["Dense_0"]["kernel"]).all() and np.asarray(frozen["Dense_0"]["bias"]).all()
  assert not np.asarray(frozen["Dense_1"]["kernel"]).any() and not np.asarray(frozen["Dense_1"]["bias"]).any()
  assert masks.fraction_fixed(masks.frozen_except(params, "")) == 0.0  # '' = everything trains
  with pytest.raises(ConfigError, match=r"finetune.trainable='\(' is not a valid regular expression"):
    masks.frozen_except(params, "(")
  with pytest.raises(ConfigError, match="finetune.trainable='lora' matches no parameter path"):
    masks.frozen_except(params, "lora")


# ----------------------------------------------------------------------------- the path strings behind the keys


def test_path_strings_are_slash_joined_keys():
  # Dict keys, sequence indices and named-tuple fields (optimizer states) alike.
  tree = {"params": {"Dense_0": {"kernel": 0}}, "stack": [0, (0,)],
          "state": optax.ScaleByAdamState(count=0, mu={"Dense_0": 0}, nu=None)}
  paths = [tree_utils.path_str(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
  assert paths == ["params/Dense_0/kernel", "stack/0", "stack/1/0", "state/count", "state/mu/Dense_0"]


def test_each_leaf_key_is_the_crc_of_its_path_string():
  # The mask of a leaf is drawn with fold_in(key(seed), crc32('Dense_0/kernel')): changing the
  # path strings (separator, key formatting) would silently change every mask and permutation.
  params, seed, fraction = _params(), 4, 0.3
  mask = masks.fixed_mask(params, fraction, seed=seed)
  for path in ("Dense_0/kernel", "Dense_1/bias"):
    module, name = path.split("/")
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)
    expected = jax.random.bernoulli(key, fraction, params[module][name].shape)
    np.testing.assert_array_equal(mask[module][name], expected)
  neuron = masks.fixed_mask(params, fraction, seed=seed, granularity="neuron")  # one draw per unit of 'Dense_0'
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(b"Dense_0") & 0x7FFFFFFF)
  np.testing.assert_array_equal(neuron["Dense_0"]["bias"], jax.random.bernoulli(key, fraction, (400,)))
