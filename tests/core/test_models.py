"""Tests of tna_jax.core.models: shapes, parameter names, norm variants and BN statistics."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tna_jax.core import models
from tna_jax.core.tree_utils import path_str
from tna_jax.errors import ConfigError

MNIST_SHAPE = (28, 28, 1)
CIFAR_SHAPE = (32, 32, 3)
# Tiny widths keep the tests fast; the structure (names, depth, pooling) is unchanged.
TINY_KNOBS = {"mlp": {"depth": 2, "width": 8}, "resnet20": {"width_multiplier": 1},
              "vgg11": {"width_multiplier": 1 / 64}, "vgg13": {"width_multiplier": 1 / 64},
              "vgg16": {"width_multiplier": 1 / 64}}


def _model(name: str, num_classes: int = 10, **knobs):
  config = ml_collections.ConfigDict({"name": name, **TINY_KNOBS.get(name, {}), **knobs})
  return models.get_model(config, num_classes)


def _shapes(model, input_shape):
  """Variable shapes without running (or compiling) the model."""
  return jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), input_shape))


def _param_paths(variables) -> set[str]:
  return {path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables["params"])}


def _resnet(norm: str = "batchnorm", **kwargs):
  return models.ResNet20(num_classes=10, norm=norm, **kwargs)


def _images(shape, batch: int = 4):
  return jax.random.normal(jax.random.key(1), (batch,) + shape)


def test_model_names():
  assert models.MODEL_NAMES == ("mlp", "cnn", "resnet20", "vgg11", "vgg13", "vgg16")


@pytest.mark.parametrize("input_shape", [MNIST_SHAPE, CIFAR_SHAPE])
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_output_shape(name, input_shape):
  model = _model(name, num_classes=7)
  x = jnp.zeros((3,) + input_shape)
  variables = _shapes(model, input_shape)
  for train in (False, True):
    out = jax.eval_shape(
        lambda v, x, train=train: model.apply(v, x, train=train, mutable=["batch_stats"]),
        variables, x)[0]
    assert out.shape == (3, 7)
    assert out.dtype == jnp.float32


def test_outputs_are_finite_and_depend_on_input():
  model = _model("cnn")
  variables = models.init_variables(model, jax.random.key(0), MNIST_SHAPE)
  out = model.apply(variables, _images(MNIST_SHAPE), train=False)
  assert np.all(np.isfinite(out))
  assert not np.allclose(out[0], out[1])


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_mlp_param_count(depth):
  width, num_classes, inputs = 8, 5, 28 * 28
  variables = _shapes(_model("mlp", num_classes, depth=depth, width=width), MNIST_SHAPE)
  count = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
  if depth == 0:
    expected = inputs * num_classes + num_classes
  else:
    expected = ((inputs + 1) * width + (depth - 1) * (width + 1) * width
                + (width + 1) * num_classes)
  assert count == expected


def test_get_model_defaults():
  mlp = models.get_model(ml_collections.ConfigDict({"name": "mlp"}), 10)
  assert (mlp.depth, mlp.width, mlp.num_classes) == (2, 200, 10)
  resnet = models.get_model({"name": "resnet20"}, 100)  # A plain dict works too.
  assert (resnet.width_multiplier, resnet.norm, resnet.bn_momentum) == (1, "batchnorm", 0.9)
  vgg = models.get_model({"name": "vgg13", "width_multiplier": 0.5}, 10)
  assert vgg.layers == models.VGG_LAYERS["vgg13"] and vgg.width_multiplier == 0.5


def test_unknown_name_raises_config_error_naming_choices():
  with pytest.raises(ConfigError) as info:
    models.get_model({"name": "resnet50"}, 10)
  message = str(info.value)
  assert "model.name" in message and "'resnet50'" in message
  for name in models.MODEL_NAMES:
    assert name in message


def test_bad_norm_raises_config_error():
  with pytest.raises(ConfigError, match=r"model\.norm='groupnorm'.*batchnorm, layernorm, none"):
    models.get_model({"name": "resnet20", "norm": "groupnorm"}, 10)


def test_param_paths():
  assert _param_paths(_shapes(_model("mlp", depth=3), MNIST_SHAPE)) == {
      f"{layer}/{p}" for layer in ("fc1", "fc2", "fc3", "head") for p in ("kernel", "bias")}
  assert set(_shapes(_model("cnn"), MNIST_SHAPE)["params"]) == {
      "conv1", "conv2", "conv3", "fc1", "head"}
  vgg16 = _shapes(_model("vgg16"), CIFAR_SHAPE)["params"]
  assert set(vgg16) == {f"conv{i}" for i in range(1, 14)} | {"fc1", "fc2", "head"}
  resnet = _param_paths(_shapes(_resnet(), CIFAR_SHAPE))
  for path in ("conv1/kernel", "norm1/scale", "block1_1/conv_a/kernel", "block2_1/norm_b/bias",
               "block2_1/shortcut_conv/kernel", "block3_3/conv_b/kernel", "head/kernel"):
    assert path in resnet
  assert len({p.split("/")[0] for p in resnet if p.startswith("block")}) == 9


def test_resnet_shortcut_conv_only_where_shape_changes():
  params = _shapes(_resnet(), CIFAR_SHAPE)["params"]
  with_shortcut = {b for b in params if "shortcut_conv" in params[b]}
  assert with_shortcut == {"block2_1", "block3_1"}
  assert params["block2_1"]["shortcut_conv"]["kernel"].shape == (1, 1, 16, 32)


@pytest.mark.parametrize("norm", models.NORMS)
def test_resnet_norm_variants(norm):
  variables = _shapes(_resnet(norm), CIFAR_SHAPE)
  params = variables["params"]["block2_1"]
  assert bool(variables.get("batch_stats")) == (norm == "batchnorm")
  assert ("norm_a" in params) == (norm != "none")
  assert ("bias" in params["conv_a"]) == (norm == "none")
  assert "bias" in variables["params"]["head"]


def test_resnet_width_multiplier_doubles_channels():
  narrow = _shapes(_resnet(width_multiplier=1), CIFAR_SHAPE)["params"]
  wide = _shapes(_resnet(width_multiplier=2), CIFAR_SHAPE)["params"]
  convs = [(path_str(p), x.shape) for p, x in jax.tree_util.tree_leaves_with_path(narrow)
           if x.ndim == 4]
  assert len(convs) == 1 + 9 * 2 + 2
  wide_shapes = {path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(wide)}
  for path, (kh, kw, cin, cout) in convs:
    expected_cin = cin if path == "conv1/kernel" else 2 * cin  # The stem reads RGB.
    assert wide_shapes[path] == (kh, kw, expected_cin, 2 * cout)
  assert wide_shapes["head/kernel"] == (128, 10)


def test_vgg_width_multiplier_scales_hidden_widths():
  params = _shapes(_model("vgg11", width_multiplier=0.25), MNIST_SHAPE)["params"]
  assert params["conv1"]["kernel"].shape == (3, 3, 1, 16)
  assert params["conv8"]["kernel"].shape == (3, 3, 128, 128)
  # 28x28 shrinks to 1x1 through five 'SAME' pools.
  assert params["fc1"]["kernel"].shape == (128, 128)
  assert params["head"]["kernel"].shape == (128, 10)


@pytest.fixture(scope="module")
def resnet_bn():
  """A batchnorm ResNet20, its variables and a batch, shared by the BN statistics tests."""
  model = _resnet()
  variables = models.init_variables(model, jax.random.key(0), CIFAR_SHAPE)
  return model, variables, _images(CIFAR_SHAPE)


def _train_stats(model, variables, x):
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  return updates["batch_stats"]


def test_train_mode_updates_batch_stats_and_eval_mode_does_not(resnet_bn):
  model, variables, x = resnet_bn
  old_means = jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(lambda s: s["mean"], variables["batch_stats"],
                             is_leaf=lambda s: "mean" in s))
  new_stats = _train_stats(model, variables, x)
  new_means = jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(lambda s: s["mean"], new_stats, is_leaf=lambda s: "mean" in s))
  assert len(new_means) == 1 + 9 * 2 + 2
  for old, new in zip(old_means, new_means):
    assert not np.allclose(old, new)
  _, eval_updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
  unchanged = jax.tree_util.tree_map(np.array_equal, eval_updates["batch_stats"],
                                     variables["batch_stats"])
  assert all(jax.tree_util.tree_leaves(unchanged))


def test_bn_momentum_zero_sets_running_stats_to_batch_stats(resnet_bn):
  model, variables, x = resnet_bn
  reestimate = model.clone(bn_momentum=0.0)
  _, state = reestimate.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                              capture_intermediates=lambda m, _: m.name == "conv1")
  conv1_out = state["intermediates"]["conv1"]["__call__"][0]
  np.testing.assert_allclose(state["batch_stats"]["norm1"]["mean"],
                             conv1_out.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["norm1"]["var"],
                             conv1_out.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  default_mean = _train_stats(model, variables, x)["norm1"]["mean"]
  assert not np.allclose(state["batch_stats"]["norm1"]["mean"], default_mean)


def test_bn_momentum_controls_every_bn_layer(resnet_bn):
  """With momentum 0 no layer's new statistics depend on its old ones."""
  model, variables, x = resnet_bn
  reestimate = model.clone(bn_momentum=0.0)
  shifted = dict(variables, batch_stats=jax.tree_util.tree_map(lambda s: s + 3.0,
                                                               variables["batch_stats"]))
  stats = _train_stats(reestimate, variables, x)
  stats_from_shifted = _train_stats(reestimate, shifted, x)
  num_layers = 0
  for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(stats_from_shifted)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    num_layers += 1
  assert num_layers == 2 * (1 + 9 * 2 + 2)  # mean and var of every BN layer.


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_torch_init_draws_from_pytorchs_documented_bounds(name):
  """PyTorch's Linear/Conv defaults: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
  fan_in = in_features (Linear) or in_channels * kh * kw (Conv)."""
  model = models.get_model({"name": name, "depth": 2, "width": 256}, 10)
  params = models.init_variables(model, jax.random.key(0), (28, 28, 1), "torch")["params"]
  flax_params = models.init_variables(model, jax.random.key(0), (28, 28, 1))["params"]
  for layer, leaves in params.items():
    kernel = np.asarray(leaves["kernel"])
    bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
    for values in (kernel, np.asarray(leaves["bias"])):
      assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound, layer
    if kernel.size > 5000:  # a uniform's std is bound / sqrt(3)
      assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.03), layer
    assert not np.array_equal(kernel, flax_params[layer]["kernel"])


