"""ColD fusion (Don-Yehiya et al.): fine-tune one base on many tasks, fuse, repeat.

Round r fine-tunes the current base on every task, each with its own head (re-initialized
to the task's seeded head every round, `task_head`) and its own training data; the
contributors' fine-tuned models are averaged into the next base (`fuse`: entries a
TNA-PFN mask holds fixed stay the base's), or merged from their task vectors against the
round's base by another operator of `tna_jax.fusion.merging` (`merger`). Round 0 starts from the original base, so its
accuracies are "fine-tuning from the original base", and round r's are "fine-tuning from
the base fused r times". Unseen tasks are fine-tuned and evaluated every round like
contributors but never enter the average: they measure the fused base as a starting point
for new tasks.

Every (variant, task) model of a round trains in ONE compiled program: `train.make_epoch_fn`
mapped over models (`tna_jax.core.stacking`), each with its own task's data. Tasks get equal
training-set sizes for that (`stack_tasks`), and heads as wide as the widest task
(`task_head` switches a task's extra logits off). The models are spread over the mesh
axis 'models' (`tna_jax.core.sharding`), each with its task's data, and each batch over 'data',
so the same call runs on one CPU or a pod.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from tna_jax.core import data, evaluate, execution, masks, models, sharding, stacking, train
from tna_jax.fusion import merging, model_soups

PyTree = Any
ABSENT_CLASS_BIAS = -1e9


class Tasks(NamedTuple):
  """T tasks with equal training-set sizes, stacked on a leading task axis."""

  names: list[str]
  contributes: np.ndarray  # bool [T]: fused (contributor) or only evaluated (unseen)
  num_classes: list[int]
  train_images: np.ndarray  # uint8 [T, n, ...]
  train_labels: np.ndarray  # int32 [T, n]
  test: evaluate.Batches  # [T, S, B, ...]; padding examples weigh 0
  test_sizes: list[int]
  mean: tuple[float, ...]
  std: tuple[float, ...]


def stack_tasks(tasks: list[data.Dataset], contributes: list[bool], eval_batch_size: int,
                num_test: int | None = None) -> Tasks:
  """Stacks equal-size training sets and pads every test split to the same batch count."""
  sizes = {len(t.train_labels) for t in tasks}
  if len(sizes) != 1:
    raise ValueError(f"tasks need equal training-set sizes to train in one program, got {sorted(sizes)}")
  tests = [evaluate.make_batches(t.test_images[:num_test], t.test_labels[:num_test], eval_batch_size) for t in tasks]
  steps = max(b.labels.shape[0] for b in tests)
  batch = max(b.labels.shape[1] for b in tests)

  def pad(x: jax.Array) -> jax.Array:  # zeros (weight 0) up to [steps, batch, ...]
    return jnp.pad(x, [(0, steps - x.shape[0]), (0, batch - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

  test = jax.tree.map(lambda *xs: jnp.stack([pad(x) for x in xs]), *tests)
  return Tasks(names=[t.name for t in tasks], contributes=np.asarray(contributes, bool),
               num_classes=[t.num_classes for t in tasks], train_images=np.stack([t.train_images for t in tasks]),
               train_labels=np.stack([t.train_labels for t in tasks]), test=test,
               test_sizes=[int(min(len(t.test_labels), num_test or len(t.test_labels))) for t in tasks],
               mean=tasks[0].mean, std=tasks[0].std)


def task_head(model, seed: int, input_shape: tuple[int, ...], num_classes: int) -> dict:
  """A task's initial head: the model's head from `seed`, with the logits of classes the
  task lacks (the head is as wide as the widest task) switched off by a bias of
  ABSENT_CLASS_BIAS. Their softmax weight is exactly 0, so they get zero gradient, are
  never predicted, and the model is the task's `num_classes`-way classifier."""
  head = models.init_variables(model, jax.random.key(seed), input_shape)["params"]["head"]
  if "out_proj" in head:  # RoBERTa's head (dense -> tanh -> out_proj): its output layer is out_proj
    return {**head, "out_proj": {**head["out_proj"], "bias": head["out_proj"]["bias"].at[num_classes:].set(
        ABSENT_CLASS_BIAS)}}
  return {**head, "bias": head["bias"].at[num_classes:].set(ABSENT_CLASS_BIAS)}


def fuse(trained: PyTree, base: PyTree, fixed: PyTree, weights: jax.Array, merger: merging.Merger | None = None,
         key: jax.Array | None = None) -> dict:
  """One variant's next base from its T fine-tuned models (variables stacked [T]).

  The params are the weighted mean of the models (`weights` [T]: 1 for contributors, 0 for
  unseen tasks), except that entries the mask `fixed` holds are the previous `base`'s,
  bit for bit (`masks.keep_fixed`); other collections (BatchNorm statistics) are the
  contributors' mean. With a `merger` other than uniform, the params are that operator's
  merge of the contributors' task vectors against `base` instead (`merging.merge_variables`,
  the same weights and mask; `key` seeds DARE's drop).
  """
  if merger is not None and merger.name != "uniform":
    return merging.merge_variables(merger, base, trained, weights=weights, fixed=fixed, key=key)
  params = masks.keep_fixed(model_soups.uniform_soup(trained["params"], weights), base["params"], fixed)
  return {"params": params, **{k: model_soups.uniform_soup(v, weights) for k, v in trained.items() if k != "params"}}


