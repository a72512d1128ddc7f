"""Measuring the models of training variants by LMC: each variant's pair, its K models, after alignment.

The `lmc` and `sweep` experiments train variants (vanilla, TNA-PFN, pruning) as stacked
models, `num_models` per variant in order ([variant v's model k] at v * num_models + k),
and measure them the same way here:
  - `measure_curves`: the curve and barriers between models 0 and 1 of each variant, per
    BatchNorm mode, with and without REPAIR, and after post-hoc alignment (`align_pairs`);
  - `measure_k_models`: the barrier matrix of all K models and the accuracy of their K-way
    weight average ("fusion").
Every curve is one compiled call (`interpolation.lmc_curve`); a curve with a non-finite
point is an error (`check_finite_curves`), never a barrier of 0.
"""

import itertools
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from tna_jax.alignment import interpolation, matching
from tna_jax.core import data, evaluate, execution, train
from tna_jax.errors import DivergedError
from tna_jax.fusion import model_soups


def check_finite_curves(*curve_sets: dict) -> None:
  """A curve with a NaN or infinite point has no barrier: that is an error, never a 0."""
  for curves in curve_sets:
    for name, curve in curves.items():
      if name != "alphas" and not all(np.all(np.isfinite(curve[key])) for key in ("loss", "accuracy")):
        raise DivergedError(f"the LMC curve {name!r} has non-finite points (loss {np.asarray(curve['loss'])});"
                                    " its barriers are undefined, so no results were written.")


def pair(config, variables: dict, v: int) -> tuple[dict, dict]:
  """Models 0 and 1 of the v-th variant of the stacked `variables` (`num_models` per variant)."""
  first = v * config.num_models
  return train.unstack(variables, first), train.unstack(variables, first + 1)


def align_pairs(config, model, variables: dict, variants, dataset: data.Dataset,
                policy: execution.ExecutionPolicy) -> dict[str, tuple[dict, matching.MatchResult]]:
  """Model 1 of each variant permuted onto model 0 by `config.align` ({} for 'none')."""
  if config.align == "none":
    return {}
  images = None
  if config.align == "activation":
    images = matching.training_batches(dataset, config.matching.batches, config.batch_size)
  aligned = {}
  for v, variant in enumerate(variants):
    aligned[variant] = matching.align(config.align, model, *pair(config, variables, v), images=images,
                                      mean=dataset.mean, std=dataset.std, seed=config.matching.seed,
                                      max_iterations=config.matching.max_iterations, solver=config.matching.solver,
                                      policy=policy)
    result = aligned[variant][1]
    logging.info("%s matching of %s: %d sweeps, %.2fs (+%.1fs compile), objective %.4g -> %.4g", config.align,
                 variant, result.iterations, result.seconds, result.compile_seconds, result.initial_objective,
                 result.objective)
  return aligned


