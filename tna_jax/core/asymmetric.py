"""Symmetry-breaking baselines: W-Asymmetric and σ-Asymmetric networks (Lim, Putterman, Walters,
Jiang, Maron, NeurIPS 2024, "The Empirical Impact of Neural Parameter Symmetries, or Lack Thereof").

Both remove the permutation symmetry of hidden units at training time, which is what TNA-PFN
approximates with its random anchors, so they are TNA-PFN's direct competitors in `lmc` and
`sweep` (variants `wasym`, `sigma_asym`). Each is a (initial variables, fixed mask) pair from the
run's one initialization, so it trains through `masks.freeze` and `train.fit` unchanged.

W-Asymmetric (`wasym_start`). In every Dense/Conv kernel, each output unit (a kernel column in
Flax's [.., in, out] layout; for a conv [kh, kw, in, out] the unit's flattened kh * kw * in
fan-in) gets its own random subset of `fixed_per_unit` fan-in entries, set to constants
scale * N(0, 1) that never train; the rest trains as usual. The subsets of one layer are all
different, so no reordering of a layer's units maps the fixed pattern onto itself. Biases and
norm parameters train normally, and the head is included, all as in the authors' code.

What the authors' code does (github.com/cptq/asymmetric-networks, lmc/models/models_mlp.py,
models_resnet.py, train-mlp-mnist.py, train-cifar-resnet.py; read, not copied):
  - subsets: 'random_subsets', a random permutation per row, first `num_fixed` entries; rows are
    not checked to differ (here they are, by redrawing: `fixed_sets`);
  - values: `mask_constant * torch.randn` (absolute scale, not relative to the fan-in);
  - MLP 784-512-512-512-10 with LayerNorm and GELU (MNIST): 64 fixed per unit at scale 1 in the
    first three layers (fan-in 784, 512, 512) and 256 at scale 1/4 in the head (fan-in 512);
    their script's defaults also give scale 1/2 to the third layer;
  - ResNet20 with GroupNorm (CIFAR-10): scale 3 everywhere; per unit 12 (stem, fan-in 27),
    36 / 54 / 72 (3x3 convs of stages 1-3, fan-in 144 / 288 / 576), 4 / 6 / 8 (1x1 shortcuts),
    8 (head, fan-in 64).
Here one count and one scale serve every layer (`WAsymSpec`; defaults: the MLP's 64 and 1),
the count capped at half a unit's fan-in (the authors' largest share: 256 of 512 in the head,
12 of 27 in the stem). Their networks normalize every layer; the library's MLP does not, so
a fixed entry of scale 1 there is ~sqrt(fan_in) times an initial LeCun weight, and the
activations grow layer by layer: lower `wasym.scale` for norm-free models (README).

σ-Asymmetric (`variant_model`, `figlu_mask`). The MLP's relu becomes FiGLU, sigmoid(x F) * x
(`models.FiGLU`), with one random F [width, width] per hidden layer, scale * N(0, 1) (config
`sigma_asym.scale`; 1 by default, the authors' `AsymSwiGLU`: `torch.randn(dim, dim)`, after a
LayerNorm). Without a norm, F ~ N(0, 1) saturates the gates and the FiGLU MLP diverges under
SGD at lr 0.1; F ~ N(0, 1/width) (scale 1/sqrt(width)) trains without clipping (README).
F is a parameter held by the mask rather than a separate collection: the library's training
state carries params (and BatchNorm statistics) only, a masked parameter is bit-identical
after training by `freeze`'s contract, and it is checkpointed, interpolated and seen by the
permutation code like every other leaf.
The FiGLU MLP is another flax module, so it trains in its own compiled program; its Dense
layers start from exactly the other variants' values (flax keys submodules by name).
"""

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tna_jax.core import models, tree_utils
from tna_jax.errors import ConfigError

PyTree = Any
VARIANTS = ("wasym", "sigma_asym")
_KERNEL = re.compile(r"(^|/)kernel$")  # Dense and Conv weights: the leaves W-Asymmetric nets fix entries of
_FIGLU = re.compile(r"^figlu\d+/gate$")
_MAX_REDRAWS = 100


@dataclasses.dataclass(frozen=True)
class WAsymSpec:
  """The W-Asymmetric choices of a run (config section `wasym`)."""

  fixed_per_unit: int = 64  # fixed fan-in entries per output unit (capped at half the fan-in); 0 = vanilla
  scale: float = 1.0  # the fixed values are scale * N(0, 1)
  seed: int = 0  # draws the subsets and the values, per leaf (`tree_utils.path_key`)

  @classmethod
  def from_config(cls, wasym_config) -> "WAsymSpec":
    return cls(fixed_per_unit=wasym_config["fixed_per_unit"], scale=wasym_config["scale"], seed=wasym_config["seed"])


