"""Permutation specs: every model's function is invariant under its permutations."""

import functools
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tna_jax import models, permutations, tree_utils
from tna_jax.errors import ConfigError

# (model config, input shape): tiny widths, the real structure (names, depth, shortcuts).
TINY_MODELS = {
    "mlp": ({"name": "mlp", "depth": 2, "width": 8}, (6, 6, 1)),
    "cnn": ({"name": "cnn"}, (28, 28, 1)),  # VALID convs need 28x28; its fc1 reads a flattened 3x3x64 map
    "resnet20-batchnorm": ({"name": "resnet20", "norm": "batchnorm", "width_multiplier": 0.25}, (8, 8, 3)),
    "resnet20-layernorm": ({"name": "resnet20", "norm": "layernorm", "width_multiplier": 0.25}, (8, 8, 3)),
    "resnet20-none": ({"name": "resnet20", "norm": "none", "width_multiplier": 0.25}, (8, 8, 3)),
    "vgg11": ({"name": "vgg11", "width_multiplier": 1 / 16}, (8, 8, 3)),
}
PERM_SEED = 4  # none of its permutations is the identity (checked below)


def random_variables(model, input_shape, seed: int = 0) -> dict:
  """Variables of the model's shapes filled from numpy (no per-shape compilation): He-scaled
  kernels, and every bias, norm scale and BN statistic distinct per unit, so a
  wrongly permuted leaf shows in the outputs."""
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), input_shape))

  def draw(path, leaf):
    noise = np.random.default_rng([seed, zlib.crc32(path.encode())]).normal(size=leaf.shape).astype(np.float32)
    if len(leaf.shape) >= 2:
      return jnp.asarray(noise * np.sqrt(2 / np.prod(leaf.shape[:-1])))  # He: signals survive depth
    positive = path.endswith(("scale", "var"))
    return jnp.asarray(np.exp(0.3 * noise) if positive else 0.3 * noise)

  return {c: tree_utils.map_with_path_str(lambda p, x, c=c: draw(f"{c}/{p}", x), tree) for c, tree in shapes.items()}


@functools.lru_cache(maxsize=None)
def tiny(name: str, seed: int = 0):
  """(model, random variables, a batch of inputs) of TINY_MODELS[name]; computed once."""
  config, shape = TINY_MODELS[name]
  model = models.get_model(config, 10)
  x = jax.random.normal(jax.random.key(seed + 7), (4,) + shape)
  return model, random_variables(model, shape, seed), x


def tiny_shapes(name: str):
  """(model, shape structs of its variables): enough for a spec, nothing computed."""
  config, shape = TINY_MODELS[name]
  model = models.get_model(config, 10)
  return model, jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), shape))


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def permuted(request):
  model, variables, x = tiny(request.param)
  spec = permutations.spec_for(model, variables)
  perms = permutations.random_permutations(spec, jax.random.key(PERM_SEED))
  return request.param, model, spec, variables, permutations.permute_variables(spec, variables, perms), x


def test_the_random_permutations_of_the_tests_move_every_unit_group():
  for name in TINY_MODELS:
    model, variables = tiny_shapes(name)
    perms = permutations.random_permutations(permutations.spec_for(model, variables), jax.random.key(PERM_SEED))
    assert all(not np.array_equal(p, np.arange(len(p))) for p in perms.values() if len(p) > 1), name


def test_random_permutations_leave_outputs_unchanged(permuted):
  _, model, _, variables, moved, x = permuted
  out = model.apply(variables, x, train=False)
  np.testing.assert_allclose(model.apply(moved, x, train=False), out, rtol=1e-4, atol=1e-4 * np.abs(out).max())
  if models.has_batch_stats(variables):  # Train mode: batch statistics, and the running ones it updates.
    out, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
    out_moved, new_moved = model.apply(moved, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out_moved, out, rtol=1e-4, atol=1e-4 * np.abs(out).max())
    spec = permutations.spec_for(model, variables)
    perms = permutations.random_permutations(spec, jax.random.key(PERM_SEED))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 new_moved["batch_stats"], permutations.apply_permutation(spec, new["batch_stats"], perms))


