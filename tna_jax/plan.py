"""What a config will do, without doing it: `main --dry_run`.

The plan names the work (models trained together, epochs, steps) and its memory: the
parameter and optimizer state of all models, the dataset held on the device, and XLA's own
memory analysis of one compiled training step for all models at once, compiled from
abstract shapes so nothing is loaded or trained.
"""

import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp

from tna_jax import experiments, masks, models, optim, train

# (train examples, test examples, image shape, classes) of the image datasets.
DATASET_SPECS = {
    "fashion_mnist": (60000, 10000, (28, 28, 1), 10),
    "mnist": (60000, 10000, (28, 28, 1), 10),
    "cifar10": (50000, 10000, (32, 32, 3), 10),
    "cifar100": (50000, 10000, (32, 32, 3), 100),
}
MIB = 2**20


def plan(config) -> dict[str, Any]:
  """Validates `config` and describes the work and memory of running it."""
  module = importlib.import_module(experiments.EXPERIMENTS[config.experiment])
  module.validate(config)
  out: dict[str, Any] = {"experiment": config.experiment, "dataset": config.dataset,
                         "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
  spec = DATASET_SPECS.get(config.dataset)
  if spec is None:
    return out
  num_train = min(config.get("num_train") or spec[0], spec[0])
  image_shape, num_classes = spec[2], spec[3]
  num_models = module.planned_models(config) if hasattr(module, "planned_models") else 1
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
  return out


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
