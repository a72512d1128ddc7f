"""The `lmc` experiment: vanilla vs TNA-PFN vs pruning-at-init, measured by LMC barriers.

All models start from one initialization. Each variant trains `num_models` models that
differ only in data order; TNA-PFN and pruning share one mask. Every model of every variant
trains in ONE vmapped program, then each variant's pair (models 0 and 1) gets an LMC curve
(one compiled call each), and for BatchNorm models a second curve with statistics
re-estimated at every alpha.

Writes to the workdir: results.json, lmc_curves.png, metrics.jsonl (per epoch) and orbax
checkpoints (checkpoints/init, checkpoints/mask, checkpoints/<variant>_<k>).
"""

import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import checkpoints, data, evaluate, lmc, masks, models, optim, reporting, train
from tna_jax.errors import ConfigError, check_choice

VARIANTS = ("vanilla", "tna", "pruning")

TABLE_COLUMNS = (
    ("variant", "variant", "s"),
    ("curve", "bn_mode", "s"),
    ("acc A %", "accuracy_a", ".2f"),
    ("acc B %", "accuracy_b", ".2f"),
    ("mid acc %", "accuracy_mid", ".2f"),
    ("loss barrier", "loss_barrier", ".4f"),
    ("acc barrier pp", "accuracy_barrier_pp", ".2f"),
    ("acc barrier rel", "accuracy_barrier_rel", ".4f"),
)


def variants_of(config) -> tuple[str, ...]:
  """The variants to train, from the comma-separated `config.variants`."""
  names = tuple(v.strip() for v in config.variants.split(",") if v.strip())
  if not names:
    raise ConfigError(f"variants={config.variants!r} names no variant; allowed: {', '.join(VARIANTS)}.")
  for name in names:
    check_choice("variants", name, VARIANTS)
  return names


def validate(config) -> None:
  """Checks every value the run depends on before any data is read or file written."""
  check_choice("dataset", config.dataset, data.DATASET_NAMES)
  check_choice("model.name", config.model.name, models.MODEL_NAMES)
  check_choice("optimizer.name", config.optimizer.name, optim.OPTIMIZERS)
  check_choice("mask.granularity", config.mask.granularity, masks.GRANULARITIES)
  for key, value in (("mask.fixed_fraction", config.mask.fixed_fraction), ("pruning_fraction", config.pruning_fraction)):
    if not 0.0 <= value < 1.0:
      raise ConfigError(f"{key}={value!r} is out of range; allowed: 0 <= {key} < 1.")
  variants_of(config)
  for key, value, low in (("num_models", config.num_models, 2), ("num_epochs", config.num_epochs, 1),
                          ("batch_size", config.batch_size, 1), ("lmc.num_alphas", config.lmc.num_alphas, 2)):
    if value < low:
      raise ConfigError(f"{key}={value!r} must be >= {low}.")
  for mode in config.lmc.bn_modes.split(","):
    check_choice("lmc.bn_modes", mode, lmc.BN_MODES)


def check_workdir(workdir: str, overwrite: bool) -> None:
  """Refuses to run over an earlier run's results unless asked to."""
  if os.path.exists(os.path.join(workdir, "results.json")) and not overwrite:
    raise ConfigError(f"workdir {workdir!r} already holds results.json; use a new --workdir or pass "
                      "--config.overwrite=True to replace it.")


