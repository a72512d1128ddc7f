"""Permutation specs: every model's function is invariant under its permutations."""

import functools
import zlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tna_jax.alignment import permutations
from tna_jax.core import models, transformer_models, tree_utils
from tna_jax.errors import ConfigError

# (model config, input shape): tiny widths, the real structure (names, depth, shortcuts).
TINY_MODELS = {
    "mlp": ({"name": "mlp", "depth": 2, "width": 8}, (6, 6, 1)),
    # VALID convs need 28x28; its fc1 reads a flattened 3x3x16 map (channels 32/64/64 x 0.25)
    "cnn": ({"name": "cnn", "width_multiplier": 0.25}, (28, 28, 1)),
    "resnet20-batchnorm": ({"name": "resnet20", "norm": "batchnorm", "width_multiplier": 0.25}, (8, 8, 3)),
    "resnet20-layernorm": ({"name": "resnet20", "norm": "layernorm", "width_multiplier": 0.25}, (8, 8, 3)),
    "resnet20-none": ({"name": "resnet20", "norm": "none", "width_multiplier": 0.25}, (8, 8, 3)),
    "vgg11": ({"name": "vgg11", "width_multiplier": 1 / 16}, (8, 8, 3)),
    "vit": ({"name": "vit", "patch_size": 4, "depth": 2, "width": 16, "num_heads": 4, "mlp_dim": 32}, (8, 8, 3)),
    "vit-lora": ({"name": "vit", "patch_size": 4, "depth": 2, "width": 16, "num_heads": 4, "mlp_dim": 32,
                  "lora_rank": 2}, (8, 8, 3)),
    "text": ({"name": "text_transformer", "depth": 2, "width": 16, "num_heads": 4, "mlp_dim": 32, "pool": "gap"},
             (8,)),  # byte ids; mean pooling, so no class token
}
PERM_SEED = 4  # none of its permutations is the identity (checked below)


def inverse(perms) -> dict:
  """The permutations that undo `perms`."""
  return {name: jnp.argsort(perm) for name, perm in perms.items()}


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
  key = jax.random.key(seed + 7)
  if isinstance(model, transformer_models.TextTransformer):  # byte ids, padding (id 0) included
    x = jax.random.randint(key, (4,) + shape, 0, model.vocab_size).at[:, -2:].set(transformer_models.PAD_ID)
  else:
    x = jax.random.normal(key, (4,) + shape)
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
  if variables.get("batch_stats"):  # Train mode: batch statistics, and the running ones it updates.
    out, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
    out_moved, new_moved = model.apply(moved, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out_moved, out, rtol=1e-4, atol=1e-4 * np.abs(out).max())
    spec = permutations.spec_for(model, variables)
    perms = permutations.random_permutations(spec, jax.random.key(PERM_SEED))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 new_moved["batch_stats"], permutations.apply_permutation(spec, new["batch_stats"], perms))


def test_permutations_really_move_every_permuted_leaf(permuted):
  _, _, spec, variables, moved, _ = permuted
  moving = {unit.path for unit in spec.units() if unit.size > 1}
  for collection, tree in variables.items():
    after = _flat(moved[collection])
    for path, before in _flat(tree).items():
      if path in moving:
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
  back = permutations.permute_variables(spec, moved, inverse(perms))
  chex.assert_trees_all_equal(back, variables)


