"""Permutation symmetries of the library's models, and applying permutations to them.

Hidden units of a network can be reordered without changing its function, provided every
parameter that reads or writes those units is reordered the same way. A
`PermutationSpec` names each such group of units (a "permutation") and says, for every
parameter and BatchNorm statistic, which permutation acts on each of its axes.

Specs are not written as lists of leaf paths. Each model has one small description: which
layer (module) reads which permutation and writes which (`Layer`), derived from the
model's own attributes (depth, VGG layer list, ResNet norm). `spec_for` expands it to leaf
level from the actual variables and checks it both ways: a leaf no layer describes, a
described layer the variables lack, or axes of one permutation with incompatible sizes
all raise, so a renamed layer breaks loudly instead of leaving units unpermuted.

Convention: `perms[name][i]` is the index, in the original model, of the unit that
becomes unit i, so `apply_permutation` gathers `x[perm]` along every axis of `name`.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import models, tree_utils
from tna_jax.errors import ConfigError

PyTree = Any
Perms = Mapping[str, jax.Array]


class Layer(NamedTuple):
  """One module of a description: which permutation its input and output units carry.

  Kernels are [..., in, out] (Dense [in, out], Conv [kh, kw, in, out]): `p_in` acts on
  axis -2 and `p_out` on axis -1; vectors (bias, norm scale, BatchNorm statistics) carry
  `p_out`. None means the axis is not permuted (image channels, logits).
  """

  module: str
  p_in: str | None
  p_out: str | None


class Description(NamedTuple):
  """A model's layers plus, per permutation, the modules whose outputs carry it on their
  last axis (what activation matching correlates)."""

  layers: tuple[Layer, ...]
  sites: dict[str, tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class PermutationSpec:
  """The permutation acting on each axis of each leaf, checked against a model's variables.

  Fields are tuples so a spec is hashable and can be a static argument of jitted code.
  Leaf paths are relative to a collection ('fc1/kernel', 'norm1/mean'); params and
  batch_stats never share a leaf path.
  """

  layers: tuple[Layer, ...]
  sites: tuple[tuple[str, tuple[str, ...]], ...]  # (permutation, modules whose outputs carry it)
  axes: tuple[tuple[str, tuple[str | None, ...]], ...]  # (leaf path, permutation per axis)
  sizes: tuple[tuple[str, int], ...]  # (permutation, number of units), in the order layers use them

  @property
  def names(self) -> tuple[str, ...]:
    """The permutations, in a fixed order."""
    return tuple(name for name, _ in self.sizes)

  def size(self, name: str) -> int:
    return dict(self.sizes)[name]

  def leaf_axes(self) -> dict[str, tuple[str | None, ...]]:
    return dict(self.axes)

  def axes_of(self, name: str) -> tuple[tuple[str, int], ...]:
    """Every (leaf path, axis) that permutation `name` acts on."""
    return tuple((path, axis) for path, per_axis in self.axes for axis, p in enumerate(per_axis) if p == name)


def _chain(modules: Sequence[str]) -> Description:
  """A plain stack: each module's output units form a permutation named after it, read by
  the next module; the last module (the head) writes unpermuted logits."""
  layers, previous = [], None
  for module in modules[:-1]:
    layers.append(Layer(module, previous, module))
    previous = module
  layers.append(Layer(modules[-1], previous, None))
  return Description(tuple(layers), {module: (module,) for module in modules[:-1]})


def _describe_mlp(model: models.MLP) -> Description:
  return _chain([f"fc{i + 1}" for i in range(model.depth)] + ["head"])


def _describe_cnn(model: models.CNN) -> Description:
  del model  # Fixed architecture.
  return _chain(["conv1", "conv2", "conv3", "fc1", "head"])


def _describe_vgg(model: models.VGG) -> Description:
  num_convs = sum(layer != "M" for layer in model.layers)
  return _chain([f"conv{i + 1}" for i in range(num_convs)] + ["fc1", "fc2", "head"])


def _describe_resnet20(model: models.ResNet20) -> Description:
  """Residual streams 'stage1'..'stage3' (one per width, shared by every block's output,
  the stem and the shortcut conv that opens a stage) and one inner permutation per block
  ('block2_1/conv_a', between its two convs)."""
  has_norm = model.norm != "none"
  layers, sites = [], {}

  def conv_norm(conv: str, norm: str, p_in: str | None, p_out: str) -> str:
    """Adds a conv and the norm after it; returns the module whose output is the unit."""
    layers.append(Layer(conv, p_in, p_out))
    if has_norm:
      layers.append(Layer(norm, None, p_out))
    return norm if has_norm else conv

  stream = "stage1"
  sites[stream] = [conv_norm("conv1", "norm1", None, stream)]
  for stage in range(1, 4):
    for block in range(1, 4):
      name = f"block{stage}_{block}"
      inner = f"{name}/conv_a"
      sites[inner] = [conv_norm(inner, f"{name}/norm_a", stream, inner)]
      out = stream
      if stage > 1 and block == 1:  # Width doubles: a shortcut conv opens a new stream.
        out = f"stage{stage}"
        conv_norm(f"{name}/shortcut_conv", f"{name}/shortcut_norm", stream, out)
      conv_norm(f"{name}/conv_b", f"{name}/norm_b", inner, out)
      sites.setdefault(out, []).append(name)  # The block's output, after the residual sum.
      stream = out
  layers.append(Layer("head", stream, None))
  return Description(tuple(layers), {p: tuple(modules) for p, modules in sites.items()})


_DESCRIPTIONS: dict[type, Callable[[Any], Description]] = {
    models.MLP: _describe_mlp,
    models.CNN: _describe_cnn,
    models.VGG: _describe_vgg,
    models.ResNet20: _describe_resnet20,
}


def describe(model: nn.Module) -> Description:
  """The model's description (layers and activation sites)."""
  for cls, fn in _DESCRIPTIONS.items():
    if isinstance(model, cls):
      return fn(model)
  raise ConfigError(f"no permutation spec for model {type(model).__name__}; allowed: "
                    f"{', '.join(c.__name__ for c in _DESCRIPTIONS)}.")