def fixed_count(fan_in: int, fixed_per_unit: int) -> int:
  """Entries fixed per unit of a layer with this fan-in: `fixed_per_unit`, at most half of it."""
  return min(fixed_per_unit, fan_in // 2)


def fixed_sets(rng: np.random.Generator, fan_in: int, units: int, count: int) -> np.ndarray:
  """bool [fan_in, units]: column u marks unit u's `count` fixed entries, every column different.

  Each unit's subset is the first `count` entries of a random ordering of its fan-in; units
  whose subset repeats an earlier unit's are drawn again until none does. Host numpy, drawn
  from `rng`: one tiny draw per leaf would otherwise compile an XLA program per leaf shape.
  """
  if math.comb(fan_in, count) < units:
    raise ConfigError(f"wasym: a layer with fan-in {fan_in} has only {math.comb(fan_in, count)} subsets of {count} "
                      f"entries, fewer than its {units} units, so its rows cannot all differ; change "
                      "wasym.fixed_per_unit.")
  sets = np.zeros((units, fan_in), bool)
  todo = np.arange(units)
  for _ in range(_MAX_REDRAWS):
    order = np.argsort(rng.random((len(todo), fan_in)), axis=1)
    chosen = np.zeros((len(todo), fan_in), bool)
    np.put_along_axis(chosen, order[:, :count], True, axis=1)
    sets[todo] = chosen
    _, first = np.unique(sets, axis=0, return_index=True)
    todo = np.setdiff1d(np.arange(units), first)
    if not len(todo):
      return sets.T
  raise ConfigError(f"wasym: could not draw {units} different subsets of {count} of {fan_in} entries.")


def wasym_start(variables: dict, spec: WAsymSpec) -> tuple[dict, PyTree]:
  """(initial variables, fixed mask) of the W-Asymmetric network from `variables` (the run's init).

  Every Dense/Conv kernel gets `fixed_sets` per output unit (True in the mask) holding
  spec.scale * N(0, 1); every other entry, and every other leaf, keeps its initial value and
  trains. Each leaf's draws come from `spec.seed` and its path (`tree_utils.path_key`, whose
  bits seed a numpy generator), so all models of a run, in any process, get the same pattern
  and values.
  """
  root = jax.random.key(spec.seed)

  def start(path: str, leaf: jax.Array) -> tuple[jax.Array, jax.Array]:
    if not _KERNEL.search(path) or leaf.ndim < 2 or spec.fixed_per_unit == 0:
      return leaf, jnp.asarray(np.zeros(leaf.shape, bool))  # host zeros: no XLA program per shape
    fan_in, units = math.prod(leaf.shape[:-1]), leaf.shape[-1]
    rng = np.random.default_rng(np.asarray(jax.random.key_data(tree_utils.path_key(root, path))))
    fixed = fixed_sets(rng, fan_in, units, fixed_count(fan_in, spec.fixed_per_unit)).reshape(leaf.shape)
    values = (spec.scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    return jnp.asarray(np.where(fixed, values, np.asarray(leaf))), jnp.asarray(fixed)

  pairs = tree_utils.map_with_path_str(start, variables["params"])
  is_pair = lambda x: isinstance(x, tuple)
  params = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
  return {**variables, "params": params}, jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)


def variant_model(variant: str, model: nn.Module, figlu_scale: float = 1.0) -> nn.Module:
  """The flax module `variant` trains: for sigma_asym the FiGLU MLP, F ~ figlu_scale * N(0, 1)
  (config `sigma_asym.scale`); `model` for every other variant."""
  if variant != "sigma_asym":
    return model
  if not isinstance(model, models.MLP):
    raise ConfigError(f"variant 'sigma_asym' (FiGLU) is defined for model.name='mlp' only, not "
                      f"{type(model).__name__}.")
  return model.clone(activation="figlu", figlu_scale=figlu_scale)


def figlu_mask(params: PyTree) -> PyTree:
  """The σ-Asymmetric mask: every FiGLU's F (figlu*/gate) fixed, everything else trains."""
  mask = tree_utils.map_with_path_str(lambda path, p: jnp.full(p.shape, bool(_FIGLU.search(path))), params)
  if not any(bool(jnp.any(m)) for m in jax.tree.leaves(mask)):
    raise ValueError("figlu_mask: these params have no FiGLU gates; initialize variant_model('sigma_asym', model).")
  return mask


def model_groups(model: nn.Module, variants: list[str],
                 figlu_scale: float = 1.0) -> list[tuple[nn.Module, list[str]]]:
  """The variants that train as one compiled program, with their module, in the order of
  `variants`: sigma_asym on its own (the FiGLU MLP), every other variant with `model`."""
  groups: dict[bool, list[str]] = {}
  for variant in variants:
    groups.setdefault(variant == "sigma_asym", []).append(variant)
  return [(variant_model(members[0], model, figlu_scale), members) for members in groups.values()]
