"""Permutation symmetries of the library's models, and applying permutations to them.

Hidden units of a network can be reordered without changing its function, provided every
parameter that reads or writes those units is reordered the same way. A
`PermutationSpec` names each such group of units (a "permutation") and says, for every
parameter and BatchNorm statistic, which permutation acts on each of its axes.

Specs are not written as lists of leaf paths. Each model has one small description, derived
from the model's own attributes (depth, VGG layer list, ResNet norm, LoRA rank): which
layer (module) reads which permutation and writes which (`Layer`, for kernels
[..., in, out] and vectors [out]), and, for modules whose leaves have other layouts, the
permutation of every axis of every leaf (`Leaves`). `spec_for` expands it to leaf level
from the actual variables and checks it both ways: a leaf the description does not cover,
a described layer or leaf the variables lack, or axes of one permutation with incompatible
sizes all raise, so a renamed layer breaks loudly instead of leaving units unpermuted.

Transformers (`tna_jax.core.transformer_models`, ViT and text encoder) have:
- one permutation of the residual stream ('residual'), shared by the embedding, position
  embedding and class token, every LayerNorm, the attention and MLP input and output
  projections, the final norm and the head's input;
- per block ('Transformer/encoderblock_{i}/...'): the MLP hidden units ('mlp'); the heads
  ('heads'), acting on the head axis of query, key, value and the output projection
  together; and two permutations of the head dimension: 'qk' on query and key jointly
  (the attention logits sum q * k over it) and 'vo' on value and the output projection.
  The head-dimension permutations are shared by all heads of a block. The full symmetry
  allows a different one per head, but a per-head permutation composed with the heads
  permutation is no longer a permutation of one axis: it is a block-structured
  permutation of the flattened heads * head_dim axis, and weight matching would need a
  constrained assignment instead of one linear assignment per permutation. Heads x shared
  head-dim permutations act on separate axes, so every update stays a plain assignment.
  The description declares 'qk' and 'vo' nested in 'heads' (`Description.nested`), so
  weight matching can move a block's heads together with its head dims.
- LoRA adapters are permuted with their base kernel, not merged into it: A [fan_in, rank]
  carries the kernel's input permutations on its first axis and B [rank, fan_out] the
  output ones on its second; the rank axis is not permuted (it is a symmetry too, jointly
  in A and B, but models fine-tuned from one adapter initialization share it). So a
  permuted LoRA model computes exactly what the original did and weight matching counts
  the adapters' inner products with the kernels'. Their fan axes are flattened: an axis
  entry may be a tuple of permutations, whose units are laid out row-major on that axis
  (B of a query projection [rank, heads * head_dim] carries ('heads', 'qk')).

The Hugging Face models (`tna_jax.core.hf_models`: BERT, RoBERTa, GPT-2, ViT) have the
same permutations on their blocks `layer_{i}` (`_describe_hf`).

Symmetry-breaking variants (`tna_jax.core.asymmetric`). A W-Asymmetric network has the plain
model's parameters, so its spec is the model's: matching may still permute its units, and the
fixed entries move with them (as TNA-PFN's anchors do). The permuted model computes what it did
before, but its fixed pattern is no longer the run's: every unit's fixed set differs from every
other's, so no permutation but the identity maps the pattern onto itself, and an aligned model
averaged with model 0 mixes two patterns. A σ-Asymmetric (FiGLU) MLP has no spec at all:
reordering units would need its fixed F reordered on both axes (P^T F P), which changes F, so
no permutation is a symmetry; `_describe_mlp` refuses it, and configs refuse `align` and
`repair` with it.

Activation matching reads, for each permutation with an activation site, the outputs of
the modules that carry its units on their last axis (`Description.sites`); transformers
have sites for the residual stream (embedding and every block's output) and the MLP
hidden units (the first Dense's output). Heads and head dimensions have no such site (a
head is a group of units, and head-dim units are only comparable once heads are matched),
so activation matching solves them by weight matching, the others held fixed
(`matching.activation_matching`).

Convention: `perms[name][i]` is the index, in the original model, of the unit that
becomes unit i, so `apply_permutation` gathers `x[perm]` along every axis of `name`.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tna_jax.core import hf_models, models, transformer_models, tree_utils
from tna_jax.errors import ConfigError

PyTree = Any
Perms = Mapping[str, jax.Array]
# What acts on one axis of a leaf: a permutation, None (not permuted), or a tuple of
# permutations whose units are flattened row-major into the axis (LoRA's B).
Axis = str | tuple[str, ...] | None


class Layer(NamedTuple):
  """One module of a description: which permutation its input and output units carry.

  Kernels are [..., in, out] (Dense [in, out], Conv [kh, kw, in, out], Embed [vocab, out]):
  `p_in` acts on axis -2 and `p_out` on axis -1; vectors (bias, norm scale, BatchNorm
  statistics) carry `p_out`. None means the axis is not permuted (image channels, logits).
  """

  module: str
  p_in: str | None
  p_out: str | None

  def leaf_axes(self, leaf: str, ndim: int) -> tuple[Axis, ...]:
    """The permutation of each axis of the module's leaf `leaf` with `ndim` axes."""
    del leaf  # Every leaf of the module follows the layout rule.
    return ((None,) * ndim + (self.p_in, self.p_out))[-ndim:] if ndim else ()

  def leaf_names(self) -> tuple[str, ...]:
    """Leaves the variables must hold (a Layer only needs its module to have some)."""
    return ()