def test_permutations_really_move_every_permuted_leaf(permuted):
  _, _, spec, variables, moved, _ = permuted
  leaf_axes = spec.leaf_axes()
  for collection, tree in variables.items():
    after = _flat(moved[collection])
    for path, before in _flat(tree).items():
      if any(p is not None and spec.size(p) > 1 for p in leaf_axes[path]):
        assert not np.allclose(before, after[path]), f"{collection}/{path}"


def _flat(tree) -> dict:
  return {tree_utils.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_permuting_only_part_of_a_unit_group_changes_outputs(permuted):
  """The invariance test above can fail: leave one permuted kernel out and outputs move."""
  name, model, spec, variables, moved, x = permuted
  kernel = next(path for path, axes in spec.axes if path.endswith("kernel") and axes[-1] is not None)
  params = tree_utils.map_with_path_str(lambda path, new, old: old if path == kernel else new, moved["params"],
                                        variables["params"])
  broken = {**moved, "params": params}
  out = model.apply(variables, x, train=False)
  assert np.abs(model.apply(broken, x, train=False) - out).max() > 0.01 * np.abs(out).max(), name


def test_inverse_undoes_a_permutation(permuted):
  _, _, spec, variables, moved, _ = permuted
  perms = permutations.random_permutations(spec, jax.random.key(PERM_SEED))
  back = permutations.permute_variables(spec, moved, permutations.inverse(perms))
  jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_specs_name_the_permutations_of_each_model():
  expected = {
      "mlp": (("fc1", 8), ("fc2", 8)),
      "cnn": (("conv1", 32), ("conv2", 64), ("conv3", 64), ("fc1", 64)),
      "vgg11": tuple((f"conv{i}", w) for i, w in enumerate((4, 8, 16, 16, 32, 32, 32, 32), 1))
               + (("fc1", 32), ("fc2", 32)),
  }
  for name, sizes in expected.items():
    model, variables = tiny_shapes(name)
    assert permutations.spec_for(model, variables).sizes == sizes
  for norm in models.NORMS:
    model, variables = tiny_shapes(f"resnet20-{norm}")
    spec = permutations.spec_for(model, variables)
    sizes = dict(spec.sizes)
    assert (sizes["stage1"], sizes["stage2"], sizes["stage3"]) == (4, 8, 16)
    assert len(spec.names) == 3 + 9  # three residual streams, one inner permutation per block
    axes = spec.leaf_axes()
    assert axes["block2_1/shortcut_conv/kernel"] == (None, None, "stage1", "stage2")
    assert axes["block2_2/conv_a/kernel"] == (None, None, "stage2", "block2_2/conv_a")
    assert axes["head/kernel"] == ("stage3", None)
    if norm == "batchnorm":
      assert axes["block3_3/norm_b/mean"] == ("stage3",)
  # The CNN's fc1 reads conv3's 64 channels at each of 3x3 positions.
  model, variables = tiny_shapes("cnn")
  spec = permutations.spec_for(model, variables)
  assert spec.leaf_axes()["fc1/kernel"] == ("conv3", "fc1")
  assert variables["params"]["fc1"]["kernel"].shape[0] == 9 * spec.size("conv3")


def test_renamed_layer_breaks_the_spec_loudly():
  model, variables = tiny_shapes("mlp")
  params = dict(variables["params"])
  params["dense2"] = params.pop("fc2")
  with pytest.raises(ValueError, match=r"params/dense2/kernel.*described layers without variables: \['fc2'\]"):
    permutations.spec_for(model, {"params": params})


def test_model_without_a_description_is_a_config_error():

  class Unknown(nn.Module):

    @nn.compact
    def __call__(self, x, train):
      return nn.Dense(2)(x)

  with pytest.raises(ConfigError, match="no permutation spec for model Unknown; allowed: MLP, CNN, VGG, ResNet20"):
    permutations.spec_for(Unknown(), {"params": {}})


def test_flattened_axis_is_permuted_unit_by_unit():
  x = jnp.arange(12.0).reshape(1, 6, 2)  # axis 1: 2 copies ("positions") of 3 units
  moved = permutations.take_units(x.reshape(1, 6, 2), jnp.array([2, 0, 1]), axis=1)
  np.testing.assert_array_equal(moved[0, :, 0], [4, 0, 2, 10, 6, 8])
  products = permutations.unit_products(x, x, 1, 3)
  units = np.asarray(x).reshape(2, 3, 2).transpose(1, 0, 2).reshape(3, -1)
  np.testing.assert_allclose(products, units @ units.T)
