"""Flax linen models of the TNA-PFN experiments, looked up by name.

Every model maps float32 NHWC images to logits via `__call__(x, train)` and names each
layer explicitly, so parameter paths are stable (`block2_1/conv_a/kernel`) and permutation
specs, masks and fusion code can refer to them. Numbering is 1-based; the classifier is
always `head`, which lets fusion code tell a model's body from its task head.
"""

import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tna_jax.core import transformer_models, tree_utils
from tna_jax.errors import ConfigError, check_choice

NORMS = ("batchnorm", "layernorm", "none")

# Standard VGG configurations: output channels of 3x3 convs, 'M' = 2x2 max pool.
VGG_LAYERS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512,
              512, "M"),
}


ACTIVATIONS = ("relu", "figlu")  # MLP.activation; figlu: the σ-Asymmetric network (tna_jax.core.asymmetric)


class FiGLU(nn.Module):
  """FiGLU (Lim et al., NeurIPS 2024): sigmoid(x F) * x with a square random F that never trains.

  F is a parameter ('gate' [width, width]) drawn scale * N(0, 1); the authors' code draws N(0, 1)
  (`torch.randn`, scale 1). It stays fixed because the σ-Asymmetric variant's mask holds it (`asymmetric.figlu_mask`).
  Each unit's gate reads every unit of the layer through F, so reordering units is no longer
  a symmetry unless F is reordered on both axes.
  """

  scale: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gate = self.param("gate", nn.initializers.normal(self.scale), (x.shape[-1], x.shape[-1]))
    return nn.sigmoid(x @ gate) * x


class MLP(nn.Module):
  """Flatten, `depth` x (Dense(width) + activation), Dense head. Layers: fc1..fc{depth}, head,
  and with activation 'figlu' one FiGLU per hidden layer (figlu1..figlu{depth}).

  Flax derives each submodule's init key from its name, so fc*/head start from the same
  values with either activation (the σ-Asymmetric variant shares the others' initialization).
  """
  num_classes: int
  depth: int = 2
  width: int = 200
  activation: str = "relu"
  figlu_scale: float = 1.0  # activation 'figlu': F ~ figlu_scale * N(0, 1)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train  # No layer behaves differently in training.
    check_choice("MLP.activation", self.activation, ACTIVATIONS)
    x = x.reshape((x.shape[0], -1))
    for i in range(self.depth):
      x = nn.Dense(self.width, name=f"fc{i + 1}")(x)
      x = FiGLU(self.figlu_scale, name=f"figlu{i + 1}")(x) if self.activation == "figlu" else nn.relu(x)
    return nn.Dense(self.num_classes, name="head")(x)


def scaled(width_multiplier: float, width: int) -> int:
  """A hidden width times the model's `width_multiplier`, at least 1 unit."""
  return max(1, round(width * width_multiplier))


class CNN(nn.Module):
  """The paper's small CNN: conv32-pool-conv64-pool-conv64-fc64-head.

  Convs use 'VALID' padding as in the original, which still leaves 3x3 (28x28 inputs) or
  4x4 (32x32 inputs) feature maps. Layers: conv1..conv3, fc1, head. `width_multiplier`
  scales every hidden width (at least 1 unit), for width sweeps; 1 is the paper's CNN.
  """
  num_classes: int
  width_multiplier: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train  # No layer behaves differently in training.
    for i, features in enumerate((32, 64, 64)):
      if i > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = nn.relu(nn.Conv(scaled(self.width_multiplier, features), (3, 3), padding="VALID", name=f"conv{i + 1}")(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(scaled(self.width_multiplier, 64), name="fc1")(x))
    return nn.Dense(self.num_classes, name="head")(x)


def _norm_factory(norm: str, bn_momentum: float, train: bool) -> Callable[..., Callable]:
  """`factory(name=...)` builds the layer that follows a conv.

  For 'none' it builds no module at all, so the model has no norm parameters to mask or
  permute.
  """
  if norm == "batchnorm":
    return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=bn_momentum)
  if norm == "layernorm":
    return nn.LayerNorm  # Over channels only, as git-re-basin's LayerNorm ResNet20.
  return lambda name: lambda x: x


