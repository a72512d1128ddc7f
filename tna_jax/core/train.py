"""Training K models side by side as one compiled program.

The models of one experiment share the initialization and the mask (or differ in them, as
vanilla vs TNA-PFN vs pruning) and differ in data order. Everything an epoch needs lives on
the device: the uint8 training set, the shuffle (a permutation per model and epoch), the
normalization and augmentation, so one epoch is one call: a map over models (vmap on
accelerators, one after another on CPU: `tna_jax.core.stacking`) of a scan over steps.

The same call runs on any number of devices and processes (`tna_jax.core.sharding`): the
models are spread over the mesh axis 'models', every batch over 'data', the uint8 dataset
is split by rows over 'data', and jit adds the gradient all-reduce, so 1 CPU, 8 fake CPU
devices, a GPU host and a TPU pod train the same models up to float rounding.
"""

import functools
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from tna_jax.core import data, evaluate, execution, flops, mask_schedule, sharding, stacking
from tna_jax.errors import ConfigError

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  """One model's training state. `fixed` is its TNA-PFN mask (all False for vanilla); with a mask
  schedule (`release`, `tna_jax.core.mask_schedule`), the mask of the last step."""

  params: PyTree
  batch_stats: PyTree  # {} for models without BatchNorm
  opt_state: optax.OptState
  fixed: PyTree
  release: mask_schedule.Release | None = None  # None: the mask never changes (no leaves: today's state)

  @property
  def variables(self) -> dict:
    """The flax variables for `model.apply`."""
    return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}


def init_train_state(tx: optax.GradientTransformation, variables: dict, fixed: PyTree,
                     release: mask_schedule.Release | None = None) -> TrainState:
  """Optimizer state for `variables` (as returned by `models.init_variables`)."""
  params = variables["params"]
  return TrainState(params=params, batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    fixed=fixed, release=release)


def train_step(model, tx: optax.GradientTransformationExtraArgs, state: TrainState, images: jax.Array,
               labels: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on a float batch; the mask reaches the optimizer's last transform (with a
  schedule, the state's mask less the entries released by this step)."""

  def loss_fn(params):
    variables = {"params": params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    if state.batch_stats:
      logits, updated = model.apply(variables, images, train=True, mutable=["batch_stats"])
      batch_stats = updated["batch_stats"]
    else:
      logits, batch_stats = model.apply(variables, images, train=True), state.batch_stats
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
    return loss, (logits, batch_stats)

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if state.release is not None:
    state = state.replace(fixed=state.release.narrow(state.fixed), release=state.release.advance())
  updates, opt_state = tx.update(grads, state.opt_state, state.params, fixed_mask=state.fixed)
  if state.release is not None:  # a released entry starts with fresh momentum (see mask_schedule)
    opt_state = mask_schedule.zero_fixed_state(tx, opt_state, state.fixed)
  state = state.replace(params=optax.apply_updates(state.params, updates), batch_stats=batch_stats,
                        opt_state=opt_state)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return state, {"loss": loss, "accuracy": accuracy}


def make_epoch_fn(model, tx: optax.GradientTransformationExtraArgs, *, batch_size: int, mean, std,
                  flip: bool = False, crop_padding: int = 0, num_examples: int | None = None,
                  mesh: jax.sharding.Mesh | None = None,
                  policy: execution.ExecutionPolicy | None = None) -> Callable:
  """`epoch(state, key, train_images, train_labels) -> (state, metrics)` for ONE model.

  `key` decides this model's data order (and augmentation) for this epoch; the last
  incomplete batch is dropped so every step has the same shape. Map it over models
  (`stacking.map_stacked`).
  Only the first `num_examples` rows are real (default: all; `sharding.shard_rows` pads).
  With a `mesh`, every batch is split over its 'data' axis; the order does not depend on
  the mesh, so any number of devices trains the same model. On CPU the step's
  convolutions are rewritten into the one layout XLA:CPU runs fast inside a loop
  (`policy.convolutions`, default `execution.policy(mesh)`): without it a ResNet20 step
  inside this scan is ~20x slower.
  """
  augment = flip or crop_padding > 0
  step_fn = (policy or execution.policy(mesh)).convolutions(functools.partial(train_step, model, tx))

  def epoch(state: TrainState, key: jax.Array, train_images: jax.Array, train_labels: jax.Array):
    n = num_examples or train_images.shape[0]
    steps = n // batch_size
    order_key, augment_key = jax.random.split(key)
    order = jax.random.permutation(order_key, n)[:steps * batch_size].reshape(steps, batch_size)

    def step(state, xs):
      idx, step_index = xs
      images, labels = sharding.constrain((train_images[idx], train_labels[idx]), mesh, sharding.DATA)
      images = data.normalize(images, mean, std)
      if augment:
        images = data.augment(jax.random.fold_in(augment_key, step_index), images, flip, crop_padding)
      return step_fn(state, images, labels)

    state, metrics = jax.lax.scan(step, state, (order, jnp.arange(steps)))
    return state, jax.tree.map(jnp.mean, metrics)

  return epoch


def stack(trees: list[PyTree]) -> PyTree:
  """Stacks pytrees of equal structure along a new leading (model) axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree, k: int) -> PyTree:
  """The k-th model of a stacked pytree."""
  return jax.tree.map(lambda x: x[k], tree)


def epoch_keys(data_seeds, epoch) -> jax.Array:
  """Per-model keys for one epoch, derived from each model's data seed; jittable."""
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), epoch))(jnp.asarray(data_seeds))


