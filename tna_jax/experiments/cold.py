"""The `cold` experiment: ColD fusion (Don-Yehiya et al., `tna_jax.fusion.cold_fusion`), with and without
one shared TNA-PFN mask.

This module turns the config into tasks, a base and masks, runs `cold_fusion.cold_fusion` for
every variant at once on the mesh (`tna_jax.core.sharding`) and writes the results. Round 0's
accuracies are the baseline "fine-tuning from the original base", round r's are
"fine-tuning from the base fused r times"; unseen tasks never enter the fused base. `cold.merge`
picks the operator that fuses the contributors (`tna_jax.fusion.merging`; uniform = their mean).

Tasks: for image datasets, relabelings ('0+2/1/3': '/'-separated groups of '+'-joined
classes; each task takes its examples from its own stretch of the training split); for
dataset='glue', GLUE task names read through TFDS (`text_data`).

Writes to the workdir: results.json, cold.png, metrics.jsonl (per round) and orbax
checkpoints (base, <variant>_mask, <variant>_round<r> for each fused base). Fusion is a
resumable phase (`tna_jax.runs.runtime`): a killed run continues after its last finished round
when the same command runs again.
"""

import dataclasses
from typing import Any

import jax
import numpy as np

from tna_jax.config import schema
from tna_jax.core import data, masks, optim, sharding, text_data, train
from tna_jax.errors import ConfigError
from tna_jax.fusion import bases, cold_fusion, merging, pretrained, tasks
from tna_jax.runs import reporting, runtime


# ----------------------------------------------------------------------------- config


def task_specs(config) -> tuple[list[str], list[str]]:
  """Contributors' and unseen tasks' specs from the comma-separated config strings."""
  return schema.values(config, "cold.tasks"), schema.values(config, "cold.unseen_tasks")


def planned_models(config) -> int:
  """Models fine-tuned side by side (every variant x task), for `main --dry_run`."""
  contributors, unseen = task_specs(config)
  return len(schema.values(config, "variants")) * (len(contributors) + len(unseen))


def validate(config) -> None:
  """Checks every value the run depends on before any data is read or file written."""
  schema.validate(config)


# ----------------------------------------------------------------------------- tasks


def image_tasks(config, dataset: data.Dataset) -> list[data.Dataset]:
  """Each task a relabeling of `dataset` with its own training examples.

  Task i takes the first `examples_per_task` examples of its classes from where task i-1
  stopped (starting at cold.start), so tasks never share a training example.
  """
  contributors, unseen = task_specs(config)
  cursor, relabeled, n = config.cold.start, [], config.cold.examples_per_task
  for spec in contributors + unseen:
    groups = tasks.parse_groups(spec, dataset.num_classes)
    candidates = cursor + np.flatnonzero(np.isin(dataset.train_labels[cursor:], [c for g in groups for c in g]))
    if len(candidates) < n:
      raise ConfigError(f"task {spec!r}: only {len(candidates)} training examples of its classes are left after "
                        f"example {cursor}; lower cold.examples_per_task={n} or cold.start.")
    take = candidates[:n]
    cursor = int(take[-1]) + 1
    own = dataclasses.replace(dataset, train_images=dataset.train_images[take], train_labels=dataset.train_labels[take])
    relabeled.append(tasks.relabel(own, groups, name=spec))
  return relabeled


def glue_tasks(config) -> list[data.Dataset]:
  """Each GLUE task with a seeded random `examples_per_task` of its training examples."""
  contributors, unseen = task_specs(config)
  picked = []
  for name in contributors + unseen:
    task = text_data.load_glue(name, config.data_dir, config.cold.max_len, pretrained.tokenizer(config))
    n = config.cold.examples_per_task
    if len(task.train_labels) < n:
      raise ConfigError(f"GLUE {name} has {len(task.train_labels)} training examples; lower cold.examples_per_task={n}.")
    pick = np.random.default_rng(config.data_seed).permutation(len(task.train_labels))[:n]
    picked.append(dataclasses.replace(task, train_images=task.train_images[pick], train_labels=task.train_labels[pick]))
  return picked


