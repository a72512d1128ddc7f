"""TNA-PFN masks: which parameter entries stay fixed at their initial values.

A mask is a pytree of booleans shaped like the params, True where the entry is held fixed.
Every model that will be fused is trained with the same mask and the same initialization,
so the fixed entries act as anchors that keep the models in one permutation subspace.

The mask reaches the optimizer as an argument of each update (`freeze`), never as a
constant compiled into the step, so one compiled program serves any mask: vanilla (all
False), TNA-PFN, its reverse (FedPNU) or many masks vmapped side by side.

Every mask of the library is made here: the one a config's `mask` section describes
(`from_config`, or `MaskSpec` where it is redrawn, as federated rounds do) and the entries
that partial fine-tuning leaves frozen (`frozen_except`).
"""

import dataclasses
import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tna_jax.core import asymmetric, tree_utils
from tna_jax.errors import ConfigError, check_choice

PyTree = Any
GRANULARITIES = ("weight", "neuron")
SELECTIONS = ("random", "magnitude_small", "magnitude_large")  # which eligible entries are fixed (`select`)
REDRAWS = ("never", "every_round")  # MaskSpec.redraw: one mask for the whole run, or a new one each federated round
# `include` names for the authors' layer-wise masks: every layer, the input layer, the hidden ones, the output layer.
LAYER_PRESETS = ("all", "first", "middle", "last")
FIRST_LAYERS = ("conv1", "fc1", "embedding")  # the module reading the input, in the library's models
LAST_LAYER = "head"


def fixed_mask(
    params: PyTree,
    fixed_fraction: float,
    *,
    seed: int,
    granularity: str = "weight",
    include: str = "",
    exclude: str = "",
    select: str = "random",
) -> PyTree:
  """Draws the mask of entries held fixed (True) at their initial values.

  Args:
    params: the parameter pytree the mask is for (only shapes and paths are used).
    fixed_fraction: probability that an eligible entry (or neuron) is fixed, in [0, 1).
      The paper's "mask ratio", 0.4 by default there.
    seed: the mask seed; each leaf's key is derived from it and the leaf's path, so the
      same config gives the same mask in any process, whatever the leaf order.
    granularity: 'weight' fixes single entries (the paper); 'neuron' fixes whole output
      units: every parameter of a module indexed by the unit on its last axis (kernel
      columns, bias, norm scale) shares one draw per unit.
    include: regex; when set, only leaves whose path ('fc1/kernel') matches it are
      eligible. A name of `LAYER_PRESETS` selects layers instead (`layer_regex`).
    exclude: regex; leaves whose path matches it are never fixed.
    select: 'random' draws each entry with probability `fixed_fraction`; 'magnitude_small'
      / 'magnitude_large' fix exactly round(fixed_fraction * n) entries of each eligible
      leaf, those of smallest / largest |w| in `params` (the base's pretrained values;
      `magnitude_mask`). Magnitude rules are per entry: granularity must be 'weight'.

  Returns:
    A pytree of bool arrays with the structure and shapes of `params`.
  """
  if not 0.0 <= fixed_fraction < 1.0:
    raise ConfigError(f"mask fixed_fraction={fixed_fraction!r} is out of range; allowed: 0 <= fixed_fraction < 1.")
  check_choice("mask.granularity", granularity, GRANULARITIES)
  check_choice("mask.select", select, SELECTIONS)
  if select != "random" and granularity != "weight":
    raise ConfigError(f"mask.select={select!r} ranks single entries by |w|; it needs mask.granularity='weight', "
                      f"not {granularity!r}.")
  root = jax.random.key(seed)

  def leaf_mask(path: str, leaf: jax.Array, is_eligible: bool) -> jax.Array:
    if not is_eligible or fixed_fraction == 0.0:
      return jnp.zeros(leaf.shape, bool)
    if select != "random":
      return magnitude_mask(leaf, fixed_fraction, tree_utils.path_key(root, path), largest=select == "magnitude_large")
    if granularity == "neuron" and leaf.ndim >= 1:
      module_path = path.rsplit("/", 1)[0]
      per_unit = jax.random.bernoulli(tree_utils.path_key(root, module_path), fixed_fraction, leaf.shape[-1:])
      return jnp.broadcast_to(per_unit, leaf.shape)
    return jax.random.bernoulli(tree_utils.path_key(root, path), fixed_fraction, leaf.shape)

  return tree_utils.map_with_path_str(leaf_mask, params, eligible(params, include, exclude))


def eligible(params: PyTree, include: str = "", exclude: str = "") -> PyTree:
  """Per leaf of `params`, whether a mask may fix its entries (a Python bool per leaf): its path
  matches `include` (a regex or a `LAYER_PRESETS` name; '' = every leaf) and not `exclude`."""
  include_re = _compile(layer_regex(include, params), "mask.include")
  exclude_re = _compile(exclude, "mask.exclude")
  selected = lambda path: (include_re is None or include_re.search(path)) and not (exclude_re and exclude_re.search(path))
  return tree_utils.map_with_path_str(lambda path, _: bool(selected(path)), params)


