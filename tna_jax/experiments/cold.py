"""The `cold` experiment: ColD fusion (Don-Yehiya et al.), with and without one shared
TNA-PFN mask.

Round r fine-tunes the current base on every task, each with its own head (re-initialized
to the task's seeded head every round) and its own training data; the contributors'
fine-tuned models are averaged (`soup.masked_average`: entries the mask holds fixed stay
the base's) and the average is the next base. Round 0 starts from the original base, so
its accuracies are the baseline "fine-tuning from the original base", and round r's are
"fine-tuning from the base fused r times". Unseen tasks are fine-tuned and evaluated every
round like contributors but never enter the average: they measure the fused base as a
starting point for new tasks.

Every (variant, task) model of a round trains in ONE compiled program: `train.make_epoch_fn`
mapped over models (`tna_jax.stacking`), each with its own task's data. Tasks get equal training-set sizes for
that, and heads as wide as the widest task (`task_head` switches a task's extra logits off).

Tasks: for image datasets, relabelings ('0+2/1/3': '/'-separated groups of '+'-joined
classes; each task takes its examples from its own stretch of the training split); for
dataset='glue', GLUE task names read through TFDS (`text_data`).

Writes to the workdir: results.json, cold.png, metrics.jsonl (per round) and orbax
checkpoints (base, <variant>_mask, <variant>_round<r> for each fused base). Fusion is a
resumable phase (`tna_jax.runtime`): a killed run continues after its last finished round
when the same command runs again.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import (data, evaluate, execution, models, optim, pretrained, reporting, runtime, soup, stacking,
                     text_data, train, transformers)
from tna_jax.errors import ConfigError, check_choice
from tna_jax.experiments import soup as soup_experiment

PyTree = Any
DATASETS = data.DATASET_NAMES + ("glue",)
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


# ----------------------------------------------------------------------------- config


def task_specs(config) -> tuple[list[str], list[str]]:
  """Contributors' and unseen tasks' specs from the comma-separated config strings."""
  contributors = soup_experiment.parse_list("cold.tasks", config.cold.tasks, str)
  unseen = [s.strip() for s in config.cold.unseen_tasks.split(",") if s.strip()]
  return contributors, unseen


def planned_models(config) -> int:
  """Models fine-tuned side by side (every variant x task), for `main --dry_run`."""
  contributors, unseen = task_specs(config)
  return len(soup_experiment.variants_of(config)) * (len(contributors) + len(unseen))


def validate(config) -> None:
  """Checks every value the run depends on before any data is read or file written."""
  soup_experiment.validate_finetune(config)
  check_choice("dataset", config.dataset, DATASETS)
  text_model = config.model.name == "text_transformer"
  if (config.dataset == "glue") != text_model:
    raise ConfigError(f"model.name={config.model.name!r} does not fit dataset={config.dataset!r}: glue needs "
                      "model.name='text_transformer', image datasets an image model.")
  if config.dataset == "glue" and config.base.source == "pretrain":
    raise ConfigError("base.source='pretrain' trains on an image dataset; for glue use 'init' or 'orbax'.")
  contributors, unseen = task_specs(config)
  for spec in contributors + unseen:
    if config.dataset == "glue":
      check_choice("cold.tasks (glue)", spec, tuple(text_data.GLUE_TASKS))
    else:
      pretrained.parse_groups(spec, 10_000)  # syntax only; class ranges are checked against the data
  for key, low in (("rounds", 0), ("epochs_per_round", 1), ("examples_per_task", 1), ("max_len", 1)):
    if config.cold[key] < low:
      raise ConfigError(f"cold.{key}={config.cold[key]!r} must be >= {low}.")
  if config.cold.examples_per_task < config.batch_size:
    raise ConfigError(f"cold.examples_per_task={config.cold.examples_per_task} is smaller than "
                      f"batch_size={config.batch_size}.")


# ----------------------------------------------------------------------------- tasks


def image_tasks(config, dataset: data.Dataset) -> list[data.Dataset]:
  """Each task a relabeling of `dataset` with its own training examples.

  Task i takes the first `examples_per_task` examples of its classes from where task i-1
  stopped (starting at cold.start), so tasks never share a training example.
  """
  contributors, unseen = task_specs(config)
  cursor, tasks, n = config.cold.start, [], config.cold.examples_per_task
  for spec in contributors + unseen:
    groups = pretrained.parse_groups(spec, dataset.num_classes)
    candidates = cursor + np.flatnonzero(np.isin(dataset.train_labels[cursor:], [c for g in groups for c in g]))
    if len(candidates) < n:
      raise ConfigError(f"task {spec!r}: only {len(candidates)} training examples of its classes are left after "
                        f"example {cursor}; lower cold.examples_per_task={n} or cold.start.")
    take = candidates[:n]
    cursor = int(take[-1]) + 1
    own = dataclasses.replace(dataset, train_images=dataset.train_images[take], train_labels=dataset.train_labels[take])
    tasks.append(pretrained.relabel(own, groups, name=spec))
  return tasks


def glue_tasks(config) -> list[data.Dataset]:
  """Each GLUE task with a seeded random `examples_per_task` of its training examples."""
  contributors, unseen = task_specs(config)
  tasks = []
  for name in contributors + unseen:
    task = text_data.load_glue(name, config.data_dir, config.cold.max_len)
    n = config.cold.examples_per_task
    if len(task.train_labels) < n:
      raise ConfigError(f"GLUE {name} has {len(task.train_labels)} training examples; lower cold.examples_per_task={n}.")
    pick = np.random.default_rng(config.data_seed).permutation(len(task.train_labels))[:n]
    tasks.append(dataclasses.replace(task, train_images=task.train_images[pick], train_labels=task.train_labels[pick]))
  return tasks


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


# ----------------------------------------------------------------------------- fusion


def task_head(model, seed: int, input_shape: tuple[int, ...], num_classes: int) -> dict:
  """A task's initial head: the model's head from `seed`, with the logits of classes the
  task lacks (the head is as wide as the widest task) switched off by a bias of
  ABSENT_CLASS_BIAS. Their softmax weight is exactly 0, so they get zero gradient, are
  never predicted, and the model is the task's `num_classes`-way classifier."""
  head = models.init_variables(model, jax.random.key(seed), input_shape)["params"]["head"]
  return {**head, "bias": head["bias"].at[num_classes:].set(ABSENT_CLASS_BIAS)}


