"""Linear mode connectivity: interpolation curves and barriers.

A whole curve is ONE compiled call: a map over interpolation coefficients (vmapped on
accelerators, in chunks when memory is tight; one after another on CPU, see
`tna_jax.core.execution`) of a scan over test batches, instead of a Python loop that re-enters
the device once per alpha and batch. Options of the curve, applied at every
alpha inside that call: BatchNorm statistics re-estimated on training batches
(`bn_mode='reset'`) and REPAIR (`repair=True`, see `tna_jax.alignment.repair`).

For K models, `pairwise_barriers` turns the curves of all K (K - 1) / 2 pairs into barrier
matrices, and `evaluate_point` scores one model (such as their weight average) the way a
curve scores each of its points.
"""

from collections.abc import Callable, Mapping
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax.alignment import repair as repair_lib
from tna_jax.core import data, evaluate, execution

PyTree = Any
# variables (-> or variables, score_data ->) (loss, accuracy) or {'loss', 'accuracy'}: a user's scoring
ScoreFn = Callable[..., Any]
BN_MODES = ("raw", "reset")


def interpolate(tree_a: PyTree, tree_b: PyTree, alpha: jax.Array) -> PyTree:
  """(1 - alpha) * a + alpha * b for every leaf (params and BatchNorm statistics alike)."""
  return jax.tree.map(lambda a, b: (1 - alpha) * a + alpha * b, tree_a, tree_b)


def reestimate_batch_stats(model, variables: dict, images: jax.Array, mean, std) -> PyTree:
  """BatchNorm running statistics recomputed for `variables` from training batches.

  Each BN layer's statistics become the average over `images` [S, B, ...] of the batch
  statistics, which is what interpolated weights need: the interpolated running stats of
  the endpoints are known to be wrong for the interpolated network (REPAIR). Uses
  `model.clone(bn_momentum=0.0)`, so every batch's train-mode pass returns that batch's
  statistics exactly.
  """
  probe = model.clone(bn_momentum=0.0)

  def step(total, batch):
    _, updated = probe.apply(variables, data.normalize(batch, mean, std), train=True, mutable=["batch_stats"])
    return jax.tree.map(jnp.add, total, updated["batch_stats"]), None

  zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  total, _ = jax.lax.scan(step, zeros, images)
  return jax.tree.map(lambda t: t / images.shape[0], total)


def lmc_curve(model, variables_a: dict, variables_b: dict, alphas: jax.Array,
              batches: evaluate.Batches | None = None, mean=None, std=None, *, bn_mode: str = "raw",
              repair: bool = False, reset_images: jax.Array | None = None, alpha_chunk: int = 0,
              policy: execution.ExecutionPolicy | None = None, score_fn: ScoreFn | None = None,
              score_data: PyTree = None) -> dict[str, jax.Array]:
  """Test loss and accuracy at every alpha of the segment from model a to model b.

  Args:
    model: the flax module of both models (unused, may be None, with `score_fn`).
    variables_a, variables_b: their variables ({'params', maybe 'batch_stats'}).
    alphas: [A] interpolation coefficients (0 = model a, 1 = model b).
    batches: the evaluation split (`evaluate.make_batches`).
    mean, std: normalization of the uint8 images.
    score_fn: instead of `batches`, the user's own scoring: `score_fn(variables)` or, with
      `score_data`, `score_fn(variables, score_data)` returns (loss, accuracy) (or a dict
      with those keys) of interpolated variables, on any data and with any loss. It must be
      jittable; the whole curve is still one compiled call. Pass large arrays as
      `score_data` (an argument of the compiled call) rather than closing over them (they
      would be compiled in as constants). BN reset and REPAIR need the library's batches.
    bn_mode: 'raw' interpolates BatchNorm statistics like any other leaf (the authors'
      protocol); 'reset' re-estimates them for every alpha on `reset_images`.
    repair: applies REPAIR (`repair.repair`) at every alpha, after any BN reset: channel
      statistics are measured on all `reset_images` at once (S * B images per alpha; lower
      `alpha_chunk` if memory is tight) and the endpoints are left unchanged.
    reset_images: uint8 [S, B, H, W, C] training batches for bn_mode='reset' and repair.
    alpha_chunk: alphas evaluated at once (vmapped); 0 = the policy's choice: all of them
      on accelerators, one at a time on CPU.
    policy: where the curve runs (default `execution.policy()`, JAX's default backend).

  Returns:
    {'loss': [A], 'accuracy': [A]}.
  """
  if (score_fn is None) == (batches is None):
    raise ValueError("lmc_curve needs exactly one of batches (with mean, std) and score_fn")
  if bn_mode not in BN_MODES:
    raise ValueError(f"bn_mode={bn_mode!r}; allowed: {BN_MODES}")
  if (bn_mode == "reset" or repair) and reset_images is None:
    raise ValueError("bn_mode='reset' and repair=True need reset_images")
  if alpha_chunk < 0:
    raise ValueError(f"alpha_chunk={alpha_chunk}; allowed: 0 (automatic) or a positive number of alphas")
  alpha_chunk = alpha_chunk or (policy or execution.policy()).alpha_chunk
  if score_fn is not None:
    if bn_mode != "raw" or repair:
      raise ValueError("bn_mode='reset' and repair=True need the library's batches, not score_fn")
    return _scored_curve(score_fn, score_data is not None, alpha_chunk, variables_a, variables_b, alphas, score_data)
  return _curve(model, bn_mode, repair, alpha_chunk, variables_a, variables_b, alphas, batches, mean, std,
                reset_images)