def spec_for(model: nn.Module, variables: Mapping[str, PyTree]) -> PermutationSpec:
  """The model's description expanded to every leaf of `variables` and checked against it.

  Args:
    model: one of the library's models.
    variables: its variables ({'params', maybe 'batch_stats'}) or shape structs of them.

  Raises:
    ValueError: the description and the variables disagree (a renamed or added layer).
  """
  description = describe(model)
  layer_of = {layer.module: layer for layer in description.layers}
  order = dict.fromkeys(p for layer in description.layers for p in (layer.p_in, layer.p_out) if p)
  axes, sizes, seen, undescribed = [], {}, set(), []
  for collection in sorted(variables):
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables[collection]):
      path = tree_utils.path_str(path)
      module = path.rsplit("/", 1)[0] if "/" in path else ""
      if module not in layer_of:
        undescribed.append(f"{collection}/{path}")
        continue
      seen.add(module)
      layer = layer_of[module]
      shape = tuple(np.shape(leaf))
      per_axis = ((None,) * (len(shape) - 2) + (layer.p_in, layer.p_out))[-len(shape):] if shape else ()
      named = [p for p in per_axis if p is not None]
      if len(named) != len(set(named)):
        raise ValueError(f"leaf {collection}/{path} would carry one permutation on two axes: {per_axis}.")
      for p, dim in zip(per_axis, shape):
        if p is not None:
          sizes.setdefault(p, []).append((dim, path))
      axes.append((path, per_axis))
  missing = sorted(set(layer_of) - seen)
  if undescribed or missing:
    raise ValueError(f"permutation spec of {type(model).__name__} does not match its variables: "
                     f"leaves no layer describes: {undescribed or 'none'}; described layers without "
                     f"variables: {missing or 'none'}. Update its description in tna_jax/permutations.py.")
  return PermutationSpec(layers=description.layers, sites=tuple(description.sites.items()), axes=tuple(axes),
                         sizes=tuple((p, _perm_size(p, sizes[p])) for p in order if p in sizes))