def curve_summary(alphas: jax.Array, curve: dict) -> dict[str, float]:
  """Endpoint and midpoint accuracies (%) and the barriers of one curve."""
  return {"accuracy_a": 100 * float(curve["accuracy"][0]), "accuracy_b": 100 * float(curve["accuracy"][-1]),
          "accuracy_mid": 100 * float(curve["accuracy"][len(alphas) // 2]),
          **interpolation.barriers(alphas, curve["loss"], curve["accuracy"])}


class Measurement(NamedTuple):
  """What every curve and score of the run is measured on, and how."""

  model: Any
  alphas: jax.Array  # [A] from 0 to 1
  batches: evaluate.Batches  # the test split
  mean: tuple[float, ...]
  std: tuple[float, ...]
  bn_modes: list[str]  # ['raw'] for models without BatchNorm
  reset_images: jax.Array | None  # training batches for BN reset and REPAIR, else None
  alpha_chunk: int
  policy: execution.ExecutionPolicy

  def curve(self, variables_a: dict, variables_b: dict, bn_mode: str, repair: bool = False) -> dict[str, np.ndarray]:
    """The LMC curve from model a to model b (one compiled call), on the host."""
    return jax.device_get(interpolation.lmc_curve(
        self.model, variables_a, variables_b, self.alphas, self.batches, self.mean, self.std, bn_mode=bn_mode,
        repair=repair, reset_images=self.reset_images, alpha_chunk=self.alpha_chunk, policy=self.policy))

  def score(self, variables: dict, bn_mode: str) -> dict[str, float]:
    """Test loss and accuracy of one model, its BatchNorm statistics as the curves of `bn_mode` have them."""
    scores = interpolation.evaluate_point(self.model, variables, self.batches, self.mean, self.std, bn_mode=bn_mode,
                                          reset_images=self.reset_images)
    return {key: float(value) for key, value in jax.device_get(scores).items()}


def make_measurement(config, model, variables: dict, dataset: data.Dataset,
                     policy: execution.ExecutionPolicy) -> Measurement:
  """The test batches, alpha grid, BN modes and reset batches that every curve of the run shares."""
  has_bn = bool(variables.get("batch_stats"))
  bn_modes = config.lmc.bn_modes.split(",") if has_bn else ["raw"]
  reset_images = None
  if "reset" in bn_modes or config.repair:
    reset_images = matching.training_batches(dataset, config.lmc.reset_batches, config.batch_size)
  return Measurement(model=model, alphas=jnp.linspace(0.0, 1.0, config.lmc.num_alphas),
                     batches=evaluate.make_batches(dataset.test_images, dataset.test_labels, config.eval_batch_size),
                     mean=dataset.mean, std=dataset.std, bn_modes=bn_modes, reset_images=reset_images,
                     alpha_chunk=config.lmc.alpha_chunk, policy=policy)


def curve_name(variant: str, bn_mode: str, bn_modes: list[str], repair: bool = False) -> str:
  """'tna', or with several BN modes 'tna (reset BN)', and ' +REPAIR' for a repaired curve."""
  return variant + (f" ({bn_mode} BN)" if len(bn_modes) > 1 else "") + (" +REPAIR" if repair else "")


def measure_curves(config, variables: dict, variants, aligned: dict[str, tuple[dict, matching.MatchResult]],
                   measurement: Measurement):
  """The LMC curve and barriers of each variant's pair (models 0 and 1), per BN mode and
  with and without REPAIR; for aligned variants also between model 0 and aligned model 1.

  Returns (curves, aligned curves, table rows); curve names are `curve_name`s.
  """
  alphas = measurement.alphas
  repairs = (False, True) if config.repair else (False,)
  curves, aligned_curves, rows = {"alphas": np.asarray(alphas)}, {}, []
  for v, variant in enumerate(variants):
    variables_a, variables_b = pair(config, variables, v)
    for bn_mode in measurement.bn_modes:
      for repair in repairs:
        name = curve_name(variant, bn_mode, measurement.bn_modes, repair)
        curves[name] = measurement.curve(variables_a, variables_b, bn_mode, repair)
        row = {"variant": variant, "curve": bn_mode + ("+REPAIR" if repair else ""), "bn_mode": bn_mode,
               "repair": repair, **curve_summary(alphas, curves[name])}
        if variant in aligned:
          aligned_b, result = aligned[variant]
          aligned_curves[name] = measurement.curve(variables_a, aligned_b, bn_mode, repair)
          row.update({f"aligned_{key}": value for key, value in curve_summary(alphas, aligned_curves[name]).items()})
          row.update(match_iterations=result.iterations, match_seconds=result.seconds)
        rows.append(row)
  return curves, aligned_curves, rows


def measure_k_models(config, variables: dict, variants, curves: dict,
                     measurement: Measurement) -> tuple[dict[str, dict], dict[str, dict]]:
  """The barrier matrix of each variant's K models and the score of their weight average.

  Per BN mode: a curve for every two of the K models (models 0 and 1 reuse the pair's curve
  from `curves`; none is aligned or repaired), `interpolation.pairwise_barriers` of them, and
  the K-way uniform average of every variable (`model_soups.uniform_soup`), whose BatchNorm
  statistics are the averaged ones for 'raw' and re-estimated on the reset batches for
  'reset', like the curves' points. Accuracies are in %; `mean_endpoint_accuracy` is the
  mean of the K models scored the same way.

  Returns ({curve name: that section}, {the new curves by name, e.g. 'tna 0-2'}).
  """
  k = config.num_models
  k_models, new_curves = {}, {}
  for v, variant in enumerate(variants):
    stacked = jax.tree.map(lambda x: x[v * k:(v + 1) * k], variables)
    fused = model_soups.uniform_soup(stacked)
    for bn_mode in measurement.bn_modes:
      name = curve_name(variant, bn_mode, measurement.bn_modes)
      pair_curves = {(0, 1): curves[name]}
      for i, j in itertools.combinations(range(k), 2):
        if (i, j) != (0, 1):
          pair_curves[(i, j)] = new_curves[f"{name} {i}-{j}"] = measurement.curve(
              train.unstack(stacked, i), train.unstack(stacked, j), bn_mode)
      matrix = interpolation.pairwise_barriers(measurement.alphas, pair_curves, k)
      fused_scores = measurement.score(fused, bn_mode)
      mean_accuracy = 100 * float(np.mean(matrix.pop("endpoint_accuracy")))
      mean_loss = float(np.mean(matrix.pop("endpoint_loss")))
      k_models[name] = {"variant": variant, "bn_mode": bn_mode, "num_models": k, **matrix,
                        "mean_endpoint_accuracy": mean_accuracy, "mean_endpoint_loss": mean_loss,
                        "fused_accuracy": 100 * fused_scores["accuracy"], "fused_loss": fused_scores["loss"],
                        "fusion_gain_pp": 100 * fused_scores["accuracy"] - mean_accuracy}
  return k_models, new_curves