@jax.jit(static_argnames=("model", "bn_mode", "repair", "alpha_chunk", "mean", "std"))
def _curve(model, bn_mode, repair, alpha_chunk, variables_a, variables_b, alphas, batches, mean, std, reset_images):
  apply_fn = evaluate.inference_fn(model)

  def reset(variables):
    return _with_bn_mode(model, bn_mode, variables, reset_images, mean, std)

  if repair:
    images = data.normalize(reset_images.reshape((-1,) + reset_images.shape[2:]), mean, std)
    sites = repair_lib.sites(model, variables_a)
    stats_a, stats_b = (repair_lib.channel_stats(model, reset(v), images, sites) for v in (variables_a, variables_b))

  def at_alpha(alpha):
    variables = reset(interpolate(variables_a, variables_b, alpha))
    if repair:
      variables = repair_lib.repair(model, variables, images, interpolate(stats_a, stats_b, alpha))
    return evaluate.evaluate(apply_fn, variables, batches, mean, std)

  return _over_alphas(at_alpha, alphas, alpha_chunk)


@jax.jit(static_argnames=("score_fn", "with_data", "alpha_chunk"))
def _scored_curve(score_fn, with_data, alpha_chunk, variables_a, variables_b, alphas, score_data):
  def at_alpha(alpha):
    variables = interpolate(variables_a, variables_b, alpha)
    scores = score_fn(variables, score_data) if with_data else score_fn(variables)
    loss, accuracy = (scores["loss"], scores["accuracy"]) if isinstance(scores, Mapping) else scores
    return {"loss": jnp.asarray(loss), "accuracy": jnp.asarray(accuracy)}

  return _over_alphas(at_alpha, alphas, alpha_chunk)


def _with_bn_mode(model, bn_mode: str, variables: dict, reset_images, mean, std) -> dict:
  """`variables` with BatchNorm statistics as `bn_mode` has them: as they are ('raw') or
  re-estimated on `reset_images` ('reset'; a model without BatchNorm is returned as it is)."""
  if bn_mode == "reset" and variables.get("batch_stats"):
    return {**variables, "batch_stats": reestimate_batch_stats(model, variables, reset_images, mean, std)}
  return variables


def evaluate_point(model, variables: dict, batches: evaluate.Batches, mean, std, *, bn_mode: str = "raw",
                   reset_images: jax.Array | None = None) -> dict[str, jax.Array]:
  """Test loss and accuracy of one model, scored as `lmc_curve` scores each point of a curve.

  With bn_mode='reset' its BatchNorm statistics are first re-estimated on `reset_images`, so
  a point off every segment (the weight average of K models, whose averaged running
  statistics are as wrong as interpolated ones) compares with the curves of the same mode.
  One compiled call.

  Returns:
    {'loss': scalar, 'accuracy': scalar}.
  """
  if bn_mode not in BN_MODES:
    raise ValueError(f"bn_mode={bn_mode!r}; allowed: {BN_MODES}")
  if bn_mode == "reset" and reset_images is None:
    raise ValueError("bn_mode='reset' needs reset_images")
  return _point(model, bn_mode, variables, batches, mean, std, reset_images)


@jax.jit(static_argnames=("model", "bn_mode", "mean", "std"))
def _point(model, bn_mode, variables, batches, mean, std, reset_images):
  variables = _with_bn_mode(model, bn_mode, variables, reset_images, mean, std)
  return evaluate.evaluate(evaluate.inference_fn(model), variables, batches, mean, std)