class BasicBlock(nn.Module):
  """Two 3x3 conv-norm layers plus a shortcut.

  The shortcut is a 1x1 conv + norm (`shortcut_conv`, `shortcut_norm`) whenever stride or
  width changes and the identity otherwise, so the block's output units share one
  permutation with either its input or its shortcut conv.
  """
  features: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., Callable]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.features, (3, 3), strides=self.strides, name="conv_a")(x)
    y = nn.relu(self.norm(name="norm_a")(y))
    y = self.conv(self.features, (3, 3), name="conv_b")(y)
    y = self.norm(name="norm_b")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = self.conv(self.features, (1, 1), strides=self.strides, padding=0,
                    name="shortcut_conv")(x)
      x = self.norm(name="shortcut_norm")(x)
    return nn.relu(x + y)


class ResNet20(nn.Module):
  """CIFAR ResNet20: conv stem, 3 stages x 3 BasicBlocks, global average pool, Dense head.

  Stage widths are 16, 32, 64 times `width_multiplier`; stages 2 and 3 halve the spatial
  size in their first block. Layers: conv1, norm1, block{stage}_{block} (1-based), head.
  Convs carry a bias only when no norm follows them.
  """
  num_classes: int
  width_multiplier: float = 1.0
  norm: str = "batchnorm"
  bn_momentum: float = 0.9

  def __post_init__(self):
    check_choice("model.norm", self.norm, NORMS)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # Symmetric padding of 1 (not 'SAME') matches the PyTorch reference for stride 2.
    conv = functools.partial(nn.Conv, padding=1, use_bias=self.norm == "none")
    norm = _norm_factory(self.norm, self.bn_momentum, train)
    width = max(1, round(16 * self.width_multiplier))
    x = nn.relu(norm(name="norm1")(conv(width, (3, 3), name="conv1")(x)))
    for stage in range(3):
      for block in range(3):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features=width * 2**stage, strides=strides, conv=conv, norm=norm,
                       name=f"block{stage + 1}_{block + 1}")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


class VGG(nn.Module):
  """VGG without BN: conv3x3+relu stacks, then Dense(512)-relu x 2 and a Dense head.

  `width_multiplier` scales every hidden width (convs and the two Dense(512)), at least 1
  unit each. Pools use 'SAME' padding so 28x28 inputs survive five of them (28->...->1).
  Layers: conv1..conv{n} (convs counted alone), fc1, fc2, head.
  """
  num_classes: int
  layers: tuple[int | str, ...]  # E.g. VGG_LAYERS['vgg16'].
  width_multiplier: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train  # No layer behaves differently in training.
    num_convs = 0
    for layer in self.layers:
      if layer == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
      else:
        num_convs += 1
        x = nn.relu(nn.Conv(scaled(self.width_multiplier, layer), (3, 3), padding=1, name=f"conv{num_convs}")(x))
    x = x.reshape((x.shape[0], -1))
    for i in range(2):
      x = nn.relu(nn.Dense(scaled(self.width_multiplier, 512), name=f"fc{i + 1}")(x))
    return nn.Dense(self.num_classes, name="head")(x)