class Leaves(NamedTuple):
  """A module described leaf by leaf: for each of its leaves (by name), the permutation of
  each axis. For layouts `Layer` does not cover: attention's [width, heads, head_dim]
  projections, LoRA adapters, parameters of the model itself (module '', such as a
  position embedding). Every named leaf must exist, and the module may have no others.
  """

  module: str
  axes: tuple[tuple[str, tuple[Axis, ...]], ...]  # (leaf name, permutation of each axis)

  def leaf_axes(self, leaf: str, ndim: int) -> tuple[Axis, ...] | None:
    del ndim  # Checked by spec_for.
    return dict(self.axes).get(leaf)

  def leaf_names(self) -> tuple[str, ...]:
    return tuple(leaf for leaf, _ in self.axes)


def _axis_names(axis: Axis) -> tuple[str, ...]:
  """The permutations acting on one axis, outermost first."""
  if axis is None:
    return ()
  return (axis,) if isinstance(axis, str) else tuple(axis)


def _carried(per_axis: Sequence[Axis]) -> list[str]:
  """The permutations acting on a leaf with these axes, in axis order."""
  return [p for axis in per_axis for p in _axis_names(axis)]


def _join(module: str, leaf: str) -> str:
  return f"{module}/{leaf}" if module else leaf


class Description(NamedTuple):
  """A model's layers plus, per permutation, the modules whose outputs carry it on their
  last axis (what activation matching correlates; a permutation without sites, such as
  attention heads, has no activation to read), and the permutations whose units lie
  inside another's units (`nested`: a block's heads -> its 'qk' and 'vo' head dims)."""

  layers: tuple[Layer | Leaves, ...]
  sites: dict[str, tuple[str, ...]]
  nested: dict[str, tuple[str, ...]] = {}


class UnitAxis(NamedTuple):
  """Where a permutation acts: axis `axis` of leaf `path`, read as [outer, size, inner].

  `inner` > 1 when other permutations' units follow on the same flattened axis (LoRA's B
  [rank, heads * head_dim]: 'heads' has inner = head_dim); outer > 1 when the axis repeats
  the units (a Dense reading a flattened [H, W, C] map sees C units H * W times).
  """

  name: str
  path: str
  axis: int
  size: int  # units of the permutation
  inner: int