def _over_alphas(at_alpha: Callable, alphas: jax.Array, alpha_chunk: int):
  """`at_alpha` mapped over the alphas: `alpha_chunk` at a time (lax.map), or all vmapped."""
  if alpha_chunk and alpha_chunk < alphas.shape[0]:
    return jax.lax.map(at_alpha, alphas, batch_size=alpha_chunk if alpha_chunk > 1 else None)
  return jax.vmap(at_alpha)(alphas)


def barriers(alphas: np.ndarray, loss: np.ndarray, accuracy: np.ndarray) -> dict[str, float]:
  """Barriers of one curve, measured against the straight line between its endpoints.

  loss_barrier: max_alpha L(alpha) - ((1 - alpha) L(0) + alpha L(1)).
  accuracy_barrier_pp: max_alpha of the accuracy drop below the endpoints' line, in
    percentage points.
  accuracy_barrier_rel: the paper's relative form, that drop divided by the line's
    accuracy at the arg-max.
  Endpoints are taken as the first and last entries, so `alphas` must run from 0 to 1.
  A curve with a non-finite point (a diverged model) has no barrier: every value is NaN,
  never a number that could pass for perfect connectivity.
  """
  alphas, loss, accuracy = (np.asarray(v, np.float64) for v in (alphas, loss, accuracy))
  if not (np.all(np.isfinite(loss)) and np.all(np.isfinite(accuracy))):
    return dict.fromkeys(("loss_barrier", "accuracy_barrier_pp", "accuracy_barrier_rel", "loss_barrier_alpha",
                          "accuracy_barrier_alpha"), float("nan"))
  line_loss = (1 - alphas) * loss[0] + alphas * loss[-1]
  line_acc = (1 - alphas) * accuracy[0] + alphas * accuracy[-1]
  drop = line_acc - accuracy
  worst = int(np.argmax(drop))
  return {
      "loss_barrier": float(np.max(loss - line_loss)),
      "accuracy_barrier_pp": float(100 * drop[worst]),
      "accuracy_barrier_rel": float(drop[worst] / line_acc[worst]) if line_acc[worst] > 0 else 0.0,
      "loss_barrier_alpha": float(alphas[int(np.argmax(loss - line_loss))]),
      "accuracy_barrier_alpha": float(alphas[worst]),
  }


MATRIX_BARRIERS = ("loss_barrier", "accuracy_barrier_pp")


def pairwise_barriers(alphas: np.ndarray, curves: Mapping[tuple[int, int], Mapping[str, Any]],
                      num_models: int) -> dict[str, Any]:
  """The barriers between every two of K models, from the curves of all their pairs.

  A barrier does not depend on which end of the segment is model a, so one curve per pair
  suffices and the matrices are symmetric with a zero diagonal (a model is connected to
  itself).

  Args:
    alphas: [A] the curves' grid, from 0 to 1.
    curves: `curves[(i, j)]` for every i < j < num_models: the curve ({'loss', 'accuracy'},
      as `lmc_curve` returns) from model i to model j.
    num_models: K >= 2.

  Returns:
    For each of `MATRIX_BARRIERS` (loss_barrier, accuracy_barrier_pp): the [K][K] matrix
    (nested lists) and its mean and max over the K (K - 1) / 2 pairs (`<key>_mean`,
    `<key>_max`; NaN when a curve is not finite, see `barriers`); and `endpoint_accuracy`,
    `endpoint_loss` [K]: each model's score where its curves start or end.
  """
  pairs = set(itertools.combinations(range(num_models), 2))
  if num_models < 2 or set(curves) != pairs:
    raise ValueError(f"pairwise_barriers needs num_models >= 2 and exactly one curve per pair (i, j), i < j; got "
                     f"num_models={num_models} and pairs {sorted(curves)}")
  matrices = {key: np.zeros((num_models, num_models)) for key in MATRIX_BARRIERS}
  for (i, j), curve in curves.items():
    result = barriers(alphas, curve["loss"], curve["accuracy"])
    for key, matrix in matrices.items():
      matrix[i, j] = matrix[j, i] = result[key]
  upper = np.triu_indices(num_models, 1)
  summary = {}
  for key, matrix in matrices.items():
    summary.update({key: matrix.tolist(), f"{key}_mean": float(np.mean(matrix[upper])),
                    f"{key}_max": float(np.max(matrix[upper]))})
  # Model i starts its curve to model i + 1; the last model ends the curve from the one before it.
  ends = [curves[(i, i + 1)] for i in range(num_models - 1)]
  for key in ("accuracy", "loss"):
    summary[f"endpoint_{key}"] = [float(curve[key][0]) for curve in ends] + [float(ends[-1][key][-1])]
  return summary