def magnitude_mask(weights: jax.Array, fixed_fraction: float, key: jax.Array, largest: bool = False) -> jax.Array:
  """Fixes exactly k = round(fixed_fraction * n) of the n entries of `weights`: those of
  smallest |w| (or largest, with `largest`), ties broken by a random order drawn from `key`.

  The rule reads only the values, so every model and contributor fine-tuned from the same
  base gets the same mask; the seeded tie-break makes it total even where many entries are
  equal (LoRA's `lora_b` starts at zero).
  """
  return _magnitude_mask(jnp.asarray(weights), key, int(round(fixed_fraction * weights.size)), largest)


@functools.partial(jax.jit, static_argnames=("k", "largest"))
def _magnitude_mask(weights: jax.Array, key: jax.Array, k: int, largest: bool) -> jax.Array:
  """`magnitude_mask` as one compiled program per leaf shape (eagerly, each op would compile on its own)."""
  n = weights.size
  magnitude = jnp.abs(weights.astype(jnp.float32).reshape(-1))
  tie_break = jax.random.permutation(key, n)
  order = jnp.lexsort((tie_break, -magnitude if largest else magnitude))  # the last key sorts first
  return jnp.zeros(n, bool).at[order[:k]].set(True).reshape(weights.shape)


def layer_regex(include: str, params: PyTree) -> str:
  """`include` as a regex on parameter paths: a `LAYER_PRESETS` name resolved against the
  top-level modules of `params`, any other value unchanged.

  'first' is the module that reads the input (`FIRST_LAYERS`), 'last' the classifier
  (`LAST_LAYER`), 'middle' every other module (hidden layers, residual blocks, norms) and
  'all' everything, so one preset name means the same layers of an MLP, a CNN or a ResNet.
  """
  if include not in LAYER_PRESETS:
    return include
  names = list(params)
  first = [n for n in FIRST_LAYERS if n in names][:1]
  if not first or LAST_LAYER not in names:
    raise ConfigError(f"mask.include={include!r} names a layer preset, but this model's modules ({', '.join(names)}) "
                      f"have no input layer ({' or '.join(FIRST_LAYERS)}) or no {LAST_LAYER!r}; use a regex instead.")
  selected = {"all": names, "first": first, "last": [LAST_LAYER],
              "middle": [n for n in names if n not in (first[0], LAST_LAYER)]}[include]
  if not selected:
    raise ConfigError(f"mask.include={include!r}: this model has no {include} layers (its modules: "
                      f"{', '.join(names)}).")
  return "^(" + "|".join(map(re.escape, selected)) + ")/"


def _compile(pattern: str, key: str) -> re.Pattern | None:
  """The regex of config key `key`; None for '' (no pattern)."""
  if not pattern:
    return None
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"{key}={pattern!r} is not a valid regular expression: {e}.") from None


def no_mask(params: PyTree) -> PyTree:
  """The all-False mask: vanilla training through the same compiled program."""
  return jax.tree.map(lambda p: jnp.zeros(p.shape, bool), params)


def reverse(mask: PyTree) -> PyTree:
  """Swaps fixed and trainable entries (FedPNU's second half of local training)."""
  return jax.tree.map(jnp.logical_not, mask)


def fraction_fixed(mask: PyTree) -> float:
  """Fraction of all entries that the mask holds fixed."""
  leaves = jax.tree.leaves(mask)
  return float(sum(jnp.sum(m) for m in leaves) / max(1, sum(m.size for m in leaves)))


def prune(params: PyTree, mask: PyTree) -> PyTree:
  """Zeroes the masked entries: the paper's random-pruning-at-initialization baseline.

  Trained with the same mask through `freeze`, the pruned entries stay exactly zero.
  """
  return jax.tree.map(lambda p, m: jnp.where(m, jnp.zeros_like(p), p), params, mask)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """The TNA-PFN mask of a run: the arguments of `fixed_mask`, and how often it is redrawn.

  Frozen and hashable, so a compiled program can close over it (a federated round redraws
  the mask inside the program with a traced seed). `redraw` only matters to federated runs.
  """

  fixed_fraction: float = 0.4
  seed: int = 0
  granularity: str = "weight"
  include: str = ""
  exclude: str = ""
  redraw: str = "never"  # never: one mask for the whole run; every_round: a new mask each round
  select: str = "random"  # random | magnitude_small | magnitude_large (ranked by |w| of the params drawn for)

  def __post_init__(self):
    check_choice("mask.redraw", self.redraw, REDRAWS)
    check_choice("mask.select", self.select, SELECTIONS)

  @classmethod
  def from_config(cls, mask_config) -> "MaskSpec":
    """The spec of a config's `mask` section (a ConfigDict or mapping; `redraw` and `select`
    are optional, since only federated configs have the one and fed configs lack the other)."""
    return cls(fixed_fraction=mask_config["fixed_fraction"], seed=mask_config["seed"],
               granularity=mask_config["granularity"], include=mask_config["include"],
               exclude=mask_config["exclude"], redraw=mask_config.get("redraw", "never"),
               select=mask_config.get("select", "random"))

  def draw(self, params: PyTree, seed: int | jax.Array | None = None) -> PyTree:
    """`fixed_mask` of `params` with this spec; `seed` (default: the spec's) may be traced,
    as when a federated round derives it from the round number."""
    return fixed_mask(params, self.fixed_fraction, seed=self.seed if seed is None else seed,
                      granularity=self.granularity, include=self.include, exclude=self.exclude, select=self.select)


