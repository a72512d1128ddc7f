"""Post-hoc alignment: the permutations of model b's units that make it most like model a.

Two searches over the permutations of a `permutations.PermutationSpec`:

- Weight matching (Git Re-Basin): coordinate descent. Each sweep visits the permutations in
  a random order; for each one, the other permutations held fixed, the best permutation
  maximizes sum over its leaves of <w_a, P w_b> = a linear assignment on the matrix
  sum_leaves W_a W_b^T (units as rows). A permutation with nested ones (attention heads
  and their head dims) moves together with them (`_propose`). Sweeps repeat until none
  improves. The whole descent is ONE compiled call (a while loop of sweeps, each a loop
  over permutations switching to that permutation's update), with model b kept permuted as
  it goes, so each update costs one matrix product per leaf and no host round trip.
- Activation matching: the correlation of the two models' units on training batches
  (accumulated in one scan), then one assignment per permutation; permutations with no
  activation site (attention heads and head dimensions) fall back to weight matching with
  the others fixed.

Linear assignments are solved either by optax's jittable Hungarian algorithm (on device)
or by scipy's `linear_sum_assignment` through a host callback; 'auto' takes the one the
execution policy names (`execution.ExecutionPolicy.solver`): the host solver on CPU, where
it is faster, and the device solver on accelerators.
"""

import collections
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from tna_jax.alignment import permutations
from tna_jax.core import data, execution, tree_utils
from tna_jax.errors import check_choice

PyTree = Any
SOLVERS = ("auto", "hungarian", "scipy")
METHODS = ("weight", "activation")
# A permutation replaces the current one only if it raises the objective by more than this
# fraction, so float noise and ties cannot make the descent cycle.
IMPROVEMENT_RTOL = 1e-6


@dataclasses.dataclass(frozen=True)
class MatchResult:
  """Permutations for model b (see `permutations` for the convention) and their cost."""

  perms: dict[str, jax.Array]
  iterations: int  # coordinate-descent sweeps; 1 for activation matching (+ sweeps of its weight fallback)
  seconds: float  # wall time of the compiled search, compilation excluded
  compile_seconds: float  # 0 when an earlier call compiled the same search
  objective: float  # weight: sum of <a, P b> over permuted leaves; activation: mean matched correlation
  initial_objective: float  # the same before permuting

  def summary(self) -> dict[str, float]:
    """The numbers worth reporting, JSON-ready."""
    return {"iterations": self.iterations, "seconds": self.seconds, "compile_seconds": self.compile_seconds,
            "objective": self.objective, "initial_objective": self.initial_objective}


def resolve_solver(solver: str, policy: execution.ExecutionPolicy | None = None) -> str:
  """'hungarian' or 'scipy' for `solver`; 'auto' is the policy's (default `execution.policy()`)."""
  check_choice("matching.solver", solver, SOLVERS)
  if solver == "auto":
    return (policy or execution.policy()).solver
  return solver


def assign(score: jax.Array, solver: str) -> jax.Array:
  """The assignment q (row i -> column q[i]) maximizing sum_i score[i, q[i]]; jittable.
  `score` [..., n, n] holds one problem per leading index; q is [..., n]."""
  if solver == "hungarian":

    def one(square):
      rows, cols = optax.assignment.hungarian_algorithm(-square)
      return jnp.zeros(square.shape[0], jnp.int32).at[rows].set(cols.astype(jnp.int32))

    flat = score.reshape((-1,) + score.shape[-2:])
    return jax.vmap(one)(flat).reshape(score.shape[:-1])
  check_choice("matching.solver", solver, ("hungarian", "scipy"))
  return jax.pure_callback(_scipy_assign, jax.ShapeDtypeStruct(score.shape[:-1], jnp.int32), score)


def _scipy_assign(score: np.ndarray) -> np.ndarray:
  score = np.asarray(score)
  flat = score.reshape((-1,) + score.shape[-2:])
  cols = [scipy.optimize.linear_sum_assignment(square, maximize=True)[1] for square in flat]
  return np.stack(cols).astype(np.int32).reshape(score.shape[:-1])


def sweep_order(key: jax.Array, sweep: jax.Array | int, count: int) -> jax.Array:
  """The order in which sweep number `sweep` visits the `count` permutations."""
  return jax.random.permutation(jax.random.fold_in(key, sweep), count)


def improves(old: jax.Array, new: jax.Array) -> jax.Array:
  """Whether objective `new` beats `old` by more than float noise."""
  return new > old + IMPROVEMENT_RTOL * abs(old)  # numpy or jax scalars alike