def test_specs_name_the_permutations_of_each_model():
  expected = {
      "mlp": (("fc1", 8), ("fc2", 8)),
      "cnn": (("conv1", 8), ("conv2", 16), ("conv3", 16), ("fc1", 16)),
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
  # An axis of 2 heads x 3 head dims (LoRA's B): the heads are the outer part (inner = 3).
  moved = permutations.take_units(x, jnp.array([1, 0]), axis=1, inner=3)
  np.testing.assert_array_equal(moved[0, :, 0], [6, 8, 10, 0, 2, 4])
  heads = np.asarray(x).reshape(2, 6)
  np.testing.assert_allclose(permutations.unit_products(x, x, 1, 2, inner=3), heads @ heads.T)


TRANSFORMERS = ["vit", "vit-lora", "text"]


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_every_transformer_permutation_alone_keeps_the_logits(name):
  """The residual stream, each block's heads, head dims (q/k and v/out) and MLP units: each
  one alone, and all together, is a symmetry of the model (LoRA adapters included)."""
  model, variables, x = tiny(name)
  spec = permutations.spec_for(model, variables)
  perms = permutations.random_permutations(spec, jax.random.key(PERM_SEED))
  out = model.apply(variables, x, train=False)
  for moved_name in spec.names + ("all",):
    only = perms if moved_name == "all" else {**permutations.identity(spec), moved_name: perms[moved_name]}
    moved = model.apply(permutations.permute_variables(spec, variables, only), x, train=False)
    np.testing.assert_allclose(moved, out, rtol=0, atol=1e-5 * np.abs(out).max(), err_msg=moved_name)


def test_transformer_specs_name_residual_stream_heads_head_dims_and_mlp_units():
  model, variables = tiny_shapes("vit-lora")
  spec = permutations.spec_for(model, variables)
  block = "Transformer/encoderblock_1"
  heads, qk, vo, mlp = (f"{block}/{p}" for p in ("heads", "qk", "vo", "mlp"))
  assert spec.names[0] == "residual" and len(spec.names) == 1 + 2 * 4
  assert {p: spec.size(p) for p in (heads, qk, vo, mlp)} == {heads: 4, qk: 4, vo: 4, mlp: 32}
  assert dict(spec.nested)[heads] == (qk, vo)
  axes, attention = spec.leaf_axes(), f"{block}/MultiHeadDotProductAttention_0"
  assert axes[f"{attention}/query/kernel"] == ("residual", heads, qk)  # [width, heads, head_dim]
  assert axes[f"{attention}/key/bias"] == (heads, qk)
  assert axes[f"{attention}/value/lora_b"] == (None, (heads, vo))  # [rank, heads * head_dim]
  assert axes[f"{attention}/out/kernel"] == (heads, vo, "residual")  # [heads, head_dim, width]
  assert axes[f"{attention}/out/lora_a"] == ((heads, vo), None)
  assert axes[f"{block}/MlpBlock_0/Dense_0/lora_a"] == ("residual", None)
  assert axes[f"{block}/MlpBlock_0/Dense_1/lora_b"] == (None, "residual")
  assert axes["embedding/kernel"] == (None, None, None, "residual")
  assert axes["pos_embedding"] == axes["cls"] == (None, None, "residual")
  assert axes["head/kernel"] == ("residual", None)
  assert dict(spec.sites)["residual"] == ("embedding", "Transformer/encoderblock_0", block)
  assert dict(spec.sites)[mlp] == (f"{block}/MlpBlock_0/Dense_0",) and heads not in dict(spec.sites)
  [heads_on_b] = [u for u in spec.axes_of(heads) if u.path == f"{attention}/value/lora_b"]
  assert (heads_on_b.axis, heads_on_b.size, heads_on_b.inner) == (1, 4, 4)  # heads are the outer part
  model, variables = tiny_shapes("text")
  axes = permutations.spec_for(model, variables).leaf_axes()
  assert axes["embedding/embedding"] == (None, "residual") and "cls" not in axes


def test_transformer_spec_check_raises_both_ways():
  lora_model, lora_variables = tiny_shapes("vit-lora")
  plain_model = lora_model.clone(lora_rank=0)
  query = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query"
  with pytest.raises(ValueError, match=rf"leaves no layer describes: \[.*'params/{query}/lora_a'"):
    permutations.spec_for(plain_model, lora_variables)  # adapters the description does not cover
  plain_variables = jax.eval_shape(lambda: models.init_variables(plain_model, jax.random.key(0), (8, 8, 3)))
  with pytest.raises(ValueError, match=rf"described layers without variables: \[.*'{query}/lora_a'"):
    permutations.spec_for(lora_model, plain_variables)
  params = jax.tree.map(lambda x: x, plain_variables["params"])
  params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"]["scale"] = params["head"]["bias"]
  with pytest.raises(ValueError, match=rf"leaves no layer describes: \['params/{query}/scale'\]"):
    permutations.spec_for(plain_model, {"params": params})