def create_states(init_fn: Callable[..., TrainState], mesh: jax.sharding.Mesh, *args) -> TrainState:
  """Runs `init_fn(*args)` (building K stacked states) so each model is created on its own shard.

  The stacked parameters never exist whole on one device first: jit with `out_shardings`
  writes every leaf (all have the leading model axis) straight into its place.
  """
  return jax.jit(init_fn, out_shardings=sharding.named(mesh, sharding.MODELS))(*args)


def make_train_epochs(model, tx: optax.GradientTransformationExtraArgs, mesh: jax.sharding.Mesh, *,
                      batch_size: int, mean, std, num_examples: int, flip: bool = False,
                      crop_padding: int = 0, policy: execution.ExecutionPolicy | None = None) -> Callable:
  """`train_epochs(states, seeds, epoch, train_images, train_labels) -> (states, metrics)`.

  One compiled call trains the K stacked `states` (sharded on 'models', donated) for one
  epoch, model k in the data order of `seeds[k]` and `epoch`; the data are the sharded
  uint8 arrays of `sharding.shard_rows`. Metrics come back replicated, one value per model.
  `policy` (default `execution.policy(mesh)`) decides whether the models train one after
  another or vmapped, and the convolution layout; the results agree up to float rounding.
  """
  policy = policy or execution.policy(mesh)
  epoch_fn = make_epoch_fn(model, tx, batch_size=batch_size, mean=mean, std=std, flip=flip,
                           crop_padding=crop_padding, num_examples=num_examples, mesh=mesh, policy=policy)

  @jax.jit(donate_argnums=0, out_shardings=(sharding.named(mesh, sharding.MODELS), sharding.named(mesh)))
  def train_epochs(states, seeds, epoch, train_images, train_labels):
    keys = sharding.constrain(epoch_keys(seeds, epoch), mesh, sharding.MODELS)
    return stacking.map_stacked(epoch_fn, sequential=policy.sequential, in_axes=(0, 0, None, None),
                                spmd_axis_name=sharding.MODELS)(states, keys, train_images, train_labels)

  return train_epochs


def check_batch_size(batch_size: int, num_examples: int, what: str = "training examples") -> None:
  """Raises ConfigError unless at least one whole batch fits in `num_examples`."""
  if not 1 <= batch_size <= num_examples:
    raise ConfigError(f"batch_size={batch_size} is out of range; allowed: 1 to the {num_examples} {what}.")


