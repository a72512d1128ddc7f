"""What a config will do, without doing it: `main --dry_run`.

The plan names the work (models trained together, epochs, steps) and its memory: the
parameter and optimizer state of all models, the dataset held on the device, and XLA's own
memory analysis of one compiled training step for all models at once, compiled from
abstract shapes so nothing is loaded or trained.

For configs trained in epochs it also estimates the time: the FLOPs of one training epoch of
all models and of one test evaluation, from XLA's cost analysis of the programs `train.fit`
runs (compiled from abstract shapes on the first local device, every loop step counted:
`tna_jax.core.flops`), over the peak FLOP/s of the current devices or of `device` x
`num_devices` from `flops.PEAKS`. The estimate is the time at that peak: a lower bound,
which ignores communication and whatever runs below the peak (on the 2-core CPU the
quickstart runs at ~0.6-0.7 of its measured matmul peak; BENCHMARKS.md).
"""

import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp

from tna_jax import experiments
from tna_jax.core import evaluate, flops, masks, models, optim, sharding, train
from tna_jax.errors import ConfigError

# (train examples, test examples, image shape, classes) of the image datasets.
DATASET_SPECS = {
    "fashion_mnist": (60000, 10000, (28, 28, 1), 10),
    "mnist": (60000, 10000, (28, 28, 1), 10),
    "cifar10": (50000, 10000, (32, 32, 3), 10),
    "cifar100": (50000, 10000, (32, 32, 3), 100),
}
MIB = 2**20