# name -> (class, config knobs it reads, fixed attributes). Knobs missing from the config
# keep the class defaults, so each default is written once, on the class.
_REGISTRY: dict[str, tuple[type[nn.Module], tuple[str, ...], dict[str, Any]]] = {
    "mlp": (MLP, ("depth", "width"), {}),
    "cnn": (CNN, ("width_multiplier",), {}),
    "resnet20": (ResNet20, ("width_multiplier", "norm"), {}),
    **{name: (VGG, ("width_multiplier",), {"layers": layers})
       for name, layers in VGG_LAYERS.items()},
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
# The model.* config keys each model reads, transformers included (config.schema: which keys apply to a model).
KNOBS: dict[str, tuple[str, ...]] = {**{name: knobs for name, (_, knobs, _) in _REGISTRY.items()},
                                     **transformer_models.KNOBS}


def get_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """Builds the model named `model_config.name` from the knobs it sets.

  Only `.get` is used, so a plain dict works too. Unknown names and norms raise ConfigError.
  """
  name = model_config.get("name")
  if name in transformer_models.MODEL_NAMES:  # vit, text_transformer: their own registry
    return transformer_models.get_model(model_config, num_classes)
  check_choice("model.name", name, MODEL_NAMES)
  cls, knobs, fixed = _REGISTRY[name]
  kwargs = {k: model_config.get(k) for k in knobs if model_config.get(k) is not None}
  return cls(num_classes=num_classes, **fixed, **kwargs)


def init_variables(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...], scheme: str = "flax") -> dict:
  """Variables for inputs of shape `input_shape` (no batch axis), as a plain mutable dict.

  `scheme` (config `model.init`) picks the distribution of Dense and Conv weights, which sets
  how large the vanilla barrier is: 'flax' (Flax's defaults: LeCun-normal kernels, zero
  biases), 'torch' (PyTorch's defaults for Linear/Conv, which the paper's authors trained
  with) or 'he' (He-normal kernels, zero biases). Norm layers start at scale 1, bias 0 in all.
  """
  check_choice("model.init", scheme, INIT_SCHEMES)
  if scheme != "flax" and model.__class__.__name__ not in INIT_MODELS:
    raise ConfigError(f"model.init={scheme!r} is defined for {', '.join(sorted(INIT_MODELS))} only; "
                      f"{model.__class__.__name__} allows model.init='flax'.")
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  variables = flax.core.unfreeze(model.init(key, x, train=False))
  if scheme != "flax":
    variables["params"] = _redraw_weights(variables["params"], scheme, key)
  return variables


INIT_SCHEMES = ("flax", "torch", "he")
INIT_MODELS = frozenset(cls.__name__ for cls, _, _ in _REGISTRY.values())  # layers are Dense/Conv/norms only


def _redraw_weights(params: dict, scheme: str, key: jax.Array) -> dict:
  """Dense/Conv kernels and their biases drawn anew by `scheme`, each leaf from its path's key.

  A kernel's fan-in is the product of all its axes but the last (in_features for Dense,
  kh * kw * in_channels for Conv, as PyTorch counts it). torch: kernel and bias
  ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5), and Linear/Conv's bias
  init); he: kernel ~ N(0, 2/fan_in), bias 0. Norm scales and biases (modules without a
  kernel) are left as drawn.
  """

  def redraw(module_path: str, module: dict) -> dict:
    if "kernel" not in module:
      return module
    kernel = module["kernel"]
    fan_in = math.prod(kernel.shape[:-1])
    if scheme == "torch":
      bound = 1.0 / math.sqrt(fan_in)
      draw = lambda name, shape: jax.random.uniform(tree_utils.path_key(key, f"{module_path}/{name}"), shape,
                                                    kernel.dtype, -bound, bound)
      return {**module, **{name: draw(name, module[name].shape) for name in ("kernel", "bias") if name in module}}
    std = math.sqrt(2.0 / fan_in)
    he = std * jax.random.normal(tree_utils.path_key(key, f"{module_path}/kernel"), kernel.shape, kernel.dtype)
    return {**module, "kernel": he, **({"bias": jnp.zeros_like(module["bias"])} if "bias" in module else {})}

  def walk(tree: dict, prefix: str) -> dict:
    out = {}
    for name, value in tree.items():
      path = f"{prefix}/{name}" if prefix else name
      out[name] = redraw(path, walk(value, path)) if isinstance(value, dict) else value
    return out

  return walk(params, "")