def fit(model, tx: optax.GradientTransformationExtraArgs, states: TrainState, data_seeds: list[int],
        dataset: "data.Dataset", *, num_epochs: int, batch_size: int, eval_batch_size: int, flip: bool = False,
        crop_padding: int = 0, on_epoch: Callable[[dict, TrainState], None] | None = None,
        history: list[dict] | None = None, progress: bool = True, mesh: jax.sharding.Mesh | None = None,
        policy: execution.ExecutionPolicy | None = None, eval_every: int = 1) -> tuple[TrainState, list[dict]]:
  """Trains the K stacked `states` for `num_epochs`; model k sees data order `data_seeds[k]`.

  One compiled call per epoch trains all K models, and a second evaluates all of them on
  the test set every `eval_every` epochs and after the last (on the quickstart's MLP the
  evaluation costs ~5 % of an epoch; the records of other epochs have no test_* keys). Both
  calls are compiled before the first epoch, so each record's `seconds` excludes compilation,
  and the training call's cost analysis gives every record `train_flops` (FLOPs of the epoch
  on all devices), `train_flops_per_s` and `train_mfu` (its fraction of the devices' peak,
  `tna_jax.core.flops.device_peak`: the chip's bf16 peak, or the measured matmul peak on CPU;
  absent for an unknown accelerator). `mesh` (default `sharding.make_mesh` over every device
  of every process) spreads the models over its 'models' axis and each batch over 'data';
  the result does not depend on it beyond float rounding. Returns the trained states,
  replicated on every device so that any process can read, evaluate and save them, and one
  metrics record per epoch, each value a list over the K models. `on_epoch(record, states)` sees each record
  and the states after it (to checkpoint them). A resumed run passes the `history` of the
  epochs already done with the states after them: training continues at epoch
  `len(history)` exactly as if it had never stopped (epoch keys derive from the epoch).
  `policy` (default `execution.policy(mesh)`) decides how the models execute, which changes
  nothing beyond float rounding either.
  """
  num_train = len(dataset.train_labels)
  check_batch_size(batch_size, num_train)
  if eval_every < 1:
    raise ConfigError(f"eval_every={eval_every!r} must be >= 1.")
  mesh = mesh or sharding.make_mesh(len(data_seeds), batch_size)
  policy = policy or execution.policy(mesh)
  if batch_size % mesh.shape[sharding.DATA]:
    raise ValueError(f"batch_size={batch_size} must be a multiple of the mesh's data axis "
                     f"({mesh.shape[sharding.DATA]} devices)")
  train_epochs = make_train_epochs(model, tx, mesh, batch_size=batch_size, mean=dataset.mean, std=dataset.std,
                                   num_examples=num_train, flip=flip, crop_padding=crop_padding, policy=policy)
  evaluate_all = make_evaluate_all(model, mesh, dataset.mean, dataset.std, policy)
  states = sharding.put(states, sharding.named(mesh, sharding.MODELS))
  seeds = sharding.put(np.asarray(data_seeds, np.int32), sharding.named(mesh, sharding.MODELS))
  train_images, train_labels = (sharding.shard_rows(a, mesh) for a in (dataset.train_images, dataset.train_labels))
  data_devices = mesh.shape[sharding.DATA]  # padding to a multiple has weight 0: same metrics
  test_batches = evaluate.make_batches(dataset.test_images, dataset.test_labels,
                                       -(-min(eval_batch_size, len(dataset.test_labels)) // data_devices) * data_devices)
  split = test_batches.labels.shape[1] % data_devices == 0  # a test split smaller than the mesh stays whole
  test_batches = sharding.put(test_batches, sharding.named(mesh, *((None, sharding.DATA) if split else ())))
  train_epochs = train_epochs.lower(states, seeds, len(history or []), train_images, train_labels).compile()
  evaluate_all = evaluate_all.lower(states.variables, test_batches).compile()
  speed = EpochSpeed(train_epochs, mesh)
  history, postfix = list(history or []), {}
  bar = tqdm(range(len(history), num_epochs), desc="train", unit="epoch", initial=len(history), total=num_epochs,
             disable=not (progress and sharding.is_writer()), dynamic_ncols=True)
  for epoch in bar:
    start = time.perf_counter()
    states, train_metrics = jax.block_until_ready(train_epochs(states, seeds, epoch, train_images, train_labels))
    train_seconds = time.perf_counter() - start
    record = {"epoch": epoch + 1, "seconds": 0.0}
    record.update({f"train_{k}": v for k, v in sharding.fetch(train_metrics).items()})
    if (epoch + 1) % eval_every == 0 or epoch + 1 == num_epochs:
      test_metrics = evaluate_all(states.variables, test_batches)
      record.update({f"test_{k}": v for k, v in sharding.fetch(test_metrics).items()})
      postfix["test_acc"] = " ".join(f"{a:.3f}" for a in record["test_accuracy"])
    record["seconds"] = time.perf_counter() - start
    record.update(speed.of(train_seconds))
    postfix["GFLOP/s"] = f"{record['train_flops_per_s'] / 1e9:.1f}"
    if "train_mfu" in record:
      postfix["mfu"] = f"{record['train_mfu']:.0%}"
    bar.set_postfix(postfix)
    history.append(record)
    if on_epoch:
      on_epoch(record, states)
  return sharding.replicate(states, mesh), history


def make_evaluate_all(model, mesh: jax.sharding.Mesh, mean, std,
                      policy: execution.ExecutionPolicy | None = None) -> Callable:
  """`evaluate_all(variables, batches) -> metrics`: the K stacked models (sharded on 'models')
  evaluated on the same batches, metrics replicated, one value per model. `policy` defaults
  to `execution.policy(mesh)`."""
  apply_fn = evaluate.inference_fn(model)
  evaluate_one = lambda variables, batches: evaluate.evaluate(apply_fn, variables, batches, mean, std)
  sequential = (policy or execution.policy(mesh)).sequential
  return jax.jit(stacking.map_stacked(evaluate_one, sequential=sequential, in_axes=(0, None),
                                      spmd_axis_name=sharding.MODELS), out_shardings=sharding.named(mesh))


class EpochSpeed:
  """Achieved FLOP/s and MFU of a compiled training epoch from its measured seconds.

  The FLOPs are the compiled program's cost analysis (`flops.count`, per device) times the
  mesh's devices; the peak is `flops.device_peak` (the bf16 peak of the chip, or on CPU a
  matmul measured once per process).
  """

  def __init__(self, compiled, mesh: jax.sharding.Mesh):
    self.device_flops = flops.count(compiled).flops
    self.num_devices = mesh.devices.size
    self.peak = flops.device_peak(mesh.devices.flat[0])

  def of(self, seconds: float) -> dict[str, float]:
    """{train_flops, train_flops_per_s, train_mfu} of one epoch that took `seconds`."""
    out = {"train_flops": self.device_flops * self.num_devices,
           "train_flops_per_s": flops.achieved(self.device_flops * self.num_devices, seconds)}
    if self.peak:
      out["train_mfu"] = flops.mfu(self.device_flops, seconds, self.peak)
    return out


SPEED_COLUMNS = (("epochs", "epochs", "d"), ("train s/epoch", "train_seconds_per_epoch", ".2f"),
                 ("GFLOP/epoch", "train_gflop_per_epoch", ".1f"), ("GFLOP/s", "train_gflop_per_s", ".1f"),
                 ("MFU %", "train_mfu_pct", ".1f"))


def speed_summary(history: list[dict]) -> dict[str, float | int | None]:
  """The medians over `fit`'s records of the training call's seconds, GFLOP/s and MFU (%, None
  without a known peak): the final table's training speed."""
  timed = [r for r in history if "train_flops_per_s" in r]
  if not timed:
    return {"epochs": len(history)}
  median = lambda values: float(np.median(values))
  mfus = [r["train_mfu"] for r in timed if "train_mfu" in r]
  return {"epochs": len(history),
          "train_seconds_per_epoch": median([r["train_flops"] / r["train_flops_per_s"] for r in timed]),
          "train_gflop_per_epoch": timed[-1]["train_flops"] / 1e9,
          "train_gflop_per_s": median([r["train_flops_per_s"] for r in timed]) / 1e9,
          "train_mfu_pct": 100 * median(mfus) if mfus else None}
