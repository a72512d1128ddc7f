"""Optimizers as optax chains that end with the TNA-PFN freeze.

The chain order is the point: decay, momentum/Adam moments and the learning rate all act
before `masks.freeze`, so fixed entries get an update of exactly zero whatever they do.
"""

from typing import Any

import ml_collections
import optax

from tna_jax.core import masks
from tna_jax.errors import ConfigError, check_choice

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


def make_schedule(learning_rate: float, schedule: str, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Learning rate per step: constant or cosine decay to 0, with optional linear warmup."""
  check_choice("optimizer.schedule", schedule, SCHEDULES)
  if learning_rate <= 0:
    raise ConfigError(f"optimizer.learning_rate={learning_rate!r} must be > 0.")
  if schedule == "constant":
    main = optax.constant_schedule(learning_rate)
  else:
    main = optax.cosine_decay_schedule(learning_rate, max(1, total_steps - warmup_steps))
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def make_optimizer(opt_config: Any, total_steps: int) -> optax.GradientTransformationExtraArgs:
  """Builds the chain from `config.optimizer`; its update takes `fixed_mask=`.

  opt_config fields: name (sgd | adam | adamw), learning_rate, momentum, nesterov,
  weight_decay (L2 added to the gradient for sgd/adam, decoupled for adamw), schedule,
  warmup_steps, grad_clip (global norm, 0 = off); a plain dict works too.
  """
  opt_config = ml_collections.ConfigDict(opt_config) if isinstance(opt_config, dict) else opt_config
  name = opt_config.name
  check_choice("optimizer.name", name, OPTIMIZERS)
  lr = make_schedule(opt_config.learning_rate, opt_config.get("schedule", "constant"), total_steps,
                     opt_config.get("warmup_steps", 0))
  weight_decay = opt_config.get("weight_decay", 0.0)
  if weight_decay < 0:
    raise ConfigError(f"optimizer.weight_decay={weight_decay!r} must be >= 0.")
  chain = []
  if opt_config.get("grad_clip", 0.0):
    chain.append(optax.clip_by_global_norm(opt_config.grad_clip))
  if name == "sgd":
    chain.append(optax.add_decayed_weights(weight_decay))
    momentum = opt_config.get("momentum", 0.0)
    if momentum:
      chain.append(optax.trace(decay=momentum, nesterov=opt_config.get("nesterov", False)))
  elif name == "adam":
    chain += [optax.add_decayed_weights(weight_decay), optax.scale_by_adam()]
  else:
    chain += [optax.scale_by_adam(), optax.add_decayed_weights(weight_decay)]
  chain += [optax.scale_by_learning_rate(lr), masks.freeze()]
  return optax.chain(*chain)