def leaves_by_path(tree: PyTree) -> dict[str, jax.Array]:
  """{'fc1/kernel': leaf, ...}: a pytree's leaves keyed by their paths."""
  return {tree_utils.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _permuted_leaves(spec: permutations.PermutationSpec, flat: Mapping[str, Any]) -> dict[str, tuple]:
  """For each permutation, the places (`permutations.UnitAxis`) in leaves of `flat` it acts on."""
  return {name: tuple(unit for unit in spec.axes_of(name) if unit.path in flat) for name in spec.names}


# Compiled searches by (function, static arguments, argument structure and shapes), the
# least recently used first.
_EXECUTABLES: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
MAX_EXECUTABLES = 16


def _compile_and_run(jitted, static: tuple, dynamic: tuple) -> tuple[Any, float, float]:
  """Runs `jitted(*static, *dynamic)` compiled ahead of time; returns (output, run seconds,
  compile seconds), the latter 0 when this signature was compiled before.

  A repeated search (the next variant's pair, a benchmark repeat) skips tracing as well as
  compiling, which for a ResNet costs more than the search itself. The cache keeps the
  `MAX_EXECUTABLES` most recently used searches: an experiment needs a handful (one per
  model, method and solver), while a process that aligns many different models (a notebook,
  a test session, a sweep) would otherwise hold every executable, and the model and spec in
  its key, until it exits. jit's own cache cannot serve here: the search is run from its
  `Compiled` object so that compiling and running are timed apart.
  """
  leaves, treedef = jax.tree.flatten(dynamic)
  signature = (jitted, static, treedef, tuple(jax.typeof(x) for x in leaves))
  compile_seconds = 0.0
  if signature in _EXECUTABLES:
    _EXECUTABLES.move_to_end(signature)
  else:
    start = time.perf_counter()
    _EXECUTABLES[signature] = jitted.lower(*static, *dynamic).compile()
    compile_seconds = time.perf_counter() - start
    if len(_EXECUTABLES) > MAX_EXECUTABLES:
      _EXECUTABLES.popitem(last=False)
  start = time.perf_counter()
  out = jax.block_until_ready(_EXECUTABLES[signature](*dynamic))
  return out, time.perf_counter() - start, compile_seconds


def weight_matching(spec: permutations.PermutationSpec, params_a: PyTree, params_b: PyTree, *, seed: int = 0,
                    max_iterations: int = 100, solver: str = "auto", names: tuple[str, ...] | None = None,
                    policy: execution.ExecutionPolicy | None = None) -> MatchResult:
  """Permutations of model b's units that maximize sum over leaves of <a, P b>.

  Args:
    spec: the models' permutation spec (`permutations.spec_for`).
    params_a, params_b: the two models' params.
    seed: decides the order in which each sweep visits the permutations.
    max_iterations: at most this many sweeps (the descent usually stops earlier).
    solver: 'auto', 'hungarian' (optax, on device) or 'scipy' (host callback).
    names: search only these permutations (the others stay the identity); None: all.
    policy: decides what 'auto' means (default `execution.policy()`).

  Returns:
    A MatchResult with a permutation for every name of the spec;
    `permutations.permute_variables(spec, variables_b, result.perms)` is model b aligned
    to model a.
  """
  flat_a, flat_b = leaves_by_path(params_a), leaves_by_path(params_b)
  names = spec.names if names is None else tuple(names)
  (perms, sweeps, objective, initial), seconds, compile_seconds = _compile_and_run(
      _weight_matching, (spec, resolve_solver(solver, policy), max_iterations, names),
      (flat_a, flat_b, jax.random.key(seed)))
  perms = {**permutations.identity(spec), **dict(zip(names, perms))}
  return MatchResult(perms=perms, iterations=int(sweeps), seconds=seconds,
                     compile_seconds=compile_seconds, objective=float(objective), initial_objective=float(initial))


@jax.jit(static_argnames=("spec", "solver", "max_iterations", "names"))
def _weight_matching(spec, solver, max_iterations, names, flat_a, flat_b, key):
  sizes = dict(spec.sizes)
  leaves = _permuted_leaves(spec, flat_a)
  permuted = sorted({unit.path for name in names for unit in leaves[name]})

  def objective(b):
    return sum(jnp.vdot(flat_a[path], b[path]) for path in permuted)

  nested = dict(spec.nested)

  def update(index):
    name = names[index]
    group = (name,) + tuple(inner for inner in nested.get(name, ()) if inner in names)
    units = [u for p in group for u in leaves[p]]

    def step(carry):
      perms, b, improved = carry
      # Scores compare a with b as currently permuted, so the current permutations are the
      # identity and the proposal is relative to them.
      proposal, old, new = _propose(flat_a, b, leaves, group, sizes[name], solver)
      better = improves(old, new)
      proposal = {p: jnp.where(better, q, jnp.arange(sizes[p])) for p, q in proposal.items()}

      def move():
        moved = {u.path: b[u.path] for u in units}
        for u in units:
          moved[u.path] = permutations.take_units(moved[u.path], proposal[u.name], u.axis, u.inner)
        return moved

      b = {**b, **jax.lax.cond(better, move, lambda: {u.path: b[u.path] for u in units})}
      perms = tuple(perm[proposal[p]] if p in proposal else perm for p, perm in zip(names, perms))
      return perms, b, improved | better

    return step

  updates = [update(i) for i in range(len(names))]

  def sweep(state):
    count, _, perms, b = state
    order = sweep_order(key, count, len(names))
    perms, b, improved = jax.lax.fori_loop(0, len(names), lambda k, c: jax.lax.switch(order[k], updates, c),
                                           (perms, b, jnp.array(False)))
    return count + 1, improved, perms, b

  start = (jnp.array(0), jnp.array(len(names) > 0), tuple(jnp.arange(sizes[n]) for n in names), flat_b)
  count, _, perms, b = jax.lax.while_loop(lambda s: (s[0] < max_iterations) & s[1], sweep, start)
  return perms, count, objective(b), objective(flat_b)


def _propose(flat_a, b, leaves, group, size, solver) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """The best move of permutation `group[0]` (with those nested in it, `group[1:]`), the
  others held fixed; returns (assignment of each, objective of the touched leaves now, after).

  Alone, this is Git Re-Basin's update: one assignment on sum over leaves of W_a W_b^T. With
  nested permutations (a block's head dims inside its heads), heads are matched on pair
  scores in which each pair (a's head h, b's head g) takes its own best head-dim
  assignment, then each head-dim permutation (shared by all heads) is solved for that
  heads matching; the caller keeps the move only if it raises the objective. One-at-a-time
  updates stall here: with the head dims wrong, heads look alike, and the reverse, so even
  a purely permuted model kept wrong heads in 6 of 18 runs (tiny random ViTs and text
  encoders, 2 blocks); with the joint move, in none of 135.
  """
  outer, inners = group[0], group[1:]
  rows = jnp.arange(size)
  outer_unit = {u.path: u for u in leaves[outer]}
  blocks = {}  # inner -> [n, n, m, m]: a's (outer i, inner k) against b's (outer j, inner l)
  for inner in inners:
    for u in leaves[inner]:
      pair = [outer_unit[u.path], u]
      block = jnp.einsum("hdr,HDr->hHdD", permutations.units_first(flat_a[u.path], pair),
                         permutations.units_first(b[u.path], pair))
      blocks[inner] = blocks[inner] + block if inner in blocks else block
  with_inner = {u.path for inner in inners for u in leaves[inner]}
  plain = sum((permutations.unit_products(flat_a[u.path], b[u.path], u.axis, u.size, u.inner)
               for u in leaves[outer] if u.path not in with_inner), jnp.zeros((size, size)))
  pair_scores = plain
  for block in blocks.values():
    best = assign(block, solver)  # each pair's own inner assignment
    pair_scores = pair_scores + jnp.take_along_axis(block, best[..., None], -1)[..., 0].sum(-1)
  q = assign(pair_scores, solver)
  proposal, old, new = {outer: q}, jnp.trace(plain), plain[rows, q].sum()
  for inner, block in blocks.items():
    matched = block[rows, q].sum(0)  # [m, m] for the chosen outer matching
    proposal[inner] = assign(matched, solver)
    old += jnp.einsum("hhdd->", block)
    new += matched[jnp.arange(matched.shape[0]), proposal[inner]].sum()
  return proposal, old, new


def activation_matching(model, spec: permutations.PermutationSpec, variables_a: dict, variables_b: dict,
                        images: jax.Array, mean, std, *, solver: str = "auto", seed: int = 0,
                        max_iterations: int = 100, policy: execution.ExecutionPolicy | None = None) -> MatchResult:
  """Permutations pairing each unit of a with the unit of b it correlates with most.

  Permutations without an activation site (attention heads and head dimensions, see
  `permutations`) are then found by weight matching, with the matched ones held fixed.

  Args:
    model: the flax module of both models.
    spec: its permutation spec; its sites say which module outputs carry each permutation
      (a permutation with several sites averages their correlation matrices).
    variables_a, variables_b: the two models' variables.
    images: uint8 training batches [S, B, H, W, C]; activations are read in inference mode.
    mean, std: normalization of the images.
    solver: 'auto', 'hungarian' or 'scipy'.
    seed, max_iterations: of the weight matching of permutations without sites.
    policy: decides what 'auto' means (default `execution.policy()`).

  Returns:
    A MatchResult; `objective` and `initial_objective` are the mean correlation of the
    units with sites; `iterations` is 1 plus the weight-matching sweeps, if any.
  """
  solver = resolve_solver(solver, policy)
  sites = dict(spec.sites)
  sited = tuple(name for name in spec.names if name in sites)
  (perms, matched, initial), seconds, compile_seconds = _compile_and_run(
      _activation_matching, (model, spec, sited, solver, tuple(mean), tuple(std)),
      (variables_a, variables_b, jnp.asarray(images)))
  result = MatchResult(perms={**permutations.identity(spec), **dict(zip(sited, perms))}, iterations=1,
                       seconds=seconds, compile_seconds=compile_seconds, objective=float(matched),
                       initial_objective=float(initial))
  rest = tuple(name for name in spec.names if name not in sites)
  if not rest:
    return result
  moved = permutations.apply_permutation(spec, variables_b["params"], result.perms)
  weights = weight_matching(spec, variables_a["params"], moved, seed=seed, max_iterations=max_iterations,
                            solver=solver, names=rest)
  return dataclasses.replace(result, perms={**result.perms, **{name: weights.perms[name] for name in rest}},
                             iterations=1 + weights.iterations, seconds=seconds + weights.seconds,
                             compile_seconds=compile_seconds + weights.compile_seconds)


@jax.jit(static_argnames=("model", "spec", "names", "solver", "mean", "std"))
def _activation_matching(model, spec, names, solver, mean, std, variables_a, variables_b, images):
  sites = dict(spec.sites)
  modules = sorted({m for name in names for m in sites[name]})

  def batch_moments(batch):
    x = data.normalize(batch, mean, std)
    _, out_a = permutations.module_outputs(model, variables_a, x, modules)
    _, out_b = permutations.module_outputs(model, variables_b, x, modules)
    moments = {}
    for m in modules:
      a = out_a[m].reshape(-1, out_a[m].shape[-1]).astype(jnp.float32)
      b = out_b[m].reshape(-1, out_b[m].shape[-1]).astype(jnp.float32)
      moments[m] = (a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), a.T @ b, jnp.float32(a.shape[0]))
    return moments

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(batch_moments, images[0]))
  total, _ = jax.lax.scan(lambda t, batch: (jax.tree.map(jnp.add, t, batch_moments(batch)), None), zeros, images)

  def correlation(m):
    sum_a, sum_b, sq_a, sq_b, cross, count = total[m]
    mean_a, mean_b = sum_a / count, sum_b / count
    std_a = jnp.sqrt(jnp.maximum(sq_a / count - mean_a**2, 0.0)) + 1e-8
    std_b = jnp.sqrt(jnp.maximum(sq_b / count - mean_b**2, 0.0)) + 1e-8
    return (cross / count - jnp.outer(mean_a, mean_b)) / jnp.outer(std_a, std_b)

  perms, matched, initial, units = [], 0.0, 0.0, 0
  for name in names:
    corr = sum(correlation(m) for m in sites[name]) / len(sites[name])
    q = assign(corr, solver)
    perms.append(q)
    matched += corr[jnp.arange(corr.shape[0]), q].sum()
    initial += jnp.trace(corr)
    units += corr.shape[0]
  return tuple(perms), matched / max(units, 1), initial / max(units, 1)