def cold_fusion(model, tx, base: dict, heads: PyTree, fixed: PyTree, tasks: Tasks, *, rounds: int, epochs: int,
                batch_size: int, data_seeds: list[int], done: tuple[list[dict], list[np.ndarray]] | None = None,
                on_round: Callable[[int, train.TrainState, dict, list[dict]], None] | None = None,
                progress: bool = True) -> tuple[np.ndarray, list[dict]]:
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
    done: (bases 0..r, accuracies of rounds 0..r-1) of a resumed run: fusion continues at
      round r exactly as if it had never stopped.
    on_round: called after each round with (round, trained states [V*T], metrics {'accuracy':
      test accuracy [V, T], 'train_loss': last epoch's loss [V*T]}, the bases so far).

  Returns:
    Test accuracy [R + 1, V, T] after fine-tuning from base 0..R, and the bases 0..R
    (each stacked [V]).
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  num_variants, num_tasks = jax.tree.leaves(fixed)[0].shape[0], len(tasks.names)
  repeat = lambda tree: jax.tree.map(lambda x: jnp.repeat(x, num_tasks, axis=0), tree)  # [V] -> [V*T]
  tile = lambda tree: jax.tree.map(lambda x: jnp.tile(x, (num_variants,) + (1,) * (x.ndim - 1)), tree)  # [T] -> [V*T]
  by_variant = lambda tree: jax.tree.map(lambda x: x.reshape((num_variants, num_tasks) + x.shape[1:]), tree)
  policy = execution.policy()  # ColD runs off any mesh, on the default backend
  epoch_fn = jax.jit(stacking.map_stacked(train.make_epoch_fn(model, tx, batch_size=batch_size, mean=tasks.mean,
                                                               std=tasks.std, policy=policy),
                                          sequential=policy.sequential), donate_argnums=0)
  init_states = jax.jit(jax.vmap(lambda variables, f: train.init_train_state(tx, variables, f)))
  fuse = jax.jit(jax.vmap(soup.masked_average, in_axes=(0, 0, 0, None)))
  images, labels = tile(jnp.asarray(tasks.train_images)), tile(jnp.asarray(tasks.train_labels))
  test, flat_fixed, seeds = tile(tasks.test), repeat(fixed), list(data_seeds) * num_variants
  weights = jnp.asarray(tasks.contributes, jnp.float32)

  bases, accuracy = (list(done[0]), list(done[1])) if done else ([base], [])
  bar = tqdm(total=(rounds + 1) * epochs, initial=len(accuracy) * epochs, desc="cold", unit="epoch",
             disable=not progress, dynamic_ncols=True)
  for r in range(len(accuracy), rounds + 1):
    variables = repeat(bases[-1])
    variables["params"] = {**variables["params"], "head": tile(heads)}
    states = init_states(variables, flat_fixed)
    for e in range(epochs):
      states, epoch_metrics = epoch_fn(states, train.epoch_keys(seeds, r * epochs + e), images, labels)
      bar.update()
    acc = np.asarray(soup.evaluate_stack(model, states.variables, test, tasks.mean, tasks.std,
                                         per_model_batches=True)["accuracy"]).reshape(num_variants, num_tasks)
    accuracy.append(acc)
    bar.set_postfix(round=r, acc=" ".join(f"{a:.3f}" for a in acc.mean(axis=1)))
    if r < rounds:
      trained = by_variant(states.variables)
      params = fuse(trained["params"], bases[-1]["params"], fixed, weights)
      others = {k: jax.vmap(soup.uniform_soup, in_axes=(0, None))(v, weights) for k, v in trained.items()
                if k != "params"}  # BatchNorm statistics: the contributors' mean
      bases.append({"params": params, **others})
    if on_round:
      on_round(r, states, {"accuracy": acc, "train_loss": np.asarray(epoch_metrics["loss"])}, bases)
  bar.close()
  return np.stack(accuracy), bases


# ----------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict[str, Any]:
  """Runs ColD fusion for each variant and writes the results to `workdir`.

  Fusion is the resumable phase 'fusion' (a checkpoint of the bases so far after every
  `checkpoint.every` rounds); pretraining a base here is the phase 'pretrain'.
  """
  validate(config)
  with runtime.Run(config, workdir) as run:
    contributors, unseen = task_specs(config)
    if config.dataset == "glue":
      task_list = glue_tasks(config)
      source = task_list[0]  # the input shape of `load_base`; glue bases are never pretrained
    else:
      source = data.load_dataset(config.dataset, config.data_dir)
      task_list = image_tasks(config, source)
    tasks = stack_tasks(task_list, [True] * len(contributors) + [False] * len(unseen), config.eval_batch_size,
                        config.num_test or None)
    model = models.get_model(config.model, max(tasks.num_classes))
    body = pretrained.load_source(config)  # a missing or corrupt checkpoint stops here, before the workdir

    run.start()
    with run.timed("base"):
      base = pretrained.load_base(config, model, source, body, run)
    variants = soup_experiment.variants_of(config)
    fixed = soup_experiment.starting_masks(config, base["params"])
    heads = train.stack([task_head(model, config.init_seed + t, source.image_shape, k)
                         for t, k in enumerate(tasks.num_classes)])
    steps = config.cold.examples_per_task // config.batch_size
    tx = optim.make_optimizer(config.optimizer, steps * config.cold.epochs_per_round)
    stacked_base = train.stack([base] * len(variants))

    # Each round is a step of the phase: its checkpoint holds the bases fused so far.
    phase = run.phase("fusion", total=config.cold.rounds + 1, unit="round", names=tasks.names)
    like = lambda meta: {"bases": train.stack([stacked_base] * min(len(meta["history"]) + 1, config.cold.rounds + 1))}
    saved, history = phase.restore({"bases": train.stack([stacked_base])}, like)
    done = None
    if history:
      done = ([train.unstack(saved["bases"], i) for i in range(len(jax.tree.leaves(saved["bases"])[0]))],
              [np.asarray([h[f"accuracy_{v}"] for v in variants], np.float32) for h in history])

    def record(r, states, metrics, bases):
      del states
      phase.record({"round": r, **{f"accuracy_{v}": metrics["accuracy"][i] for i, v in enumerate(variants)},
                    "train_loss": metrics["train_loss"]}, {"bases": train.stack(bases)})

    with run.timed("fusion"):
      accuracy, bases = cold_fusion(
          model, tx, stacked_base, heads, train.stack([fixed[v] for v in variants]), tasks,
          rounds=config.cold.rounds, epochs=config.cold.epochs_per_round, batch_size=config.batch_size,
          data_seeds=[config.data_seed + t for t in range(len(tasks.names))], done=done, on_round=record)

    results = {
        "config": config.to_dict(),
        "tasks": [{"name": n, "role": "contributor" if c else "unseen", "num_classes": k,
                   "num_train": int(tasks.train_labels.shape[1]), "num_test": s}
                  for n, c, k, s in zip(tasks.names, tasks.contributes, tasks.num_classes, tasks.test_sizes)],
        "accuracy": {v: {n: accuracy[:, i, t].tolist() for t, n in enumerate(tasks.names)}
                     for i, v in enumerate(variants)},
        "seconds": dict(run.seconds),
    }
    rows = table_rows(results, accuracy, tasks, variants)
    results["summary"] = rows
    write_outputs(run, config, results, bases, fixed, variants)
    run.finish(results, f"\nColD fusion: test accuracy % after fine-tuning each task from the base fused r times "
               f"(r=0: the original base); {config.model.name} on {config.dataset}, base {run.seconds['base']:.0f}s, "
               f"fusion {run.seconds['fusion']:.0f}s:\n" +
               reporting.format_table(rows, table_columns(config.cold.rounds)))
  return results


def table_columns(rounds: int) -> tuple:
  return (("variant", "variant", "s"), ("task", "task", "s"), ("role", "role", "s"),
          *((f"r{r}", f"r{r}", ".2f") for r in range(rounds + 1)), (f"gain r{rounds}-r0", "gain", "+.2f"))


def table_rows(results: dict, accuracy: np.ndarray, tasks: Tasks, variants: list[str]) -> list[dict]:
  """One row per (variant, task), then each variant's mean over contributors and over unseen tasks."""
  rows = []
  for i, variant in enumerate(variants):
    groups = [(t, name, results["tasks"][t]["role"]) for t, name in enumerate(tasks.names)]
    groups += [(np.flatnonzero(tasks.contributes == c), f"mean ({role})", role)
               for c, role in ((True, "contributor"), (False, "unseen")) if np.any(tasks.contributes == c)]
    for index, name, role in groups:
      per_round = 100 * np.mean(accuracy[:, i, np.atleast_1d(index)], axis=-1)
      rows.append({"variant": variant, "task": name, "role": role,
                   **{f"r{r}": float(a) for r, a in enumerate(per_round)}, "gain": float(per_round[-1] - per_round[0])})
  return rows


def write_outputs(run: runtime.Run, config, results: dict, bases: list[dict], fixed: dict,
                  variants: list[str]) -> None:
  """Checkpoints (original base, masks, fused bases) and cold.png; results.json comes last,
  from `Run.finish`."""
  run.save("base", train.unstack(bases[0], 0))
  for i, variant in enumerate(variants):
    run.save(f"{variant}_mask", fixed[variant])
    for r, base in enumerate(bases[1:], start=1):
      run.save(f"{variant}_round{r}", train.unstack(base, i))
  plot_rounds(run.path("cold.png"), results, f"ColD fusion: {config.model.name} on {config.dataset}")


def plot_rounds(path, results: dict, title: str) -> None:
  """Each task's test accuracy against the round, one line per variant."""
  plt = reporting.pyplot()
  names = [t["name"] for t in results["tasks"]]
  cols = min(3, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
  for ax, task in zip(axes.flat, results["tasks"]):
    for i, (variant, per_task) in enumerate(results["accuracy"].items()):
      acc = 100 * np.asarray(per_task[task["name"]])
      ax.plot(np.arange(len(acc)), acc, marker="o", color=f"C{i}", label=variant)
      ax.axhline(acc[0], color=f"C{i}", linestyle=":", alpha=0.6)
    ax.set(title=f"{task['name']} ({task['role']})", xlabel="round (fusions of the base)", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.suptitle(title)
  reporting.write_png(fig, path)