@dataclasses.dataclass(frozen=True)
class PermutationSpec:
  """The permutation acting on each axis of each leaf, checked against a model's variables.

  Fields are tuples so a spec is hashable and can be a static argument of jitted code.
  Leaf paths are relative to a collection ('fc1/kernel', 'norm1/mean'); params and
  batch_stats never share a leaf path.
  """

  layers: tuple[Layer | Leaves, ...]
  sites: tuple[tuple[str, tuple[str, ...]], ...]  # (permutation, modules whose outputs carry it)
  axes: tuple[tuple[str, tuple[Axis, ...]], ...]  # (leaf path, permutation per axis)
  sizes: tuple[tuple[str, int], ...]  # (permutation, number of units), in the order layers use them
  nested: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (permutation, permutations inside its units)

  @property
  def names(self) -> tuple[str, ...]:
    """The permutations, in a fixed order."""
    return tuple(name for name, _ in self.sizes)

  def size(self, name: str) -> int:
    return dict(self.sizes)[name]

  def leaf_axes(self) -> dict[str, tuple[Axis, ...]]:
    return dict(self.axes)

  def units(self) -> tuple[UnitAxis, ...]:
    """Every place a permutation acts, leaf by leaf."""
    sizes, out = dict(self.sizes), []
    for path, per_axis in self.axes:
      for axis, entry in enumerate(per_axis):
        names = _axis_names(entry)
        for k, name in enumerate(names):
          out.append(UnitAxis(name, path, axis, sizes[name], math.prod(sizes[n] for n in names[k + 1:])))
    return tuple(out)

  def axes_of(self, name: str) -> tuple[UnitAxis, ...]:
    """Every place permutation `name` acts on."""
    return tuple(unit for unit in self.units() if unit.name == name)


def chain(modules: Sequence[str]) -> Description:
  """A plain stack: each module's output units form a permutation named after it, read by
  the next module; the last module (the head) writes unpermuted logits.

  The description of any MLP or plain conv stack, e.g. for a user's model registered with
  `register(MyMLP, lambda m: chain(['Dense_0', 'Dense_1', 'Dense_2']))`."""
  layers, previous = [], None
  for module in modules[:-1]:
    layers.append(Layer(module, previous, module))
    previous = module
  layers.append(Layer(modules[-1], previous, None))
  return Description(tuple(layers), {module: (module,) for module in modules[:-1]})


def _describe_mlp(model: models.MLP) -> Description:
  if model.activation == "figlu":
    raise ConfigError("the σ-Asymmetric (FiGLU) MLP has no permutation spec: its fixed F [width, width] reads every "
                      "unit of its layer, so a reordering P of units is a symmetry only if F = P^T F P, which a "
                      "random F satisfies for P = identity alone; there is nothing for matching to move.")
  return chain([f"fc{i + 1}" for i in range(model.depth)] + ["head"])


def _describe_cnn(model: models.CNN) -> Description:
  del model  # Fixed architecture.
  return chain(["conv1", "conv2", "conv3", "fc1", "head"])


def _describe_vgg(model: models.VGG) -> Description:
  num_convs = sum(layer != "M" for layer in model.layers)
  return chain([f"conv{i + 1}" for i in range(num_convs)] + ["fc1", "fc2", "head"])


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


def _dense(module: str, p_in: tuple[str, ...], p_out: tuple[str, ...], lora: bool) -> Layer | Leaves:
  """A `transformers.LoRADense` from input axes carrying `p_in` onto output axes carrying
  `p_out`: kernel [*in, *out], bias [*out] and, with LoRA, A [fan_in, rank] and
  B [rank, fan_out], whose flattened fan axes carry the same permutations."""
  if len(p_in) == len(p_out) == 1 and not lora:
    return Layer(module, p_in[0], p_out[0])
  axes = (("kernel", p_in + p_out), ("bias", p_out))
  if lora:
    fan_in, fan_out = (p[0] if len(p) == 1 else p for p in (p_in, p_out))
    axes += (("lora_a", (fan_in, None)), ("lora_b", (None, fan_out)))
  return Leaves(module, axes)