def training_batches(dataset: data.Dataset, count: int, batch_size: int) -> jax.Array:
  """The first `count` whole training batches (fewer if the split is short), uint8 [S, B, ...]:
  the `images` of activation matching (and of BatchNorm re-estimation and REPAIR)."""
  count = max(1, min(len(dataset.train_images), count * batch_size) // batch_size)
  return jnp.asarray(dataset.train_images[:count * batch_size].reshape((count, batch_size) + dataset.image_shape))


def align(method: str, model, variables_a: dict, variables_b: dict, *, images: jax.Array | None = None,
          mean=None, std=None, seed: int = 0, max_iterations: int = 100, solver: str = "auto",
          policy: execution.ExecutionPolicy | None = None) -> tuple[dict, MatchResult]:
  """Model b's variables permuted to match model a, by `method` ('weight' | 'activation').

  Activation matching needs `images` (uint8 [S, B, ...] training batches), `mean`, `std`.
  `policy` decides what solver='auto' means (default `execution.policy()`).
  BatchNorm statistics follow their units, so the aligned model computes what b did.
  """
  check_choice("align", method, METHODS)
  spec = permutations.spec_for(model, variables_a)
  if method == "weight":
    result = weight_matching(spec, variables_a["params"], variables_b["params"], seed=seed,
                             max_iterations=max_iterations, solver=solver, policy=policy)
  else:
    result = activation_matching(model, spec, variables_a, variables_b, images, mean, std, solver=solver, seed=seed,
                                 max_iterations=max_iterations, policy=policy)
  return permutations.permute_variables(spec, variables_b, result.perms), result
