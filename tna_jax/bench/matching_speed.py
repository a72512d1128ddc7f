"""Figure `matching_speedup`: weight matching as a host-side numpy + scipy loop (the way
Git Re-Basin's reference code runs it) over this library's one compiled call.

Both do the same work on the same pair of ResNet20 models: the same permutation spec, the
same order of permutations in every sweep (`matching.sweep_order`), the same acceptance
rule (`matching.improves`) and the same assignment solver (scipy). So they run the same
number of sweeps and return the same permutations, which the figure checks. What differs
is how: the baseline re-gathers, for every permutation, each leaf it acts on with all other
permutations applied, in numpy on the host; the library keeps model b permuted on the
device and runs the whole descent as one compiled while loop.

The two models are independent initializations (a trained pair needs a GPU-sized run); the
time per sweep does not depend on training, only the number of sweeps does.
"""

import time

import jax
import numpy as np
import scipy.optimize

from tna_jax.alignment import matching, permutations
from tna_jax.bench import core_figures
from tna_jax.core import models


def host_weight_matching(spec: permutations.PermutationSpec, params_a, params_b, *, seed: int = 0,
                         max_iterations: int = 100) -> tuple[dict[str, np.ndarray], int]:
  """The baseline: coordinate descent in numpy on the host, scipy for each assignment.

  Returns (perms, sweeps) with the library's conventions.
  """
  a, b = (matching.leaves_by_path(jax.device_get(p)) for p in (params_a, params_b))
  sizes, units = dict(spec.sizes), [unit for unit in spec.units() if unit.path in a]
  perms = {name: np.arange(size) for name, size in spec.sizes}
  key = jax.random.key(seed)
  for sweep in range(max_iterations):
    improved = False
    for index in np.asarray(matching.sweep_order(key, sweep, len(spec.names))):
      name = spec.names[index]
      size = sizes[name]
      score = np.zeros((size, size), np.float32)
      for unit in (u for u in units if u.name == name):
        w_b = b[unit.path]
        for other in units:
          if other.path == unit.path and other.name != name:
            w_b = _take_units(w_b, perms[other.name], other.axis, other.inner)
        score += _units_first(a[unit.path], unit, size) @ _units_first(w_b, unit, size).T
      new = scipy.optimize.linear_sum_assignment(score, maximize=True)[1]
      rows = np.arange(size)
      better = bool(matching.improves(score[rows, perms[name]].sum(), score[rows, new].sum()))
      if better:
        perms[name] = new
      improved |= better
    if not improved:
      return perms, sweep + 1
  return perms, max_iterations


def _split(x: np.ndarray, axis: int, size: int, inner: int) -> np.ndarray:
  return x.reshape(x.shape[:axis] + (x.shape[axis] // (size * inner), size, inner) + x.shape[axis + 1:])


def _units_first(x: np.ndarray, unit, size: int) -> np.ndarray:
  return np.moveaxis(_split(x, unit.axis, size, unit.inner), unit.axis + 1, 0).reshape(size, -1)


def _take_units(x: np.ndarray, perm: np.ndarray, axis: int, inner: int) -> np.ndarray:
  return np.take(_split(x, axis, perm.size, inner), perm, axis=axis + 1).reshape(x.shape)


def matching_speedup(quick: bool) -> dict:
  """Seconds of the host loop / seconds of `matching.weight_matching`, same ResNet20 pair."""
  width = 1 if quick else 4
  model = models.get_model({"name": "resnet20", "norm": "batchnorm", "width_multiplier": width}, 10)
  params_a, params_b = (models.init_variables(model, jax.random.key(seed), (32, 32, 3))["params"] for seed in (0, 1))
  spec = permutations.spec_for(model, {"params": params_a})

  start = time.perf_counter()
  first = matching.weight_matching(spec, params_a, params_b, solver="scipy")
  first_call = time.perf_counter() - start
  hungarian = matching.weight_matching(spec, params_a, params_b, solver="hungarian")  # .seconds excludes compiling
  host_perms, host_sweeps = host_weight_matching(spec, params_a, params_b)
  seconds = core_figures.alternate({"host": lambda: host_weight_matching(spec, params_a, params_b),
                            "library": lambda: matching.weight_matching(spec, params_a, params_b, solver="scipy")},
                           rounds=1 if quick else 5)
  host, library = seconds["host"], seconds["library"]
  same = host_sweeps == first.iterations and all(np.array_equal(host_perms[n], first.perms[n]) for n in spec.names)
  return {
      "value": host / library,
      "target": ">= 3",
      "device": core_figures.device(),
      "summary": (f"ResNet20 x{width} ({len(spec.names)} perms, {first.iterations} sweeps): host numpy+scipy "
                  f"{host:.2f}s, compiled {library:.2f}s (+{first.compile_seconds:.1f}s compile once); "
                  f"same result: {same}"),
      "host_seconds": host,
      "library_seconds": library,
      "library_first_call_seconds": first_call,
      "library_compile_seconds": first.compile_seconds,
      "library_hungarian_seconds": hungarian.seconds,
      "sweeps": first.iterations,
      "host_sweeps": host_sweeps,
      "same_permutations": same,
      "parameters": int(sum(x.size for x in jax.tree.leaves(params_a))),
  }
