"""Evaluation as one pure scan over fixed-size batches, so callers can vmap it (over
models, over interpolation coefficients) and compile the whole thing once."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tna_jax.core import data

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


class Batches(NamedTuple):
  """A split cut into S equal batches; padding examples carry weight 0."""

  images: jax.Array  # uint8 [S, B, H, W, C]
  labels: jax.Array  # int32 [S, B]
  weights: jax.Array  # float32 [S, B]


def make_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Batches:
  """Pads the split to a multiple of `batch_size` so every example counts exactly once."""
  n = len(images)
  batch_size = min(batch_size, n)
  steps = -(-n // batch_size)
  pad = steps * batch_size - n
  images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
  weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  shape = (steps, batch_size)
  return Batches(jnp.asarray(images.reshape(shape + images.shape[1:])), jnp.asarray(labels.reshape(shape)),
                 jnp.asarray(weights.reshape(shape)))


def evaluate(apply_fn: ApplyFn, variables: PyTree, batches: Batches, mean, std) -> dict[str, jax.Array]:
  """Mean cross-entropy loss and accuracy of `apply_fn(variables, x)` over all batches."""

  def step(totals, batch):
    images, labels, weights = batch
    logits = apply_fn(variables, data.normalize(images, mean, std))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return (totals[0] + jnp.sum(weights * loss), totals[1] + jnp.sum(weights * correct)), None

  (loss_sum, correct_sum), _ = jax.lax.scan(step, (jnp.zeros(()), jnp.zeros(())), tuple(batches))
  count = jnp.sum(batches.weights)
  return {"loss": loss_sum / count, "accuracy": correct_sum / count}


def inference_fn(model) -> ApplyFn:
  """`apply_fn` for evaluation mode (BatchNorm uses its running statistics)."""
  return lambda variables, x: model.apply(variables, x, train=False)