def _describe_transformer(model: transformer_models.ViT | transformer_models.TextTransformer) -> Description:
  """One residual stream, and per block its MLP units, heads and head dimensions (see the
  module docstring)."""
  stream, lora = "residual", model.lora_rank > 0
  own = (("pos_embedding", (None, None, stream)),) + ((("cls", (None, None, stream)),) if model.pool == "tok" else ())
  layers = [Layer("embedding", None, stream), Leaves("", own)]
  sites, nested = {stream: ["embedding"]}, {}
  for i in range(model.depth):
    block = f"Transformer/encoderblock_{i}"
    attention, mlp = f"{block}/MultiHeadDotProductAttention_0", f"{block}/MlpBlock_0"
    heads, qk, vo, hidden = (f"{block}/{name}" for name in ("heads", "qk", "vo", "mlp"))
    layers += [Layer(f"{block}/LayerNorm_0", None, stream),
               _dense(f"{attention}/query", (stream,), (heads, qk), lora),
               _dense(f"{attention}/key", (stream,), (heads, qk), lora),
               _dense(f"{attention}/value", (stream,), (heads, vo), lora),
               _dense(f"{attention}/out", (heads, vo), (stream,), lora),
               Layer(f"{block}/LayerNorm_1", None, stream),
               _dense(f"{mlp}/Dense_0", (stream,), (hidden,), lora),
               _dense(f"{mlp}/Dense_1", (hidden,), (stream,), lora)]
    sites[stream].append(block)  # The residual stream after the block.
    sites[hidden] = [f"{mlp}/Dense_0"]
    nested[heads] = (qk, vo)
  layers += [Layer("Transformer/encoder_norm", None, stream), Layer("head", stream, None)]
  return Description(tuple(layers), {p: tuple(modules) for p, modules in sites.items()}, nested)


def _describe_hf(model: hf_models.BertClassifier | hf_models.GPT2 | hf_models.ViT) -> Description:
  """The Hugging Face models (`core.hf_models`): as `_describe_transformer`, one residual
  stream and per block its MLP units, heads and head dims, on the blocks `layer_{i}`.

  The stream covers every embedding (word, position, token type, ViT's patches, class
  token and position embeddings), every LayerNorm (post-LN BERT/RoBERTa normalize the
  stream itself, which commutes with a permutation of it once scale and bias are permuted
  too), GPT-2's tied token embedding (which is also its language-model head: the vocabulary
  axis is not permuted) and the input of the pooler or head. BERT's pooler and RoBERTa's
  head/dense have units of their own ('pooler', 'head/dense'), read by the classifier.
  """
  stream, lora = "residual", model.lora_rank > 0
  if isinstance(model, hf_models.ViT):
    own = Leaves("embeddings", (("cls_token", (None, None, stream)), ("position_embeddings", (None, None, stream))))
    layers = [Layer("embeddings/patch", None, stream), own]
  else:
    tables = ("word", "position") + (("token_type", "norm") if isinstance(model, hf_models.BertClassifier) else ())
    layers = [Layer(f"embeddings/{table}", None, stream) for table in tables]
  sites, nested = {stream: ["embeddings"]}, {}
  for i in range(model.num_layers):
    block = f"layer_{i}"
    heads, qk, vo, hidden = (f"{block}/{name}" for name in ("heads", "qk", "vo", "mlp"))
    layers += [Layer(f"{block}/attention_norm", None, stream),
               _dense(f"{block}/attention/query", (stream,), (heads, qk), lora),
               _dense(f"{block}/attention/key", (stream,), (heads, qk), lora),
               _dense(f"{block}/attention/value", (stream,), (heads, vo), lora),
               _dense(f"{block}/attention/output", (heads, vo), (stream,), lora),
               Layer(f"{block}/mlp_norm", None, stream),
               _dense(f"{block}/mlp/intermediate", (stream,), (hidden,), lora),
               _dense(f"{block}/mlp/output", (hidden,), (stream,), lora)]
    sites[stream].append(block)
    sites[hidden] = [f"{block}/mlp/intermediate"]
    nested[heads] = (qk, vo)
  if isinstance(model, hf_models.RobertaClassifier):
    layers += [Layer("head/dense", stream, "head/dense"), Layer("head/out_proj", "head/dense", None)]
    sites["head/dense"] = ["head/dense"]
  elif isinstance(model, hf_models.BertClassifier):
    layers += [Layer("pooler", stream, "pooler"), Layer("head", "pooler", None)]
    sites["pooler"] = ["pooler"]
  else:
    layers.append(Layer("final_norm", None, stream))
    if model.num_labels:
      layers.append(Layer("head", stream, None))
  return Description(tuple(layers), {p: tuple(modules) for p, modules in sites.items()}, nested)