def cold_fusion(model, tx, base: dict, heads: PyTree, fixed: PyTree, tasks: Tasks, *, rounds: int, epochs: int,
                batch_size: int, data_seeds: list[int], mesh: jax.sharding.Mesh | None = None,
                done: tuple[list[dict], list[np.ndarray]] | None = None,
                on_round: Callable[[int, train.TrainState, dict, list[dict]], None] | None = None,
                progress: bool = True, merger: merging.Merger | None = None) -> tuple[np.ndarray, list[dict]]:
  """ColD fusion for V variants at once.

  Args:
    model: the flax model (its head as wide as the widest task).
    tx: optimizer whose update takes `fixed_mask=` (`optim.make_optimizer`); fresh each round.
    base: variables of the original base, stacked [V] (one per variant, usually equal).
    heads: each task's initial head params, stacked [T]; every round starts from them.
    fixed: each variant's mask, stacked [V]; contributors train under it and the fused
      base keeps the previous base's values where it is True.
    tasks: the T tasks (`stack_tasks`); only `tasks.contributes` enter the average.
    rounds: fusions R; tasks are fine-tuned R + 1 times.
    epochs, batch_size: each fine-tuning's length and batch.
    data_seeds: [T]; task t's data order in round r, epoch e is `fold_in(key(seed_t), r * epochs + e)`,
      the same for every variant.
    mesh: where the V*T models train (default `sharding.make_mesh` over every device of
      every process): models and their tasks' data on 'models', batches on 'data'. The
      result does not depend on it beyond float rounding.
    done: (bases 0..r, accuracies of rounds 0..r-1) of a resumed run: fusion continues at
      round r exactly as if it had never stopped.
    merger: how the contributors are fused (`merging.Merger`); None or uniform: their mean
      (`fuse`). DARE's drop in round r is keyed by fold_in(key(merger.seed), r).
    on_round: called after each round with (round, trained states [V*T], metrics {'accuracy':
      test accuracy [V, T], 'train_loss': last epoch's loss [V*T]}, the bases so far).

  Returns:
    Test accuracy [R + 1, V, T] after fine-tuning from base 0..R, and the bases 0..R
    (each stacked [V], replicated on every device so that any process can save them).
  """
  num_variants, num_tasks = jax.tree.leaves(fixed)[0].shape[0], len(tasks.names)
  mesh = mesh or sharding.make_mesh(num_variants * num_tasks, batch_size)
  by_model, replicated = sharding.named(mesh, sharding.MODELS), sharding.named(mesh)
  repeat = lambda tree: jax.tree.map(lambda x: jnp.repeat(x, num_tasks, axis=0), tree)  # [V] -> [V*T]
  tile = lambda tree: jax.tree.map(lambda x: np.tile(x, (num_variants,) + (1,) * (x.ndim - 1)), tree)  # [T] -> [V*T]
  policy = execution.policy(mesh)
  epoch_fn = stacking.map_stacked(train.make_epoch_fn(model, tx, batch_size=batch_size, mean=tasks.mean,
                                                      std=tasks.std, mesh=mesh, policy=policy),
                                  sequential=policy.sequential, spmd_axis_name=sharding.MODELS)

  @jax.jit(out_shardings=by_model)
  def start_round(base, heads, fixed):  # every (variant, task) model: the variant's base, the task's head
    variables = repeat(base)
    variables["params"] = {**variables["params"], "head": heads}
    return jax.vmap(lambda variables, f: train.init_train_state(tx, variables, f))(variables, repeat(fixed))

  @jax.jit(donate_argnums=0, out_shardings=(by_model, replicated))
  def train_epoch(states, seeds, epoch, images, labels):
    keys = sharding.constrain(train.epoch_keys(seeds, epoch), mesh, sharding.MODELS)
    return epoch_fn(states, keys, images, labels)

  @jax.jit(out_shardings=replicated)
  def fuse_all(variables, bases, fixed, weights, r):  # [V*T] trained models -> the V next bases
    by_variant = jax.tree.map(lambda x: x.reshape((num_variants, num_tasks) + x.shape[1:]), variables)
    key = jax.random.fold_in(jax.random.key(merger.seed), r) if merger is not None else None
    return jax.vmap(lambda *args: fuse(*args, merger=merger, key=key), in_axes=(0, 0, 0, None))(
        by_variant, bases, fixed, weights)

  images, labels, test, seeds, heads = sharding.put(
      (tile(tasks.train_images), tile(tasks.train_labels), tile(sharding.fetch(tasks.test)),
       np.asarray(list(data_seeds) * num_variants, np.int32), tile(sharding.fetch(heads))), by_model)
  fixed = sharding.put(fixed, replicated)
  weights = jnp.asarray(tasks.contributes, jnp.float32)

  bases, accuracy = (list(done[0]), list(done[1])) if done else ([base], [])
  bar = tqdm(total=(rounds + 1) * epochs, initial=len(accuracy) * epochs, desc="cold", unit="epoch",
             disable=not (progress and sharding.is_writer()), dynamic_ncols=True)
  for r in range(len(accuracy), rounds + 1):
    states = start_round(bases[-1], heads, fixed)
    for e in range(epochs):
      states, epoch_metrics = train_epoch(states, seeds, r * epochs + e, images, labels)
      bar.update()
    tested = model_soups.evaluate_stack(model, states.variables, test, tasks.mean, tasks.std, per_model_batches=True,
                                 mesh=mesh)
    acc = sharding.fetch(tested["accuracy"]).reshape(num_variants, num_tasks)
    accuracy.append(acc)
    bar.set_postfix(round=r, acc=" ".join(f"{a:.3f}" for a in acc.mean(axis=1)))
    if r < rounds:
      bases.append(fuse_all(states.variables, bases[-1], fixed, weights, r))
    if on_round:
      on_round(r, states, {"accuracy": acc, "train_loss": sharding.fetch(epoch_metrics["loss"])}, bases)
  bar.close()
  return np.stack(accuracy), bases