# ----------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict[str, Any]:
  """Runs ColD fusion for each variant and writes the results to `workdir`.

  Fusion is the resumable phase 'fusion' (a checkpoint of the bases so far after every
  `checkpoint.every` rounds); pretraining a base here is the phase 'pretrain'. Every
  (variant, task) model trains on the mesh of `sharding.make_mesh`, as in the other
  experiments.
  """
  validate(config)
  with runtime.Run(config, workdir) as run:
    contributors, unseen = task_specs(config)
    if config.dataset == "glue":
      task_list = glue_tasks(config)
      source = task_list[0]  # the input shape of `load_base`; glue bases are never pretrained
    else:
      source = pretrained.load_dataset(config)  # images, or text_files whose tasks relabel its classes alike
      task_list = image_tasks(config, source)
    stacked = cold_fusion.stack_tasks(task_list, [True] * len(contributors) + [False] * len(unseen),
                                      config.eval_batch_size, config.num_test or None)
    # A missing or corrupt checkpoint stops here, before the workdir; hf: the model is the checkpoint's.
    model, body = pretrained.load_model(config, max(stacked.num_classes), source.image_shape)

    run.start()
    with run.timed("base"):
      base = bases.load_base(config, model, source, body, run)
    variants = schema.values(config, "variants")
    fixed = masks.starting_masks(config, base["params"])
    heads = train.stack([cold_fusion.task_head(model, config.init_seed + t, source.image_shape, k)
                         for t, k in enumerate(stacked.num_classes)])
    steps = config.cold.examples_per_task // config.batch_size
    tx = optim.make_optimizer(config.optimizer, steps * config.cold.epochs_per_round)
    stacked_base = train.stack([base] * len(variants))
    mesh = sharding.make_mesh(len(variants) * len(stacked.names), config.batch_size)

    # Each round is a step of the phase: its checkpoint holds the bases fused so far.
    phase = run.phase("fusion", total=config.cold.rounds + 1, unit="round", names=stacked.names)
    like = lambda meta: {"bases": train.stack([stacked_base] * min(len(meta["history"]) + 1, config.cold.rounds + 1))}
    saved, history = phase.restore({"bases": train.stack([stacked_base])}, like)
    done = None
    if history:
      done = ([train.unstack(saved["bases"], i) for i in range(len(jax.tree.leaves(saved["bases"])[0]))],
              [np.asarray([h[f"accuracy_{v}"] for v in variants], np.float32) for h in history])

    def record(r, states, metrics, fused):
      del states
      phase.record({"round": r, **{f"accuracy_{v}": metrics["accuracy"][i] for i, v in enumerate(variants)},
                    "train_loss": metrics["train_loss"]}, {"bases": train.stack(fused)})

    with run.timed("fusion"):
      accuracy, fused = cold_fusion.cold_fusion(
          model, tx, stacked_base, heads, train.stack([fixed[v] for v in variants]), stacked,
          rounds=config.cold.rounds, epochs=config.cold.epochs_per_round, batch_size=config.batch_size,
          data_seeds=[config.data_seed + t for t in range(len(stacked.names))], mesh=mesh, done=done,
          on_round=record, merger=merging.Merger.from_config(config.cold.merge, config))

    results = {
        "config": config.to_dict(),
        "tasks": [{"name": n, "role": "contributor" if c else "unseen", "num_classes": k,
                   "num_train": int(stacked.train_labels.shape[1]), "num_test": s}
                  for n, c, k, s in zip(stacked.names, stacked.contributes, stacked.num_classes, stacked.test_sizes)],
        "accuracy": {v: {n: accuracy[:, i, t].tolist() for t, n in enumerate(stacked.names)}
                     for i, v in enumerate(variants)},
        "seconds": dict(run.seconds),
    }
    rows = table_rows(results, accuracy, stacked, variants)
    results["summary"] = rows
    write_outputs(run, config, results, fused, fixed, variants)
    pretrained.export(run, config, model, {f"{v}_round{config.cold.rounds}": train.unstack(fused[-1], i)
                                           for i, v in enumerate(variants)})
    run.finish(results, f"\nColD fusion: test accuracy % after fine-tuning each task from the base fused r times "
               f"(r=0: the original base; fused by {config.cold.merge}); {pretrained.model_label(config)} on "
               f"{config.dataset}, base {run.seconds['base']:.0f}s, "
               f"fusion {run.seconds['fusion']:.0f}s:\n" +
               reporting.format_table(rows, table_columns(config.cold.rounds)))
  return results


def table_columns(rounds: int) -> tuple:
  return (("variant", "variant", "s"), ("task", "task", "s"), ("role", "role", "s"),
          *((f"r{r}", f"r{r}", ".2f") for r in range(rounds + 1)), (f"gain r{rounds}-r0", "gain", "+.2f"))


def table_rows(results: dict, accuracy: np.ndarray, stacked: cold_fusion.Tasks, variants: list[str]) -> list[dict]:
  """One row per (variant, task), then each variant's mean over contributors and over unseen tasks."""
  rows = []
  for i, variant in enumerate(variants):
    groups = [(t, name, results["tasks"][t]["role"]) for t, name in enumerate(stacked.names)]
    groups += [(np.flatnonzero(stacked.contributes == c), f"mean ({role})", role)
               for c, role in ((True, "contributor"), (False, "unseen")) if np.any(stacked.contributes == c)]
    for index, name, role in groups:
      per_round = 100 * np.mean(accuracy[:, i, np.atleast_1d(index)], axis=-1)
      rows.append({"variant": variant, "task": name, "role": role,
                   **{f"r{r}": float(a) for r, a in enumerate(per_round)}, "gain": float(per_round[-1] - per_round[0])})
  return rows


def write_outputs(run: runtime.Run, config, results: dict, fused: list[dict], fixed: dict,
                  variants: list[str]) -> None:
  """Checkpoints (original base, masks, fused bases) and cold.png; results.json comes last,
  from `Run.finish`."""
  run.save("base", train.unstack(fused[0], 0))
  for i, variant in enumerate(variants):
    run.save(f"{variant}_mask", fixed[variant])
    for r, base in enumerate(fused[1:], start=1):
      run.save(f"{variant}_round{r}", train.unstack(base, i))
  plot_rounds(run.path("cold.png"), results, f"ColD fusion: {pretrained.model_label(config)} on {config.dataset}")


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