_DESCRIPTIONS: dict[type, Callable[[Any], Description]] = {
    models.MLP: _describe_mlp,
    models.CNN: _describe_cnn,
    models.VGG: _describe_vgg,
    models.ResNet20: _describe_resnet20,
    transformer_models.ViT: _describe_transformer,
    transformer_models.TextTransformer: _describe_transformer,
    hf_models.BertClassifier: _describe_hf,  # and RobertaClassifier, a subclass
    hf_models.GPT2: _describe_hf,
    hf_models.ViT: _describe_hf,
}


def register(module_class: type[nn.Module], describe_fn: Callable[[Any], Description]) -> None:
  """Makes weight and activation matching (and `spec_for`) work on a user's flax module.

  `describe_fn(model)` returns the model's `Description`: its layers (`Layer` for
  Dense/Conv/norm-like modules whose kernels are [..., in, out], `Leaves` for anything else)
  and, per permutation, the modules whose outputs carry it. `chain` describes plain stacks.
  `spec_for` checks the description against the model's variables, so a wrong one fails
  loudly instead of permuting the wrong axes. A class registered here takes precedence over
  the built-in descriptions of its base classes.
  """
  _DESCRIPTIONS[module_class] = describe_fn


def describe(model: nn.Module) -> Description:
  """The model's description (layers and activation sites)."""
  if type(model) in _DESCRIPTIONS:
    return _DESCRIPTIONS[type(model)](model)
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
  entry_of = {entry.module: entry for entry in description.layers}
  order = dict.fromkeys(p for entry in description.layers for p in _entry_names(entry))
  axes, sizes, flattened, seen, undescribed = [], {}, [], set(), []
  for collection in sorted(variables):
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables[collection]):
      path = tree_utils.path_str(path)
      module, leaf_name = path.rsplit("/", 1) if "/" in path else ("", path)
      shape = tuple(np.shape(leaf))
      per_axis = entry_of[module].leaf_axes(leaf_name, len(shape)) if module in entry_of else None
      if per_axis is None:
        undescribed.append(f"{collection}/{path}")
        continue
      seen.update((module, path))
      if len(per_axis) != len(shape):
        raise ValueError(f"leaf {collection}/{path} has shape {shape} but its description names {len(per_axis)} "
                         f"axes: {per_axis}.")
      named = _carried(per_axis)
      if len(named) != len(set(named)):
        raise ValueError(f"leaf {collection}/{path} would carry one permutation on two axes: {per_axis}.")
      for entry, dim in zip(per_axis, shape):
        if isinstance(entry, str):
          sizes.setdefault(entry, []).append((dim, path))
        elif entry is not None:
          flattened.append((_axis_names(entry), dim, path))
      axes.append((path, per_axis))
  missing = sorted({entry.module for entry in description.layers} - seen
                   | {_join(e.module, leaf) for e in description.layers for leaf in e.leaf_names()} - seen)
  if undescribed or missing:
    raise ValueError(f"permutation spec of {type(model).__name__} does not match its variables: "
                     f"leaves no layer describes: {undescribed or 'none'}; described layers without "
                     f"variables: {missing or 'none'}. Update its description in tna_jax/alignment/permutations.py.")
  sizes = {p: _perm_size(p, dims) for p, dims in sizes.items()}
  for names, dim, path in flattened:
    if any(p not in sizes for p in names) or math.prod(sizes[p] for p in names) != dim:
      raise ValueError(f"axis of {path} ({dim} entries) is not the flattened units of {names} "
                       f"(sizes {[sizes.get(p) for p in names]}); each must also act alone on some axis.")
  for outer, inners in description.nested.items():
    for path, per_axis in axes:
      carried = sorted(set(inners) & set(_carried(per_axis)))
      if carried and (len(carried) > 1 or outer not in _carried(per_axis)):
        raise ValueError(f"leaf {path} carries {carried}, nested in {outer!r}: it must carry {outer!r} and "
                         f"one of them at most.")
  return PermutationSpec(layers=description.layers, sites=tuple(description.sites.items()), axes=tuple(axes),
                         sizes=tuple((p, sizes[p]) for p in order if p in sizes),
                         nested=tuple((p, tuple(inners)) for p, inners in description.nested.items()))