def run(config, workdir: str) -> dict[str, Any]:
  """Trains the variants, measures their LMC curves and writes everything to `workdir`."""
  validate(config)
  check_workdir(workdir, config.overwrite)
  dataset = data.load_dataset(config.dataset, config.data_dir, config.num_train or None, config.num_test or None)
  model = models.get_model(config.model, dataset.num_classes)
  variables = models.init_variables(model, jax.random.key(config.init_seed), dataset.image_shape)
  params = variables["params"]
  mask_args = dict(seed=config.mask.seed, granularity=config.mask.granularity, include=config.mask.include,
                   exclude=config.mask.exclude)
  tna_mask = masks.fixed_mask(params, config.mask.fixed_fraction, **mask_args)
  pruning_mask = masks.fixed_mask(params, config.pruning_fraction, **mask_args)
  starts = {
      "vanilla": (variables, masks.no_mask(params)),
      "tna": (variables, tna_mask),
      "pruning": ({**variables, "params": masks.prune(params, pruning_mask)}, pruning_mask),
  }
  variants = variants_of(config)
  k = config.num_models
  logging.info("Model %s: %d parameters; fixed fraction %.3f (tna), %.3f (pruning)", config.model.name,
               sum(p.size for p in jax.tree.leaves(params)), masks.fraction_fixed(tna_mask),
               masks.fraction_fixed(pruning_mask))

  steps_per_epoch = len(dataset.train_labels) // config.batch_size
  tx = optim.make_optimizer(config.optimizer, steps_per_epoch * config.num_epochs)
  states = train.stack([train.init_train_state(tx, *starts[v]) for v in variants for _ in range(k)])
  names = [f"{v}_{i}" for v in variants for i in range(k)]
  data_seeds = [config.data_seed + i for _ in variants for i in range(k)]

  os.makedirs(workdir, exist_ok=True)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    os.remove(metrics_path)
  start = time.perf_counter()
  states, history = train.fit(
      model, tx, states, data_seeds, dataset, num_epochs=config.num_epochs, batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size, flip=config.augment.flip, crop_padding=config.augment.crop_padding,
      on_epoch=lambda record: reporting.append_jsonl(metrics_path, {"models": names, **record}))
  train_seconds = time.perf_counter() - start

  start = time.perf_counter()
  curves, rows = measure_curves(config, model, states, variants, dataset)
  lmc_seconds = time.perf_counter() - start

  results = {
      "config": config.to_dict(),
      "models": names,
      "final": {n: {key: history[-1][key][i] for key in ("test_accuracy", "test_loss")} for i, n in enumerate(names)},
      "alphas": curves.pop("alphas"),
      "curves": curves,
      "summary": rows,
      "train_seconds": train_seconds,
      "lmc_seconds": lmc_seconds,
  }
  write_outputs(workdir, config, results, variables, tna_mask, states, names)
  print(f"\nLMC between models 0 and 1 of each variant ({config.model.name} on {config.dataset}, "
        f"{config.num_epochs} epochs, train {train_seconds:.0f}s, curves {lmc_seconds:.1f}s):")
  print(reporting.format_table(rows, TABLE_COLUMNS))
  print(f"\nResults, curves and checkpoints in {workdir}")
  return results


def measure_curves(config, model, states: train.TrainState, variants, dataset: data.Dataset):
  """The LMC curve and barriers of each variant's pair (models 0 and 1)."""
  alphas = jnp.linspace(0.0, 1.0, config.lmc.num_alphas)
  batches = evaluate.make_batches(dataset.test_images, dataset.test_labels, config.eval_batch_size)
  has_bn = bool(states.batch_stats)
  bn_modes = config.lmc.bn_modes.split(",") if has_bn else ["raw"]
  reset_images = None
  if "reset" in bn_modes:
    count = min(len(dataset.train_images), config.lmc.reset_batches * config.batch_size) // config.batch_size
    reset_images = jnp.asarray(dataset.train_images[:count * config.batch_size].reshape(
        (count, config.batch_size) + dataset.image_shape))
  curves, rows = {"alphas": np.asarray(alphas)}, []
  for v, variant in enumerate(variants):
    first = v * config.num_models
    variables_a = train.unstack(states.variables, first)
    variables_b = train.unstack(states.variables, first + 1)
    for bn_mode in bn_modes:
      curve = jax.device_get(lmc.lmc_curve(model, variables_a, variables_b, alphas, batches, dataset.mean,
                                            dataset.std, bn_mode=bn_mode, reset_images=reset_images,
                                            alpha_chunk=config.lmc.alpha_chunk))
      name = variant if len(bn_modes) == 1 else f"{variant} ({bn_mode} BN)"
      curves[name] = curve
      mid = len(alphas) // 2
      rows.append({"variant": variant, "bn_mode": bn_mode, "accuracy_a": 100 * float(curve["accuracy"][0]),
                   "accuracy_b": 100 * float(curve["accuracy"][-1]),
                   "accuracy_mid": 100 * float(curve["accuracy"][mid]),
                   **lmc.barriers(alphas, curve["loss"], curve["accuracy"])})
  return curves, rows


def write_outputs(workdir: str, config, results: dict, init_variables: dict, mask, states: train.TrainState,
                  names: list[str]) -> None:
  """results.json, the curves' PNG and orbax checkpoints of init, mask and every model."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  checkpoints.save(os.path.join(ckpt_dir, "init"), init_variables)
  checkpoints.save(os.path.join(ckpt_dir, "mask"), mask)
  for i, name in enumerate(names):
    checkpoints.save(os.path.join(ckpt_dir, name), train.unstack(states.variables, i))
  reporting.plot_curves(os.path.join(workdir, "lmc_curves.png"), results["alphas"], results["curves"],
                        f"LMC: {config.model.name} on {config.dataset}")
  reporting.write_json(os.path.join(workdir, "results.json"), results)
