"""Post-hoc alignment: the permutations of model b's units that make it most like model a.

Two searches over the permutations of a `permutations.PermutationSpec`:

- Weight matching (Git Re-Basin): coordinate descent. Each sweep visits the permutations in
  a random order; for each one, the other permutations held fixed, the best permutation
  maximizes sum over its leaves of <w_a, P w_b> = a linear assignment on the matrix
  sum_leaves W_a W_b^T (units as rows). Sweeps repeat until none improves. The whole
  descent is ONE compiled call (a while loop of sweeps, each a loop over permutations
  switching to that permutation's update), with model b kept permuted as it goes, so each
  update costs one matrix product per leaf and no host round trip.
- Activation matching: the correlation of the two models' units on training batches
  (accumulated in one scan), then one assignment per permutation.

Linear assignments are solved either by optax's jittable Hungarian algorithm (on device)
or by scipy's `linear_sum_assignment` through a host callback; 'auto' takes the host
solver on CPU, where it is faster, and the device solver on accelerators.
"""

import dataclasses
import functools
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from tna_jax import data, permutations, tree_utils
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
  iterations: int  # coordinate-descent sweeps; 1 for activation matching
  seconds: float  # wall time of the compiled search, compilation excluded
  compile_seconds: float  # 0 when an earlier call compiled the same search
  objective: float  # weight: sum of <a, P b> over permuted leaves; activation: mean matched correlation
  initial_objective: float  # the same before permuting

  def summary(self) -> dict[str, float]:
    """The numbers worth reporting, JSON-ready."""
    return {"iterations": self.iterations, "seconds": self.seconds, "compile_seconds": self.compile_seconds,
            "objective": self.objective, "initial_objective": self.initial_objective}


def resolve_solver(solver: str) -> str:
  """'hungarian' or 'scipy' for `solver`; 'auto' picks the faster one for this backend."""
  check_choice("matching.solver", solver, SOLVERS)
  if solver == "auto":
    return "scipy" if jax.default_backend() == "cpu" else "hungarian"
  return solver


def assign(score: jax.Array, solver: str) -> jax.Array:
  """The assignment q (row i -> column q[i]) maximizing sum_i score[i, q[i]]; jittable."""
  if solver == "hungarian":
    rows, cols = optax.assignment.hungarian_algorithm(-score)
    return jnp.zeros(score.shape[0], jnp.int32).at[rows].set(cols.astype(jnp.int32))
  check_choice("matching.solver", solver, ("hungarian", "scipy"))
  return jax.pure_callback(_scipy_assign, jax.ShapeDtypeStruct(score.shape[:1], jnp.int32), score)


def _scipy_assign(score: np.ndarray) -> np.ndarray:
  return scipy.optimize.linear_sum_assignment(np.asarray(score), maximize=True)[1].astype(np.int32)


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
  """For each permutation, the (leaf, axis) pairs of `flat` it acts on."""
  return {name: tuple((path, axis) for path, axis in spec.axes_of(name) if path in flat) for name in spec.names}


# Compiled searches by (function, static arguments, argument structure and shapes): a
# repeated search (the next variant's pair, a benchmark repeat) skips tracing as well as
# compiling, which for a ResNet costs more than the search itself.
_EXECUTABLES: dict[tuple, Any] = {}


def _compile_and_run(jitted, static: tuple, dynamic: tuple) -> tuple[Any, float, float]:
  """Runs `jitted(*static, *dynamic)` compiled ahead of time; returns (output, run seconds,
  compile seconds), the latter 0 when this signature was compiled before."""
  leaves, treedef = jax.tree.flatten(dynamic)
  signature = (jitted, static, treedef, tuple(jax.typeof(x) for x in leaves))
  compile_seconds = 0.0
  if signature not in _EXECUTABLES:
    start = time.perf_counter()
    _EXECUTABLES[signature] = jitted.lower(*static, *dynamic).compile()
    compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(_EXECUTABLES[signature](*dynamic))
  return out, time.perf_counter() - start, compile_seconds