def _entry_names(entry: Layer | Leaves) -> tuple[str, ...]:
  """The permutations a description entry uses, in order."""
  if isinstance(entry, Layer):
    return tuple(p for p in (entry.p_in, entry.p_out) if p)
  return tuple(p for _, per_axis in entry.axes for p in _carried(per_axis))


def _perm_size(name: str, dims: list[tuple[int, str]]) -> int:
  """Units of a permutation: its smallest axis; other axes must hold whole copies of it
  (a Dense reading a flattened [H, W, C] feature map sees C units H * W times)."""
  size = min(dim for dim, _ in dims)
  bad = [f"{path} ({dim})" for dim, path in dims if dim % size]
  if bad:
    raise ValueError(f"permutation {name!r} has {size} units but these axes are not multiples of it: {bad}.")
  return size


def split_units(x: jax.Array, axis: int, size: int, inner: int = 1) -> jax.Array:
  """`x` with `axis` split as [k, size, inner], units in the middle (see `UnitAxis`).

  k > 1: a flattened [..., size] feature map read by a Dense layer (flax's NHWC flatten
  puts the channels, the units, innermost); inner > 1: other units follow on the axis.
  """
  shape = x.shape
  return x.reshape(shape[:axis] + (shape[axis] // (size * inner), size, inner) + shape[axis + 1:])


def take_units(x: jax.Array, perm: jax.Array, axis: int, inner: int = 1) -> jax.Array:
  """Reorders the units of `axis` by `perm` (new unit i = old unit perm[i])."""
  split = split_units(x, axis, perm.shape[0], inner)
  return jnp.take(split, perm, axis=axis + 1, mode="clip", unique_indices=True).reshape(x.shape)


def unit_products(a: jax.Array, b: jax.Array, axis: int, size: int, inner: int = 1) -> jax.Array:
  """[size, size] inner products of a's units (rows) with b's units (columns) on `axis`."""
  unit = UnitAxis("", "", axis, size, inner)
  return units_first(a, [unit]) @ units_first(b, [unit]).T


def units_first(x: jax.Array, units: Sequence[UnitAxis]) -> jax.Array:
  """`x` (one leaf) as [units[0].size, units[1].size, ..., rest]: the units of each of
  `units` (places on this leaf, several may share a flattened axis) as leading axes in that
  order, every other entry flattened into the last axis."""
  shape, where = [], {}
  for axis, dim in enumerate(x.shape):
    span = dim
    for unit in sorted((u for u in units if u.axis == axis), key=lambda u: -u.inner):  # outermost first
      shape.append(span // (unit.size * unit.inner))
      where[unit] = len(shape)
      shape.append(unit.size)
      span = unit.inner
    shape.append(span)
  lead = [where[unit] for unit in units]
  moved = jnp.moveaxis(x.reshape(shape), lead, list(range(len(lead))))
  return moved.reshape(tuple(unit.size for unit in units) + (-1,))


def apply_permutation(spec: PermutationSpec, tree: PyTree, perms: Perms) -> PyTree:
  """Permutes one collection (params or batch_stats) of a model described by `spec`."""
  leaf_axes, units = spec.leaf_axes(), {}
  for unit in spec.units():
    units.setdefault(unit.path, []).append(unit)

  def permute(path: str, leaf: jax.Array) -> jax.Array:
    if path not in leaf_axes:
      raise ValueError(f"leaf {path!r} is not in the permutation spec; build the spec from these variables.")
    for unit in units.get(path, ()):
      leaf = take_units(leaf, perms[unit.name], unit.axis, unit.inner)
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
