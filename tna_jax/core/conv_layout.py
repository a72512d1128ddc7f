"""Convolutions in the one layout XLA:CPU runs fast everywhere, including inside loops.

XLA:CPU hands a convolution to its fast (Eigen) kernel only in the layout NHWC x HWIO ->
NHWC, and its pass that transposes other layouts into that one visits only the top level
of a program. The weight gradient of a convolution comes out of JAX's transpose rule in
another layout, so inside a `lax.scan`, `lax.cond` or `while` body (a round of local
training, an epoch as one scan) it runs as a naive loop, 10-30x slower than the same
step outside a loop (jax-ml/jax#12868). `canonical_convolutions` rewrites a function's
convolutions into that layout with explicit transposes before XLA sees them; the results
are identical, since the transposes only move data.
"""

import functools
from typing import Any, Callable

import jax
from jax.extend import core as jex_core
from jax.extend.core import primitives

PyTree = Any


def canonical_convolutions(fn: Callable) -> Callable:
  """`fn` with every convolution in NHWC x HWIO -> NHWC form (transposes around it).

  Traces `fn` at each call (inside the caller's jit), then evaluates its jaxpr with each
  `conv_general_dilated` replaced, inlining nested jit calls so that convolutions inside
  them are reached too. Use it around a training step that runs inside a loop on CPU
  (`execution.ExecutionPolicy.convolutions` does, where the platform is CPU).
  """

  @functools.wraps(fn)
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    flat = _eval(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), flat)

  return wrapped


def _eval(jaxpr: jex_core.Jaxpr, consts, *args) -> list:
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive is primitives.conv_general_dilated_p:
      outvals = [_canonical_conv(*invals, **eqn.params)]
    elif eqn.primitive is primitives.jit_p:
      inner = eqn.params["jaxpr"]
      outvals = _eval(inner.jaxpr, inner.consts, *invals)
    else:
      with eqn.ctx.manager:
        outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outvals = outvals if eqn.primitive.multiple_results else [outvals]
    for var, value in zip(eqn.outvars, outvals):
      if not isinstance(var, jex_core.DropVar):
        env[var] = value
  return [read(v) for v in jaxpr.outvars]


def _canonical_conv(lhs, rhs, *, dimension_numbers, **params):
  """The same convolution with operands transposed to (batch, spatial..., feature) and
  (spatial..., in, out), and the NHWC result transposed back to the requested layout."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  n = lhs.ndim
  canonical = type(dimension_numbers)((0, n - 1) + tuple(range(1, n - 1)), (n - 1, n - 2) + tuple(range(n - 2)),
                                      (0, n - 1) + tuple(range(1, n - 1)))
  if tuple(dimension_numbers) == tuple(canonical):
    return primitives.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=dimension_numbers, **params)
  lhs = lhs.transpose((lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],))
  rhs = rhs.transpose(tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0]))
  out = primitives.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=canonical, **params)
  # Canonical output axes: batch 0, spatial k at 1 + k, feature n - 1; put each where out_spec wants it.
  source = {out_spec[0]: 0, out_spec[1]: n - 1, **{d: 1 + k for k, d in enumerate(out_spec[2:])}}
  return out.transpose(tuple(source[j] for j in range(n)))
