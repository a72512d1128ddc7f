"""Merging operators: fusing K models fine-tuned from one base through their task vectors.

Every operator is a pure, jittable function `op(base, stacked, *hyperparameters, weights=None,
fixed=None)` over pytrees: `stacked` holds the K fine-tuned models on a leading model axis
(as `train.fit` trains them), the task vector of model i is tau_i = theta_i - theta_base, and

  - `uniform`: the (weighted) mean of the models: Wortsman et al.'s uniform soup;
  - `task_arithmetic`: base + lam * sum_i w_i tau_i (Ilharco et al. 2023, "Editing Models with
    Task Arithmetic");
  - `ties`: TIES-merging (Yadav et al. 2023): trim each tau_i to its top-`density` magnitudes,
    elect each entry's sign as the sign of the summed trimmed vectors, take the mean over the
    models whose non-zero entry agrees with it (the disjoint mean), base + lam * that;
  - `dare`: DARE (Yu et al. 2024, "Language Models are Super Mario"): drop each entry of each
    tau_i with probability `drop_rate`, rescale the survivors by 1 / (1 - drop_rate), then combine
    by task arithmetic or by TIES's sign election and disjoint mean.

`weights` [K] (default all 1) are mergekit's per-model `weight`s; a weight of 0 leaves a model
out, so a merge over any subset of the stack is the same compiled program (the greedy soup
tries its subsets this way, ColD leaves its unseen tasks out). With `normalize` (mergekit's
default, and ours) the weights are divided by their sum over the models that contribute to an
entry, so `task_arithmetic` with lam = 1 is the mean task vector, i.e. the uniform soup;
`normalize=False` with lam chosen on held-out data is Ilharco et al.'s form.

Defaults: lam = 1 (mergekit's `lambda`, and TIES's recommended value), density = 0.2 (TIES's
top-20 %; mergekit has no default), drop_rate = 0.5 (mergekit's dare density ~0.5 in its
examples; Yu et al. drop up to 0.9 of the much smaller deltas of supervised LLM fine-tuning),
DARE combined by TIES (mergekit's `dare_ties`: random drop, then sign election and disjoint
mean, no magnitude trim).

`fixed` is an optional bool mask pytree, True at the entries a TNA-PFN mask (or a frozen
fine-tuning) held at the base's values. Those entries' task vectors are zero; with `fixed`
given, the merged model holds the base's value there bit for bit (`masks.keep_fixed`), and
TIES trims each leaf to its top-`density` fraction of its trainable entries (without a mask,
of all entries, as mergekit does).

The operators act on one pytree (the params). `merge_variables` fuses a model's variables:
the params by the operator, every other collection (BatchNorm statistics) by the weighted
mean of the models, since running statistics have no task vector that a sign or a drop
would make sense of.

DARE's drop is keyed per leaf by its path (`tree_utils.path_key`) from `seed` (an int or a
key): the same on every host and in every process, whatever the leaf order.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from tna_jax.core import masks, tree_utils
from tna_jax.errors import ConfigError, check_choice
from tna_jax.fusion import model_soups

PyTree = Any
DARE_COMBINES = ("task_arithmetic", "ties")


# ----------------------------------------------------------------------------- building blocks


def task_vectors(base: PyTree, stacked: PyTree) -> PyTree:
  """tau_i = theta_i - theta_base for each of the K stacked models (a leading axis K)."""
  return jax.tree.map(lambda x, b: x - b[None], stacked, base)


def _per_model(weights: jax.Array, x: jax.Array) -> jax.Array:
  """weights [K] shaped to broadcast against a stacked leaf [K, ...]."""
  return weights.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def _weights(stacked: PyTree, weights: jax.Array | None) -> jax.Array:
  k = jax.tree.leaves(stacked)[0].shape[0]
  return jnp.ones((k,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)


def trim(taus: PyTree, density: float, fixed: PyTree | None = None) -> PyTree:
  """Each task vector with all but its top-`density` fraction of entries by magnitude set to 0,
  per leaf and per model (TIES's trim; floor(density * n) entries kept, ties broken by index).

  With `fixed`, n counts only the leaf's trainable entries and fixed ones are never kept.
  """
  def leaf(tau, mask):
    flat = jnp.abs(tau.reshape(tau.shape[0], -1))
    free = jnp.ones(flat.shape[1:], bool) if mask is None else ~mask.reshape(-1)
    keep = jnp.floor(density * jnp.sum(free)).astype(jnp.int32)
    score = jnp.where(free, flat, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=1, stable=True), axis=1)
    return jnp.where((rank < keep).reshape(tau.shape), tau, 0)

  if fixed is None:
    return jax.tree.map(lambda t: leaf(t, None), taus)
  return jax.tree.map(leaf, taus, fixed)


def drop(taus: PyTree, drop_rate: float, seed: int | jax.Array) -> PyTree:
  """DARE's drop-and-rescale: each entry kept with probability 1 - drop_rate, survivors x 1/(1 - drop_rate).

  The Bernoulli draw of a leaf (all K models at once) is keyed by its path from `seed`.
  """
  root = jax.random.key(seed) if isinstance(seed, int) else seed
  keep_prob = 1.0 - drop_rate

  def leaf(path, tau):
    # Drawn flat and reshaped: on CPU many times faster to compile than an n-d draw.
    keep = jax.random.bernoulli(tree_utils.path_key(root, path), keep_prob, (tau.size,)).reshape(tau.shape)
    return jnp.where(keep, tau / jnp.asarray(keep_prob, tau.dtype), 0)

  return tree_utils.map_with_path_str(leaf, taus)


def linear_combine(taus: PyTree, weights: jax.Array, normalize: bool) -> PyTree:
  """sum_i w_i tau_i, divided by sum_i w_i with `normalize` (task arithmetic's combination)."""
  total = jnp.sum(weights)
  return jax.tree.map(lambda t: jnp.sum(_per_model(weights, t) * t, axis=0) /
                      (total.astype(t.dtype) if normalize else 1), taus)


def disjoint_combine(taus: PyTree, weights: jax.Array, normalize: bool) -> PyTree:
  """TIES's sign election and disjoint merge.

  The elected sign of an entry is the sign of sum_i w_i tau_i; the models whose entry is
  non-zero with that sign agree. The result is sum over agreeing models of w_i tau_i, divided
  (with `normalize`) by the sum of their weights: the disjoint mean; 0 where none agrees.
  """
  def leaf(t):
    w = _per_model(weights, t)
    elected = jnp.sign(jnp.sum(w * t, axis=0))
    agree = (jnp.sign(t) == elected) & (t != 0) & (w > 0)
    num = jnp.sum(jnp.where(agree, w * t, 0), axis=0)
    if not normalize:
      return num
    den = jnp.sum(jnp.where(agree, w, 0), axis=0)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)

  return jax.tree.map(leaf, taus)


def _add(base: PyTree, merged: PyTree, lam: float, fixed: PyTree | None) -> PyTree:
  out = jax.tree.map(lambda b, m: b + jnp.asarray(lam, b.dtype) * m, base, merged)
  return out if fixed is None else masks.keep_fixed(out, base, fixed)


# ----------------------------------------------------------------------------- the operators


def uniform(base: PyTree, stacked: PyTree, *, weights: jax.Array | None = None, fixed: PyTree | None = None) -> PyTree:
  """The (weighted) mean of the models: Wortsman et al.'s uniform soup (`model_soups.uniform_soup`);
  `base` is used only where `fixed` holds an entry (it is then the base's, bit for bit)."""
  out = model_soups.uniform_soup(stacked, weights)
  return out if fixed is None else masks.keep_fixed(out, base, fixed)


def task_arithmetic(base: PyTree, stacked: PyTree, *, lam: float = 1.0, normalize: bool = True,
                    weights: jax.Array | None = None, fixed: PyTree | None = None) -> PyTree:
  """Task arithmetic (Ilharco et al. 2023): base + lam * sum_i w_i tau_i.

  Defaults lam = 1, normalize = True (mergekit's): the weights sum to 1, so the result is the
  base plus the mean task vector, the uniform soup up to float rounding. Ilharco et al.'s own
  form is normalize=False with lam chosen on held-out data (lam = 1/K is again the mean).
  """
  taus = task_vectors(base, stacked)
  return _add(base, linear_combine(taus, _weights(stacked, weights), normalize), lam, fixed)


def ties(base: PyTree, stacked: PyTree, *, density: float = 0.2, lam: float = 1.0, normalize: bool = True,
         weights: jax.Array | None = None, fixed: PyTree | None = None) -> PyTree:
  """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint merge, base + lam * merged.

  Each tau_i keeps its top-`density` fraction of entries by magnitude per leaf (`trim`; the
  paper's k = 20 % is the default, density = 1 keeps all), the sign of each entry is elected
  by the weighted sum of the trimmed vectors, and the merged vector is the weighted mean of the
  entries that agree with it (`disjoint_combine`). lam = 1 is the paper's recommendation
  without validation data, and mergekit's default.
  """
  taus = trim(task_vectors(base, stacked), density, fixed)
  return _add(base, disjoint_combine(taus, _weights(stacked, weights), normalize), lam, fixed)


def dare(base: PyTree, stacked: PyTree, *, drop_rate: float = 0.5, combine: str = "ties", lam: float = 1.0,
         normalize: bool = True, seed: int | jax.Array = 0, weights: jax.Array | None = None,
         fixed: PyTree | None = None) -> PyTree:
  """DARE (Yu et al. 2024): drop each task-vector entry with probability `drop_rate`, rescale the
  rest by 1 / (1 - drop_rate), then combine them.

  `combine='task_arithmetic'` adds lam times their (weighted, with `normalize` mean) sum:
  mergekit's `dare_linear`; `combine='ties'` elects signs and takes the disjoint mean of the
  dropped vectors without a further magnitude trim: mergekit's `dare_ties`. `seed` (int or
  key) seeds the drop, per leaf by path; drop_rate = 0 is exactly task arithmetic / TIES at density 1.
  """
  check_choice("merging.dare_combine", combine, DARE_COMBINES)
  taus = drop(task_vectors(base, stacked), drop_rate, seed)
  combined = (linear_combine if combine == "task_arithmetic" else disjoint_combine)(
      taus, _weights(stacked, weights), normalize)
  return _add(base, combined, lam, fixed)


OPERATORS = {"uniform": uniform, "task_arithmetic": task_arithmetic, "ties": ties, "dare": dare}
NAMES = tuple(OPERATORS)
# The hyperparameters each operator reads (the other fields of `Merger` it ignores).
HYPERPARAMETERS = {"uniform": (), "task_arithmetic": ("lam", "normalize"),
                   "ties": ("density", "lam", "normalize"),
                   "dare": ("drop_rate", "combine", "lam", "normalize", "seed")}
# `soup.methods`: an operator's soup of all K models, or 'greedy:<operator>', the greedy soup
# with that operator ('greedy' alone: Wortsman et al.'s, by averaging).
SOUP_METHODS = ("uniform", "greedy") + tuple(n for n in NAMES if n != "uniform") + tuple(
    f"greedy:{n}" for n in NAMES if n != "uniform")


def soup_operator(method: str) -> tuple[bool, str]:
  """(greedy?, operator name) of a `soup.methods` item: 'greedy' -> (True, 'uniform'), 'ties' -> (False, 'ties')."""
  check_choice("soup.methods", method, SOUP_METHODS)
  if method == "greedy":
    return True, "uniform"
  greedy, _, name = method.rpartition(":")  # 'greedy:ties' -> ('greedy', ':', 'ties'); 'ties' -> ('', '', 'ties')
  return bool(greedy), name


# ----------------------------------------------------------------------------- one operator, chosen by name


@dataclasses.dataclass(frozen=True)
class Merger:
  """One operator with its hyperparameters, chosen by name (`NAMES`); hashable, so a jitted
  function can take it as a static argument.

  `task_vectors` and `combine` split the operator into the part that does not depend on the
  weights (trim, drop) and the part that does: the greedy soup prepares the vectors once and
  combines them for each subset it tries. `merger(base, stacked, ...)` is both in one.
  """

  name: str
  lam: float = 1.0
  density: float = 0.2
  drop_rate: float = 0.5
  combine: str = "ties"
  normalize: bool = True
  seed: int = 0

  def __post_init__(self):
    check_choice("merge operator", self.name, NAMES)
    check_choice("merging.dare_combine", self.combine, DARE_COMBINES)
    if not 0 < self.density <= 1:
      raise ConfigError(f"merging.density={self.density!r} is out of range; allowed: 0 < merging.density <= 1.")
    if not 0 <= self.drop_rate < 1:
      raise ConfigError(f"merging.drop_rate={self.drop_rate!r} is out of range; allowed: 0 <= merging.drop_rate < 1.")

  @classmethod
  def from_config(cls, name: str, config) -> "Merger":
    """`name` with the hyperparameters of a config's `merging` section."""
    m = config.merging
    return cls(name, lam=m["lambda"], density=m.density, drop_rate=m.drop_rate, combine=m.dare_combine,
               normalize=m.normalize, seed=m.seed)

  def hyperparameters(self) -> dict[str, Any]:
    """The hyperparameters this operator reads, by the names of its function's arguments."""
    return {name: getattr(self, name) for name in HYPERPARAMETERS[self.name]}

  def __call__(self, base: PyTree, stacked: PyTree, *, weights: jax.Array | None = None,
               fixed: PyTree | None = None, key: jax.Array | None = None) -> PyTree:
    """The operator on `base` and `stacked`; `key` replaces `seed` (ColD folds in its round)."""
    hyper = self.hyperparameters()
    if key is not None and "seed" in hyper:
      hyper["seed"] = key
    return OPERATORS[self.name](base, stacked, **hyper, weights=weights, fixed=fixed)

  def task_vectors(self, base: PyTree, stacked: PyTree, fixed: PyTree | None = None,
                   key: jax.Array | None = None) -> PyTree:
    """The task vectors as this operator prepares them before combining: trimmed (ties),
    dropped and rescaled (dare), as they are (task_arithmetic); uniform: the models themselves."""
    if self.name == "uniform":
      return stacked
    taus = task_vectors(base, stacked)
    if self.name == "ties":
      return trim(taus, self.density, fixed)
    if self.name == "dare":
      return drop(taus, self.drop_rate, self.seed if key is None else key)
    return taus

  def combine_vectors(self, base: PyTree, taus: PyTree, weights: jax.Array,
                      fixed: PyTree | None = None) -> PyTree:
    """The merged model from `task_vectors`' output and the models' `weights` [K]."""
    if self.name == "uniform":
      return uniform(base, taus, weights=weights, fixed=fixed)
    disjoint = self.name == "ties" or (self.name == "dare" and self.combine == "ties")
    merged = (disjoint_combine if disjoint else linear_combine)(taus, jnp.asarray(weights, jnp.float32),
                                                                self.normalize)
    return _add(base, merged, self.lam, fixed)


@jax.jit(static_argnums=0)
def merge_variables(merger: Merger, base: dict, stacked: dict, *, weights: jax.Array | None = None,
                    fixed: PyTree | None = None, key: jax.Array | None = None) -> dict:
  """A model's variables merged: 'params' by `merger` (`fixed` is a mask over the params), every
  other collection (BatchNorm statistics) by the weighted mean of the models. One compiled
  program per operator (and per stack shape)."""
  rest = {k: model_soups.uniform_soup(v, weights) for k, v in stacked.items() if k != "params"}
  return {"params": merger(base["params"], stacked["params"], weights=weights, fixed=fixed, key=key), **rest}


def merge(name: str, base: PyTree, stacked: PyTree, *, weights: jax.Array | None = None,
          fixed: PyTree | None = None, **hyperparameters) -> PyTree:
  """The operator `name` (`NAMES`) on one pytree, e.g. `merge('ties', base, stacked, density=0.5)`;
  hyperparameters are the operator's own keyword arguments."""
  check_choice("merge operator", name, NAMES)
  return OPERATORS[name](base, stacked, **hyperparameters, weights=weights, fixed=fixed)