def test_he_init_has_variance_two_over_fan_in_and_zero_bias():
  model = models.get_model({"name": "mlp", "depth": 1, "width": 512}, 10)
  params = models.init_variables(model, jax.random.key(0), (28, 28, 1), "he")["params"]
  assert np.asarray(params["fc1"]["kernel"]).std() == pytest.approx(np.sqrt(2 / 784), rel=0.02)
  assert not np.any(np.asarray(params["fc1"]["bias"]))


def test_init_scheme_keeps_norm_layers_and_rejects_what_it_cannot_do():
  params = {"conv1": {"kernel": jnp.zeros((3, 3, 3, 4))}, "norm1": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
            "block": {"conv": {"kernel": jnp.zeros((3, 3, 4, 4)), "bias": jnp.zeros(4)}}}
  redrawn = models._redraw_weights(params, "torch", jax.random.key(0))  # pylint: disable=protected-access
  chex.assert_trees_all_equal(redrawn["norm1"], params["norm1"])  # modules without a kernel keep their values
  assert np.all(np.abs(np.asarray(redrawn["block"]["conv"]["bias"])) <= 1 / np.sqrt(36))
  assert np.any(np.asarray(redrawn["block"]["conv"]["bias"]))  # a Conv's bias is drawn as PyTorch does
  model = models.get_model({"name": "mlp", "depth": 1, "width": 8}, 10)
  with pytest.raises(ConfigError, match="model.init='xavier'.*flax, torch, he"):
    models.init_variables(model, jax.random.key(0), (8, 8, 1), "xavier")
  vit = models.get_model({"name": "vit", "patch_size": 7, "depth": 1, "width": 8, "num_heads": 2, "mlp_dim": 8}, 10)
  with pytest.raises(ConfigError, match="model.init='torch'.*allows model.init='flax'"):
    models.init_variables(vit, jax.random.key(0), (28, 28, 1), "torch")