def weight_matching(spec: permutations.PermutationSpec, params_a: PyTree, params_b: PyTree, *, seed: int = 0,
                    max_iterations: int = 100, solver: str = "auto") -> MatchResult:
  """Permutations of model b's units that maximize sum over leaves of <a, P b>.

  Args:
    spec: the models' permutation spec (`permutations.spec_for`).
    params_a, params_b: the two models' params.
    seed: decides the order in which each sweep visits the permutations.
    max_iterations: at most this many sweeps (the descent usually stops earlier).
    solver: 'auto', 'hungarian' (optax, on device) or 'scipy' (host callback).

  Returns:
    A MatchResult; `permutations.permute_variables(spec, variables_b, result.perms)` is
    model b aligned to model a.
  """
  flat_a, flat_b = leaves_by_path(params_a), leaves_by_path(params_b)
  (perms, sweeps, objective, initial), seconds, compile_seconds = _compile_and_run(
      _weight_matching, (spec, resolve_solver(solver), max_iterations), (flat_a, flat_b, jax.random.key(seed)))
  return MatchResult(perms=dict(zip(spec.names, perms)), iterations=int(sweeps), seconds=seconds,
                     compile_seconds=compile_seconds, objective=float(objective), initial_objective=float(initial))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _weight_matching(spec, solver, max_iterations, flat_a, flat_b, key):
  names, sizes = spec.names, dict(spec.sizes)
  leaves = _permuted_leaves(spec, flat_a)
  permuted = sorted({path for pairs in leaves.values() for path, _ in pairs})

  def objective(b):
    return sum(jnp.vdot(flat_a[path], b[path]) for path in permuted)

  def update(index):
    name, size = names[index], sizes[names[index]]

    def step(carry):
      perms, b, improved = carry
      # Rows: units of a; columns: units of b as currently permuted, so the current
      # permutation is the identity and the assignment is relative to it.
      score = sum(permutations.unit_products(flat_a[path], b[path], axis, size) for path, axis in leaves[name])
      q = assign(score, solver)
      better = improves(jnp.trace(score), score[jnp.arange(size), q].sum())
      q = jnp.where(better, q, jnp.arange(size))
      moved = jax.lax.cond(better, lambda: {path: permutations.take_units(b[path], q, axis)
                                            for path, axis in leaves[name]},
                           lambda: {path: b[path] for path, _ in leaves[name]})
      b = {**b, **moved}
      perms = perms[:index] + (perms[index][q],) + perms[index + 1:]
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


def activation_matching(model, spec: permutations.PermutationSpec, variables_a: dict, variables_b: dict,
                        images: jax.Array, mean, std, *, solver: str = "auto") -> MatchResult:
  """Permutations pairing each unit of a with the unit of b it correlates with most.

  Args:
    model: the flax module of both models.
    spec: its permutation spec; its sites say which module outputs carry each permutation
      (a permutation with several sites averages their correlation matrices).
    variables_a, variables_b: the two models' variables.
    images: uint8 training batches [S, B, H, W, C]; activations are read in inference mode.
    mean, std: normalization of the images.
    solver: 'auto', 'hungarian' or 'scipy'.
  """
  (perms, matched, initial), seconds, compile_seconds = _compile_and_run(
      _activation_matching, (model, spec, resolve_solver(solver), tuple(mean), tuple(std)),
      (variables_a, variables_b, jnp.asarray(images)))
  return MatchResult(perms=dict(zip(spec.names, perms)), iterations=1, seconds=seconds,
                     compile_seconds=compile_seconds, objective=float(matched), initial_objective=float(initial))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _activation_matching(model, spec, solver, mean, std, variables_a, variables_b, images):
  sites = dict(spec.sites)
  modules = sorted({m for name in spec.names for m in sites[name]})

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
  for name in spec.names:
    corr = sum(correlation(m) for m in sites[name]) / len(sites[name])
    q = assign(corr, solver)
    perms.append(q)
    matched += corr[jnp.arange(corr.shape[0]), q].sum()
    initial += jnp.trace(corr)
    units += corr.shape[0]
  return tuple(perms), matched / max(units, 1), initial / max(units, 1)


def align(method: str, model, variables_a: dict, variables_b: dict, *, images: jax.Array | None = None,
          mean=None, std=None, seed: int = 0, max_iterations: int = 100,
          solver: str = "auto") -> tuple[dict, MatchResult]:
  """Model b's variables permuted to match model a, by `method` ('weight' | 'activation').

  Activation matching needs `images` (uint8 [S, B, ...] training batches), `mean`, `std`.
  BatchNorm statistics follow their units, so the aligned model computes what b did.
  """
  check_choice("align", method, METHODS)
  spec = permutations.spec_for(model, variables_a)
  if method == "weight":
    result = weight_matching(spec, variables_a["params"], variables_b["params"], seed=seed,
                             max_iterations=max_iterations, solver=solver)
  else:
    result = activation_matching(model, spec, variables_a, variables_b, images, mean, std, solver=solver)
  return permutations.permute_variables(spec, variables_b, result.perms), result
