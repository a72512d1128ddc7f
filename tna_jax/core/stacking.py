"""One function over K stacked models (or interpolation coefficients) in one compiled call.

Everything that handles several models at once (training the K models of an experiment,
evaluating them, the alphas of an LMC curve, soups) runs a per-model function over the
leading axis of stacked pytrees. There are two ways to do that inside one program:

- batched (`jax.vmap`): the accelerator default. The K models become one wider program
  and, on a mesh, are spread over its 'models' axis.
- one after another (`jax.lax.map`): the CPU default. A vmapped convolution over stacked
  weights becomes a grouped convolution, which XLA:CPU runs far slower than K plain ones
  (an LMC curve of the CNN, 21 alphas x 10,000 images: 59.7 s batched, 3.7 s one after
  another), and batching gains nothing on a compute-bound CPU even without convolutions
  (4 MLPs 4x512 trained: batched 0.51 s, one after another 0.45 s; BENCHMARKS.md).

Both give the same numbers up to float rounding; only the speed differs. Which one a run
uses is `execution.ExecutionPolicy.sequential`.
"""

from typing import Callable, Sequence

import jax


def map_stacked(fn: Callable, *, sequential: bool, in_axes: int | None | Sequence[int | None] = 0,
                spmd_axis_name: str | None = None) -> Callable:
  """`fn` mapped over the leading axis of the arguments whose `in_axes` entry is 0.

  Arguments with `in_axes` None are shared by every call. `sequential` picks `lax.map`
  (one after another inside the program) over `vmap` (batched; `spmd_axis_name` names the
  mesh axis the stacked axis is sharded on). Outputs are stacked on axis 0 either way.
  """
  if not sequential:
    return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=spmd_axis_name)

  def mapped(*args):
    axes = tuple(in_axes) if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    if len(axes) != len(args) or any(a not in (0, None) for a in axes):
      raise ValueError(f"in_axes={in_axes!r} for {len(args)} arguments; allowed: 0 or None per argument")

    def one(stacked):
      rest = iter(stacked)
      return fn(*(next(rest) if axis == 0 else arg for arg, axis in zip(args, axes)))

    return jax.lax.map(one, tuple(arg for arg, axis in zip(args, axes) if axis == 0))

  return mapped

