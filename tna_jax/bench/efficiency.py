"""How close training runs to the machine's limit: the quickstart MLP's training against a
minimal hand-written loop (`train_efficiency`) and against the measured matmul peak of the
same machine (`peak_fraction`).

Both figures time one measurement, shared when they run in the same process: the
quickstart's epoch as `train.fit` runs it (K=2 models with TNA-PFN masks, the on-device
uint8 dataset shuffled per epoch, then both models evaluated on the test set) and the
baseline, alternating over rounds.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tna_jax import evaluate, execution, flops, sharding, stacking
from tna_jax.bench import core

K, BATCH, EVAL_BATCH = 2, 128, 1000  # the quickstart's models per variant, batch and eval batch


def minimal_epoch(model, tx: optax.GradientTransformation):
  """`epoch(params, opt_state, images, labels) -> (params, opt_state, mean loss)`: one model,
  one `lax.scan` over batches already cut, normalized and float32 on the device; nothing else."""

  def step(carry, batch):
    params, opt_state = carry
    images, labels = batch
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, images, train=True), labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def epoch(params, opt_state, images, labels):
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (images, labels))
    return params, opt_state, losses.mean()

  return jax.jit(epoch, donate_argnums=(0, 1))


@functools.cache
def measure(quick: bool) -> dict:
  """Seconds per call of the library's training epoch, its evaluation and the baseline epoch,
  alternated over rounds, with the training epoch's FLOPs."""
  num_train, num_test, rounds = (2048, 1000, 1) if quick else (None, None, 3)
  dataset = core.fashion_mnist().subset(num_train, num_test)
  trainer = core.Trainer(core.MLP, dataset, BATCH, fixed_fraction=0.4)
  states, seeds = trainer.states(K), jnp.arange(K)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), states)
  train_epochs = trainer.train_epochs.lower(abstract, seeds, 0, trainer.images, trainer.labels).compile()
  evaluate_one = functools.partial(evaluate.evaluate, evaluate.inference_fn(trainer.model), mean=dataset.mean,
                                   std=dataset.std)
  evaluate_all = jax.jit(stacking.map_stacked(evaluate_one, sequential=execution.policy(trainer.mesh).sequential,
                                              in_axes=(0, None), spmd_axis_name=sharding.MODELS))
  test_batches = evaluate.make_batches(dataset.test_images, dataset.test_labels, EVAL_BATCH)

  steps = len(dataset.train_labels) // BATCH
  images = jnp.asarray(((dataset.train_images[:steps * BATCH] / 255.0 - dataset.mean) / dataset.std)
                       .astype(np.float32).reshape(steps, BATCH, -1))
  labels = jnp.asarray(dataset.train_labels[:steps * BATCH].reshape(steps, BATCH))
  tx = optax.chain(optax.add_decayed_weights(core.SGD["weight_decay"]),
                   optax.sgd(core.SGD["learning_rate"], momentum=core.SGD["momentum"]))
  baseline_epoch = minimal_epoch(trainer.model, tx)
  params = jax.tree.map(lambda x: x[0], states.params)
  box = {"states": states, "params": params, "opt_state": tx.init(params)}
  baseline_flops = flops.flops(baseline_epoch.lower(params, box["opt_state"], images, labels).compile())

  def train_call():  # the states are donated, so kept here
    box["states"], metrics = train_epochs(box["states"], seeds, 0, trainer.images, trainer.labels)
    return metrics

  def baseline_call():
    box["params"], box["opt_state"], loss = baseline_epoch(box["params"], box["opt_state"], images, labels)
    return loss

  evaluate_call = lambda: sharding.fetch(evaluate_all(box["states"].variables, test_batches))
  seconds = core.alternate({"train": train_call, "evaluate": evaluate_call, "baseline": baseline_call}, rounds)
  return {"seconds": seconds, "train_flops": flops.flops(train_epochs), "baseline_flops": baseline_flops,
          "steps": steps,
          "num_train": len(dataset.train_labels), "num_test": len(dataset.test_labels)}


def train_efficiency(quick: bool) -> dict:
  """Throughput of the library's training / a minimal hand-written loop, per model-epoch.

  The library trains the quickstart's MLP 4x512 as `train.fit` does per epoch: K=2 models
  with 40 % of the entries fixed, in one call that shuffles and normalizes the uint8 dataset
  on the device, then one call that evaluates both on the test set. The baseline trains one
  model with optax SGD (momentum, weight decay) in a `lax.scan` over the same Fashion-MNIST
  batches of 128, already normalized float32 on the device, in a fixed order, no mask, no
  evaluation.
  """
  m = measure(quick)
  s = m["seconds"]
  library = (s["train"] + s["evaluate"]) / K
  return {"value": s["baseline"] / library, "target": ">= 0.95", "device": core.device(), "k": K,
          "batch_size": BATCH, "num_train": m["num_train"], "num_test": m["num_test"],
          "library_model_epoch_s": library, "library_train_call_s": s["train"],
          "library_evaluate_call_s": s["evaluate"], "baseline_model_epoch_s": s["baseline"],
          "training_only_ratio": s["baseline"] / (s["train"] / K),
          "summary": f"MLP 4x512, {m['num_train']} images: {library:.3f} s per model-epoch (train "
                     f"{s['train'] / K:.3f} + evaluate {s['evaluate'] / K:.3f}) vs minimal loop {s['baseline']:.3f} s"}


def peak_fraction(quick: bool) -> dict:
  """FLOP/s of the library's MLP training epoch / the measured CPU matmul peak.

  FLOPs from XLA's cost analysis of the compiled epoch (K=2 models, every step counted,
  `tna_jax.flops`), over its median time; the peak is the best of a jitted 2048 x 2048 float32
  matmul on the same machine (`flops.cpu_matmul_peak`); on an accelerator the published
  bf16 peak of the chip would be the reference instead. The minimal loop of
  `train_efficiency` is measured the same way (`baseline_fraction`): what batches of 128
  allow at all.
  """
  m = measure(quick)
  achieved = flops.achieved(m["train_flops"], m["seconds"]["train"])
  baseline = flops.achieved(m["baseline_flops"], m["seconds"]["baseline"])
  peak = flops.device_peak()
  return {"value": achieved / peak if peak else None, "target": ">= 0.80", "device": core.device(),
          "train_flops": m["train_flops"], "train_s": m["seconds"]["train"], "achieved_flops_per_s": achieved,
          "peak_flops_per_s": peak, "baseline_flops_per_s": baseline,
          "baseline_fraction": baseline / peak if peak else None,
          "summary": f"MLP 4x512 training {achieved / 1e9:.1f} GFLOP/s ({m['train_flops'] / 1e9:.1f} GFLOP in "
                     f"{m['seconds']['train']:.2f} s), minimal loop {baseline / 1e9:.1f}, matmul peak "
                     f"{(peak or 0) / 1e9:.1f} GFLOP/s"}