def plan(config, device: str | None = None, num_devices: int = 1) -> dict[str, Any]:
  """Validates `config` and describes the work and memory of running it, with time estimates
  on the current devices and, given a `device` name of `flops.PEAKS`, on `num_devices` of it."""
  if device is not None and device not in flops.PEAKS:
    raise ConfigError(f"--dry_run_device={device!r} is not a known device; allowed: {', '.join(flops.PEAKS)}.")
  if num_devices < 1:
    raise ConfigError(f"--dry_run_devices={num_devices!r} must be >= 1.")
  module = importlib.import_module(experiments.EXPERIMENTS[config.experiment])
  module.validate(config)
  out: dict[str, Any] = {"experiment": config.experiment, "dataset": config.dataset,
                         "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
  spec = DATASET_SPECS.get(config.dataset)
  if spec is None:
    return out
  num_train = min(config.get("num_train") or spec[0], spec[0])
  image_shape, num_classes = spec[2], spec[3]
  programs = module.planned_programs(config) if hasattr(module, "planned_programs") else []
  if programs:
    num_models = sum(count for _, count in programs)
  else:
    num_models = module.planned_models(config) if hasattr(module, "planned_models") else 1
  if len(programs) > 1:
    out["models_trained_together"] = num_models
    out.update(_programs(programs, num_train, spec, device, num_devices))
    return out
  model = models.get_model(config.model, num_classes)
  variables = jax.eval_shape(functools.partial(models.init_variables, model, jax.random.key(0), image_shape))
  num_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
  batch_size = config.batch_size
  steps = num_train // batch_size
  out.update({
      "train_examples": num_train, "image_shape": image_shape, "model": config.model.name,
      "parameters_per_model": num_params, "models_trained_together": num_models, "batch_size": batch_size,
      "steps_per_epoch": steps, "dataset_on_device_mib": num_train * int(jnp.prod(jnp.array(image_shape))) / MIB,
  })
  if "num_epochs" in config:
    out["total_steps"] = steps * config.num_epochs
  out.update(_step_memory(model, config.optimizer, variables, num_models, batch_size, image_shape))
  if "num_epochs" in config:
    num_test = min(config.get("num_test") or spec[1], spec[1])
    out.update(_time_estimates(config, model, variables, num_models, num_train, num_test, image_shape, device,
                               num_devices)[0])
  return out


def _programs(programs: list[tuple[Any, int]], num_train: int, spec, device: str | None,
              num_devices: int) -> dict[str, Any]:
  """A sweep's plan: per compiled training program (its config and model count), the models,
  their parameters and the program's estimated time; then the estimated time of them all."""
  out: dict[str, Any] = {}
  totals: dict[str, float] = {}
  num_test = min(programs[0][0].get("num_test") or spec[1], spec[1])
  for i, (config, num_models) in enumerate(programs):
    model = models.get_model(config.model, spec[3])
    variables = jax.eval_shape(functools.partial(models.init_variables, model, jax.random.key(0), spec[2]))
    num_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    _, seconds = _time_estimates(config, model, variables, num_models, num_train, num_test, spec[2], device,
                                 num_devices)
    out[f"program {i}"] = (f"{num_models} models of {num_params:,} parameters, " +
                           ", ".join(f"{_seconds(s)} on {name}" for name, s in seconds.items()))
    for name, s in seconds.items():
      totals[name] = totals.get(name, 0.0) + s
  out.update({f"estimated_run ({name})": _seconds(s) for name, s in totals.items()})
  return out


def _time_estimates(config, model, variables, num_models: int, num_train: int, num_test: int, image_shape,
                    device: str | None, num_devices: int) -> tuple[dict[str, Any], dict[str, float]]:
  """FLOPs of a training epoch and an evaluation of all models, and the seconds per epoch
  and per run they take at the peak of the current devices (and of `num_devices` x `device`):
  (the plan's lines, {devices: seconds of the run})."""
  mesh = sharding.make_mesh(num_models, config.batch_size, devices=jax.devices()[:1])
  channels = image_shape[-1]
  mean, std = (0.5,) * channels, (0.25,) * channels  # values do not change the FLOPs
  steps = num_train // config.batch_size
  tx = optim.make_optimizer(config.optimizer, steps * config.num_epochs)
  state = jax.eval_shape(lambda v: train.init_train_state(tx, v, masks.no_mask(v["params"])), variables)
  stacked = jax.tree.map(lambda s: jax.ShapeDtypeStruct((num_models,) + s.shape, s.dtype), state)
  train_epochs = train.make_train_epochs(model, tx, mesh, batch_size=config.batch_size, mean=mean, std=std,
                                         num_examples=num_train, flip=config.augment.flip,
                                         crop_padding=config.augment.crop_padding)
  shape = lambda *dims, dtype=jnp.float32: jax.ShapeDtypeStruct(dims, dtype)
  train_flops = flops.flops(train_epochs.lower(
      stacked, shape(num_models, dtype=jnp.int32), shape(dtype=jnp.int32),
      shape(num_train, *image_shape, dtype=jnp.uint8), shape(num_train, dtype=jnp.int32)).compile())
  eval_batch = min(config.eval_batch_size, num_test)
  eval_steps = -(-num_test // eval_batch)
  batches = evaluate.Batches(shape(eval_steps, eval_batch, *image_shape, dtype=jnp.uint8),
                             shape(eval_steps, eval_batch, dtype=jnp.int32), shape(eval_steps, eval_batch))
  eval_flops = flops.flops(train.make_evaluate_all(model, mesh, mean, std).lower(
      stacked.variables, batches).compile())
  evaluations = len([e for e in range(1, config.num_epochs + 1)
                     if e % config.get("eval_every", 1) == 0 or e == config.num_epochs])
  epoch_flops = train_flops + eval_flops * evaluations / config.num_epochs
  out = {"train_gflop_per_epoch": train_flops / 1e9, "eval_gflop": eval_flops / 1e9}
  here = jax.devices()[0]
  targets = [(f"{jax.device_count()} x {here.device_kind}", flops.device_peak(here), jax.device_count())]
  if device is not None:
    peak = flops.PEAKS[device]
    targets.append((f"{num_devices} x {device}", peak.bf16 or peak.fp32, num_devices))
  run_seconds = {}
  for name, peak, count in targets:
    if peak:
      rate = f"{peak / 1e12:.3g} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:.3g} GFLOP/s"
      out[f"estimated_epoch ({name} at {rate} each)"] = _seconds(epoch_flops / (peak * count))
      run_seconds[name] = epoch_flops * config.num_epochs / (peak * count)
      out[f"estimated_run ({name})"] = _seconds(run_seconds[name])
    else:
      out[f"estimated_epoch ({name})"] = "unknown (no peak known for this device)"
  return out, run_seconds


def _step_memory(model, opt_config, variables, num_models: int, batch_size: int, image_shape) -> dict[str, float]:
  """State size of all models and XLA's memory analysis of one training step of all of them
  vmapped, as accelerators run it (CPU runs them one after another and needs less)."""
  tx = optim.make_optimizer(opt_config, 1)
  state = jax.eval_shape(lambda v: train.init_train_state(tx, v, masks.no_mask(v["params"])), variables)
  stacked = jax.tree.map(lambda s: jax.ShapeDtypeStruct((num_models,) + s.shape, s.dtype), state)
  images = jax.ShapeDtypeStruct((num_models, batch_size) + tuple(image_shape), jnp.float32)
  labels = jax.ShapeDtypeStruct((num_models, batch_size), jnp.int32)
  step = jax.vmap(functools.partial(train.train_step, model, tx))
  out = {"train_state_mib": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(stacked)) / MIB}
  analysis = jax.jit(step).lower(stacked, images, labels).compile().memory_analysis()
  if analysis is not None:
    out["step_temp_mib"] = analysis.temp_size_in_bytes / MIB
    out["step_total_mib"] = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes +
                             analysis.temp_size_in_bytes) / MIB
  return out


def _seconds(seconds: float) -> str:
  """'0.00156 s', '60.1 s', '1,730 s (28.8 min)'."""
  return f"{seconds:.3g} s" if seconds < 1000 else f"{seconds:,.0f} s ({seconds / 60:.1f} min)"