def _perm_size(name: str, dims: list[tuple[int, str]]) -> int:
  """Units of a permutation: its smallest axis; other axes must hold whole copies of it
  (a Dense reading a flattened [H, W, C] feature map sees C units H * W times)."""
  size = min(dim for dim, _ in dims)
  bad = [f"{path} ({dim})" for dim, path in dims if dim % size]
  if bad:
    raise ValueError(f"permutation {name!r} has {size} units but these axes are not multiples of it: {bad}.")
  return size


def split_units(x: jax.Array, axis: int, size: int) -> jax.Array:
  """`x` with `axis` split as [k, size], units innermost (k = 1 for a plain unit axis).

  An axis of k * size entries is a flattened [..., size] feature map read by a Dense
  layer; flax's NHWC flatten puts the channels (the units) innermost.
  """
  shape = x.shape
  return x.reshape(shape[:axis] + (shape[axis] // size, size) + shape[axis + 1:])


def take_units(x: jax.Array, perm: jax.Array, axis: int) -> jax.Array:
  """Reorders the units of `axis` by `perm` (new unit i = old unit perm[i])."""
  split = split_units(x, axis, perm.shape[0])
  return jnp.take(split, perm, axis=axis + 1, mode="clip", unique_indices=True).reshape(x.shape)


def unit_products(a: jax.Array, b: jax.Array, axis: int, size: int) -> jax.Array:
  """[size, size] inner products of a's units (rows) with b's units (columns) on `axis`."""
  a, b = split_units(a, axis, size), split_units(b, axis, size)
  others = [i for i in range(a.ndim) if i != axis + 1]
  return jnp.tensordot(a, b, (others, others))


def apply_permutation(spec: PermutationSpec, tree: PyTree, perms: Perms) -> PyTree:
  """Permutes one collection (params or batch_stats) of a model described by `spec`."""
  leaf_axes = spec.leaf_axes()

  def permute(path: str, leaf: jax.Array) -> jax.Array:
    if path not in leaf_axes:
      raise ValueError(f"leaf {path!r} is not in the permutation spec; build the spec from these variables.")
    for axis, name in enumerate(leaf_axes[path]):
      if name is not None:
        leaf = take_units(leaf, perms[name], axis)
    return leaf

  return tree_utils.map_with_path_str(permute, tree)


def permute_variables(spec: PermutationSpec, variables: Mapping[str, PyTree], perms: Perms) -> dict:
  """Permutes every collection of `variables` ({'params', maybe 'batch_stats'})."""
  return {collection: apply_permutation(spec, tree, perms) for collection, tree in variables.items()}


def identity(spec: PermutationSpec) -> dict[str, jax.Array]:
  return {name: jnp.arange(size) for name, size in spec.sizes}


def random_permutations(spec: PermutationSpec, key: jax.Array) -> dict[str, jax.Array]:
  """Independent uniform permutations, each keyed by its name (reproducible in any order)."""
  return {name: jax.random.permutation(tree_utils.path_key(key, name), size) for name, size in spec.sizes}


def inverse(perms: Perms) -> dict[str, jax.Array]:
  """The permutations that undo `perms`."""
  return {name: jnp.argsort(perm) for name, perm in perms.items()}


def module_outputs(model: nn.Module, variables: Mapping[str, PyTree], x: jax.Array, modules: Sequence[str],
                   edit: Callable[[str, jax.Array], jax.Array] | None = None) -> tuple[jax.Array, dict]:
  """Logits of `model` in inference mode plus the outputs of `modules` (paths like
  'block1_1/norm_a'); `edit(module, output)`, if given, replaces each such output before
  the rest of the network sees it. Jittable: the outputs are traced values of this call."""
  wanted, outputs = set(modules), {}

  def intercept(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = "/".join(context.module.path)
    if context.method_name == "__call__" and path in wanted:
      outputs[path] = out
      if edit is not None:
        out = edit(path, out)
    return out

  with nn.intercept_methods(intercept):
    logits = model.apply(variables, x, train=False)
  absent = wanted - set(outputs)
  if absent:
    raise ValueError(f"modules {sorted(absent)} never ran in {type(model).__name__}.")
  return logits, outputs