def from_config(params: PyTree, mask_config) -> PyTree:
  """The TNA-PFN mask of `params` that a config's `mask` section describes."""
  return MaskSpec.from_config(mask_config).draw(params)


def frozen_except(params: PyTree, trainable: str) -> PyTree:
  """The mask that freezes every entry whose path does not match the regex `trainable`.

  `frozen_except(params, 'lora|head')` is LoRA fine-tuning: pretrained weights stay put,
  adapters and the head train. '' means everything trains (the all-False mask). Combine
  with a TNA-PFN mask by logical or.
  """
  pattern = _compile(trainable, "finetune.trainable")
  if pattern is None:
    return no_mask(params)
  frozen = tree_utils.map_with_path_str(lambda path, p: jnp.full(p.shape, not pattern.search(path)), params)
  if not any(bool(jnp.any(~m)) for m in jax.tree.leaves(frozen)):
    raise ConfigError(f"finetune.trainable={trainable!r} matches no parameter path, so nothing would train.")
  return frozen


class FreezeState(NamedTuple):
  """`freeze` keeps no state: the mask comes with every update."""


def freeze() -> optax.GradientTransformationExtraArgs:
  """Zeroes the update of every entry the mask holds fixed.

  Put it LAST in the optimizer chain, after momentum, weight decay and the learning rate:
  then nothing upstream can move a fixed entry, and `optax.apply_updates` adds exactly 0,
  so fixed entries stay bit-identical to their initial values. The mask is passed to each
  update as `fixed_mask=` (a bool pytree like the params, True = fixed); an update without
  it fails instead of silently training everything.
  """

  def init_fn(params):
    del params
    return FreezeState()

  def update_fn(updates, state, params=None, *, fixed_mask, **extra_args):
    del params, extra_args
    updates = jax.tree.map(lambda u, m: jnp.where(m, jnp.zeros_like(u), u), updates, fixed_mask)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- fine-tuning from one base

STARTING_VARIANTS = ("vanilla", "tna")
# from-scratch training, compared by LMC; the last two are Lim et al.'s symmetry-breaking nets (`asymmetric`)
TRAINING_VARIANTS = ("vanilla", "tna", "pruning") + asymmetric.VARIANTS


def training_start(variant: str, variables: dict, spec: MaskSpec, pruning_fraction: float,
                   wasym: asymmetric.WAsymSpec | None = None) -> tuple[dict, PyTree]:
  """(initial variables, fixed mask) of a from-scratch `variant`: vanilla trains every
  entry; tna holds the entries of `spec`'s mask at their initial values; pruning zeroes the
  entries of `spec`'s mask drawn at `pruning_fraction` instead and keeps them zero (the
  paper's random pruning at initialization, the same draw as TNA-PFN's at equal ratios);
  wasym writes `wasym`'s per-unit constants into the kernels and holds them
  (`asymmetric.wasym_start`); sigma_asym holds the FiGLU gates of `variables`, which must be
  the init of `asymmetric.variant_model('sigma_asym', model)`."""
  check_choice("variant", variant, TRAINING_VARIANTS)
  params = variables["params"]
  if variant == "vanilla":
    return variables, no_mask(params)
  if variant == "tna":
    return variables, spec.draw(params)
  if variant == "wasym":
    return asymmetric.wasym_start(variables, wasym or asymmetric.WAsymSpec())
  if variant == "sigma_asym":
    return variables, asymmetric.figlu_mask(params)
  pruning_mask = dataclasses.replace(spec, fixed_fraction=pruning_fraction).draw(params)
  return {**variables, "params": prune(params, pruning_mask)}, pruning_mask


def starting_masks(config, params: PyTree) -> dict[str, PyTree]:
  """Each variant's fixed mask for fine-tuning from one base (soups and ColD alike):
  entries outside `config.finetune.trainable`, plus (tna) the shared TNA-PFN mask of
  `config.mask`."""
  frozen = frozen_except(params, config.finetune.trainable)
  tna = from_config(params, config.mask)
  return {"vanilla": frozen, "tna": jax.tree.map(jnp.logical_or, frozen, tna)}


def keep_fixed(tree: PyTree, base: PyTree, fixed: PyTree) -> PyTree:
  """`tree` except that the entries the mask holds fixed are the base's, bit for bit.

  A fused model (a soup, a ColD base) of models trained under the mask: each of them has
  the base's value at every fixed entry; copying it (instead of averaging K equal floats,
  which can round) keeps the fused model exactly on the anchors, round after round.
  """
  return jax.tree.map(lambda value, b, m: jnp.where(m, b, value), tree, base, fixed)
