"""The `soup` experiment: K models fine-tuned from one base, uniform and greedy soups (and the
merging operators of `soup.methods`), with and without one shared TNA-PFN mask.

Every model starts from the same base (`bases.load_base`: a pretrained body and one
shared head initialization) and draws its own hyperparameters: learning-rate factor,
epochs, augmentation; model k sees data order data_seed + k. The variants (vanilla, tna)
use the same K draws, so they are compared model for model. All models with the same
augmentation train in ONE compiled program (`train.fit`): learning rate and epochs differ
inside it through `model_soups.per_model_run`.

With `align = weight | activation`, every model of each variant is also permuted onto that
variant's model 0 (post-hoc matching, `model_soups.align_to_first`) and souped again: the
variants `vanilla+weight`, `tna+weight` (or `+activation`) are the same fine-tuned models,
matched, so one table sets the soups of vanilla, TNA-PFN, matched-vanilla and matched-TNA-PFN
models side by side with no extra training. Activation matching correlates the models on
the first `matching.batches` fine-tuning batches.

`soup.methods` lists the soups: `uniform` and `greedy` (Wortsman et al.; the default), the
operators of `tna_jax.fusion.merging` over all K models (`task_arithmetic`, `ties`, `dare`: task
vectors against the base, hyperparameters `merging.*`) and `greedy:<operator>`, the greedy soup
whose candidates are that operator's merge of the accepted models and the next one
(`model_soups.greedy_soup`). Operators keep the base's values at each unaligned variant's fixed
entries (TNA-PFN's mask; vanilla: what `finetune.trainable` freezes); the uniform and greedy
soups stay the plain means they always were. Matched variants' task vectors are taken against
the base as it is (model 0's coordinates), with no mask, since matching moved the fixed entries.

The training data are training examples [split.start, + split.num_train); the next
split.num_heldout examples are the held-out split that ranks the models, decides the
greedy soup and is what `train.fit` reports per epoch; the test split is only reported.

Writes to the workdir: results.json, soup.png (held-out vs test accuracy of every model
and soup), metrics.jsonl and orbax checkpoints (base, mask, <variant>_<method> for each soup method,
':' written '_'; checkpoints/pretrained when the base was pretrained here; when aligned,
<variant>+<align>_<method> and _perms, the permutation of each model k >= 1).
Pretraining and each fine-tuning group are resumable phases (`tna_jax.runs.runtime`): a
killed run resumes where it stopped when the same command runs again; matching and soups
are deterministic functions of the models.
"""

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
import optax

from tna_jax.alignment import matching
from tna_jax.config import schema
from tna_jax.core import data, evaluate, masks, optim, train
from tna_jax.fusion import bases, merging, model_soups, pretrained, tasks
from tna_jax.runs import reporting, runtime


OPERATOR_LABELS = {"uniform": "uniform soup", "task_arithmetic": "task arithmetic", "ties": "TIES", "dare": "DARE"}
ALIGNMENT_COLUMNS = (
    ("variant", "variant", "s"),
    ("model", "k", "d"),
    ("sweeps", "iterations", "d"),
    ("seconds", "seconds", ".2f"),
    ("units moved", "units_moved", "d"),
)


# ----------------------------------------------------------------------------- config


def planned_models(config) -> int:
  """Fine-tuned models trained side by side at most (all variants' models), for `main --dry_run`."""
  return config.soup.num_models * len(schema.values(config, "variants"))


def validate(config) -> None:
  """Checks every value the run depends on before any data is read or file written."""
  schema.validate(config)


def draw_hyperparameters(config) -> list[dict[str, Any]]:
  """Model k's learning-rate factor, epochs and augmentation, drawn with soup.hparam_seed."""
  rng = np.random.default_rng(config.soup.hparam_seed)
  lr_factors, epochs, augments = (schema.values(config, f"soup.{key}") for key in ("lr_factors", "epochs", "augment"))
  return [{"lr_factor": float(rng.choice(lr_factors)), "epochs": int(rng.choice(epochs)),
           "augment": str(rng.choice(augments)), "data_seed": config.data_seed + k}
          for k in range(config.soup.num_models)]


# ----------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict[str, Any]:
  """Fine-tunes the K models of each variant, makes the soups and writes everything.

  Pretraining (when the base is pretrained here) and each group of fine-tuned models are
  resumable phases of the run; the soups are deterministic functions of the models.
  """
  validate(config)
  with runtime.Run(config, workdir) as run:
    dataset = pretrained.load_dataset(config, None, config.num_test or None)
    split = config.split
    finetune_ds = tasks.train_range(dataset, split.start, split.num_train, "split")
    heldout = tasks.train_range(dataset, split.start + split.num_train, split.num_heldout, "split.num_heldout")
    train.check_batch_size(config.batch_size, split.num_train, "fine-tuning examples (split.num_train)")
    # train.fit reports its per-epoch "test" metrics on the held-out split: the test split stays unseen.
    finetune_ds = dataclasses.replace(finetune_ds, test_images=heldout.train_images, test_labels=heldout.train_labels)
    # A missing or corrupt checkpoint stops here, before the workdir; hf: the model is the checkpoint's.
    model, body = pretrained.load_model(config, dataset.num_classes, dataset.image_shape)

    run.start()
    with run.timed("base"):
      base = bases.load_base(config, model, dataset, body, run)
    fixed = masks.starting_masks(config, base["params"])
    variants = schema.values(config, "variants")
    hparams = draw_hyperparameters(config)
    with run.timed("finetune"):
      stacked = finetune(run, config, model, base, fixed, variants, hparams, finetune_ds)
    aligned = {}
    if config.align != "none":
      with run.timed("align"):
        aligned = align_variants(config, model, stacked, finetune_ds)
    with run.timed("soups"):
      batches = {"heldout": evaluate.make_batches(heldout.train_images, heldout.train_labels, config.eval_batch_size),
                 "test": evaluate.make_batches(dataset.test_images, dataset.test_labels, config.eval_batch_size)}
      # Each stack with the mask its operators keep: none for matched models (matching moved their fixed entries).
      souped = {**{v: (stacked[v].variables, fixed[v]) for v in variants},
                **{v: (a[0], masks.no_mask(base["params"])) for v, a in aligned.items()}}
      methods = schema.values(config, "soup.methods")
      mergers = {name: merging.Merger.from_config(name, config) for name in merging.NAMES}
      results = {"config": config.to_dict(), "hyperparameters": hparams,
                 "variants": {v: make_soups(model, models_of_v, batches, dataset, methods, mergers, base, fixed_of_v)
                              for v, (models_of_v, fixed_of_v) in souped.items()}}
    for variant, (_, matches) in aligned.items():
      results["variants"][variant]["alignment"] = [alignment_summary(result) for result in matches]
    results["seconds"] = dict(run.seconds)

    pretrained.export(run, config, model, {soup_checkpoint(v, name): variables for v, r in results["variants"].items()
                                           for name, variables in r["soups"].items()})
    rows = summary_rows(results["variants"], methods)
    write_outputs(run, config, results, base, fixed, stacked, aligned)
    seconds = run.seconds
    matched = f", {config.align} matching {seconds['align']:.1f}s" if aligned else ""
    matching_table = ("\n\nMatching of each model onto model 0 of its variant (compilation excluded):\n" +
                      reporting.format_table(alignment_rows(results["variants"]), ALIGNMENT_COLUMNS)) if aligned else ""
    run.finish(results, f"\nPer model (held-out / test accuracy %, {pretrained.model_label(config)} on "
               f"{config.dataset}):\n" +
               reporting.format_table(model_rows(results), model_columns(variants)) +
               f"\n\nModel soups of {config.soup.num_models} fine-tuned models (base {seconds['base']:.0f}s, "
               f"fine-tuning {seconds['finetune']:.0f}s{matched}, soups {seconds['soups']:.1f}s); each cell "
               "held-out % / test %, greedy soups with their ingredients:\n" +
               reporting.format_table(rows, summary_columns(results["variants"])) + matching_table)
  return results


def finetune(run: runtime.Run, config, model, base: dict, fixed: dict, variants: list[str], hparams: list[dict],
             dataset: data.Dataset) -> dict[str, train.TrainState]:
  """Trains every (variant, model) pair; one `train.fit` per augmentation setting, each a
  resumable phase `finetune_<augment>` of `run`.

  Returns each variant's K trained states stacked in model order.
  """
  steps_per_epoch = len(dataset.train_labels) // config.batch_size
  max_epochs = max(h["epochs"] for h in hparams)
  tx = optax.chain(optim.make_optimizer(config.optimizer, steps_per_epoch * max_epochs), model_soups.per_model_run())
  trained = {}
  for augment in sorted({h["augment"] for h in hparams}):
    members = [(v, k) for v in variants for k, h in enumerate(hparams) if h["augment"] == augment]
    states = train.stack([
        model_soups.set_run(train.init_train_state(tx, base, fixed[v]), hparams[k]["lr_factor"],
                     hparams[k]["epochs"] * steps_per_epoch) for v, k in members])
    names = [f"{v}_{k}" for v, k in members]
    num_epochs = max(hparams[k]["epochs"] for _, k in members)
    phase = run.phase(f"finetune_{augment}", total=num_epochs, unit="epoch", names=names)
    states, history = phase.restore(states)
    print(f"fine-tuning {', '.join(names)} (augment {augment}) in one program; per-epoch accuracy is held-out")
    states, _ = train.fit(
        model, tx, states, [hparams[k]["data_seed"] for _, k in members], dataset, num_epochs=num_epochs,
        batch_size=config.batch_size, eval_batch_size=config.eval_batch_size, flip="flip" in augment,
        crop_padding=config.soup.crop_padding if "crop" in augment else 0, history=history,
        on_epoch=lambda record, states, phase=phase: phase.record(
            {key.replace("test_", "heldout_"): value for key, value in record.items()}, states))
    for i, member in enumerate(members):
      trained[member] = train.unstack(states, i)
  return {v: train.stack([trained[(v, k)] for k in range(len(hparams))]) for v in variants}


def align_variants(config, model, stacked: dict[str, train.TrainState],
                   dataset: data.Dataset) -> dict[str, tuple[dict, list[matching.MatchResult]]]:
  """Each variant's models permuted onto its model 0 by `config.align`, as the variant
  '<variant>+<align>': (the aligned stack, the matching of models 1..K-1).

  Soups of these are plain means: `masks.keep_fixed` is not applied (as for the unaligned
  soups), and it must not be, since alignment moves each model's fixed entries
  (`model_soups.align_to_first`).
  """
  images = None
  if config.align == "activation":
    images = matching.training_batches(dataset, config.matching.batches, config.batch_size)
  aligned = {}
  for variant, states in stacked.items():
    aligned[f"{variant}+{config.align}"] = model_soups.align_to_first(
        config.align, model, states.variables, images=images, mean=dataset.mean, std=dataset.std,
        seed=config.matching.seed, max_iterations=config.matching.max_iterations, solver=config.matching.solver)
  return aligned


def alignment_summary(result: matching.MatchResult) -> dict[str, float]:
  """One model's matching onto model 0, JSON-ready: the search's cost and objective, and
  how many units it moved (0: the model was already aligned)."""
  moved = sum(int(np.sum(np.asarray(perm) != np.arange(len(perm)))) for perm in result.perms.values())
  return {**result.summary(), "units_moved": moved}


def make_soups(model, stacked: dict, batches: dict, dataset: data.Dataset,
               methods: Sequence[str] = ("uniform", "greedy"), mergers: dict[str, merging.Merger] | None = None,
               base: dict | None = None, fixed: dict | None = None) -> dict[str, Any]:
  """Held-out and test accuracy of every model of the stacked variables, of each soup of
  `methods` (`merging.SOUP_METHODS`) and of the best model.

  Operators other than uniform merge task vectors against `base` with `mergers[name]`, keeping
  the entries of `fixed` (`masks.no_mask`: none). The K models and every soup are evaluated together:
  one compiled call per split.
  """
  k = jax.tree.leaves(stacked)[0].shape[0]
  soups, greedy = {}, {}
  for method in methods:
    is_greedy, name = merging.soup_operator(method)
    if is_greedy:
      merger = None if name == "uniform" else mergers[name]
      greedy[method] = model_soups.greedy_soup(model, stacked, batches["heldout"], dataset.mean, dataset.std,
                                               merger=merger, base=base, fixed=fixed)
      soups[method] = greedy[method].variables
    elif name == "uniform":
      soups[method] = model_soups.uniform_soup(stacked)
    else:
      soups[method] = merging.merge_variables(mergers[name], base, stacked, fixed=fixed)
  everything = jax.tree.map(lambda x, *s: np.concatenate([x, *(v[None] for v in s)]), stacked, *soups.values())
  accuracy = {split: np.asarray(model_soups.evaluate_stack(model, everything, b, dataset.mean, dataset.std)["accuracy"])
              for split, b in batches.items()}
  best = int(np.argmax(accuracy["heldout"][:k]))
  results = {
      "individual": {split: acc[:k].tolist() for split, acc in accuracy.items()},
      "best_single": {"index": best, "heldout": float(accuracy["heldout"][best]), "test": float(accuracy["test"][best])},
  }
  for i, method in enumerate(soups):
    results[method] = {split: float(acc[k + i]) for split, acc in accuracy.items()}
    if method in greedy:
      results[method].update(ingredients=np.flatnonzero(np.asarray(greedy[method].ingredients)).tolist(),
                             order=np.asarray(greedy[method].order).tolist(),
                             candidate_heldout=np.asarray(greedy[method].candidate_accuracy).tolist())
  results["soups"] = soups
  return results


# ----------------------------------------------------------------------------- outputs


def method_label(method: str) -> str:
  """'greedy soup', 'TIES', 'greedy TIES', ... for a `soup.methods` item."""
  is_greedy, name = merging.soup_operator(method)
  if method == "greedy":
    return "greedy soup"
  return f"greedy {OPERATOR_LABELS[name]}" if is_greedy else OPERATOR_LABELS[name]


def summary_columns(per_variant: dict) -> tuple:
  return (("model", "method", "s"), *((variant, variant, "s") for variant in per_variant))


def summary_rows(per_variant: dict, methods: list[str]) -> list[dict]:
  """One row per soup (after the mean of the models and the best single one), one column per
  variant: every operator beside every variant, each cell 'held-out % / test %'."""
  cell = lambda r: f"{100 * r['heldout']:.2f} / {100 * r['test']:.2f}"
  rows = [{"method": "mean of models", **{v: f"{100 * np.mean(r['individual']['heldout']):.2f} / "
                                            f"{100 * np.mean(r['individual']['test']):.2f}"
                                         for v, r in per_variant.items()}},
          {"method": "best single", **{v: f"{cell(r['best_single'])} (#{r['best_single']['index']})"
                                      for v, r in per_variant.items()}}]
  for method in methods:
    row = {"method": method_label(method)}
    for v, r in per_variant.items():
      k = len(r["individual"]["test"])
      row[v] = cell(r[method]) + (f" ({len(r[method]['ingredients'])}/{k})" if "ingredients" in r[method] else "")
    rows.append(row)
  return rows


def alignment_rows(per_variant: dict) -> list[dict]:
  return [{"variant": variant, "k": k, **summary} for variant, r in per_variant.items()
          for k, summary in enumerate(r.get("alignment", ()), start=1)]


def model_columns(variants: list[str]) -> tuple:
  return (("model", "k", "d"), ("lr factor", "lr_factor", "g"), ("epochs", "epochs", "d"), ("augment", "augment", "s"),
          *((f"{v} held-out", f"{v}_heldout", ".2f") for v in variants),
          *((f"{v} test", f"{v}_test", ".2f") for v in variants))


def model_rows(results: dict) -> list[dict]:
  rows = []
  for k, h in enumerate(results["hyperparameters"]):
    row = {"k": k, **h}
    for v, r in results["variants"].items():
      row[f"{v}_heldout"] = 100 * r["individual"]["heldout"][k]
      row[f"{v}_test"] = 100 * r["individual"]["test"][k]
    rows.append(row)
  return rows


def soup_checkpoint(variant: str, method: str) -> str:
  """The name of a soup's checkpoint (and Hugging Face export): 'tna_greedy_ties' for method 'greedy:ties'."""
  return f"{variant}_{method.replace(':', '_')}"


def write_outputs(run: runtime.Run, config, results: dict, base: dict, fixed: dict, stacked: dict,
                  aligned: dict[str, tuple[dict, list[matching.MatchResult]]]) -> None:
  """Checkpoints (base, masks, every model, the soups; when aligned, each matched model's
  permutations instead of the matched models) and soup.png; results.json comes last, from
  `Run.finish`."""
  run.save("base", base)
  for variant in stacked:
    run.save(f"{variant}_mask", fixed[variant])
    for k in range(config.soup.num_models):
      run.save(f"{variant}_{k}", train.unstack(stacked[variant].variables, k))
  for variant, r in results["variants"].items():
    for name, variables in r.pop("soups").items():
      run.save(soup_checkpoint(variant, name), variables)
  for variant, (_, matches) in aligned.items():
    run.save(f"{variant}_perms", {str(k): result.perms for k, result in enumerate(matches, start=1)})
  plot_soups(run.path("soup.png"), results["variants"],
             f"Model soups: {config.soup.num_models} x {pretrained.model_label(config)} on {config.dataset}")


def plot_soups(path, per_variant: dict, title: str) -> None:
  """Held-out vs test accuracy: every model as a dot, the soups and the best model marked."""
  fig, ax = reporting.pyplot().subplots(figsize=(6.5, 5))
  for i, (variant, r) in enumerate(per_variant.items()):
    color = f"C{i}"
    ax.scatter(100 * np.asarray(r["individual"]["heldout"]), 100 * np.asarray(r["individual"]["test"]), color=color,
               alpha=0.6, label=f"{variant}: fine-tuned models")
    soups = [m for m in merging.SOUP_METHODS if m in r]
    for method, marker in zip(soups, ("*", "D", "s", "^", "v", "P", "X", "p")):
      ax.scatter(100 * r[method]["heldout"], 100 * r[method]["test"], color=color, marker=marker, s=160,
                 edgecolor="black", label=f"{variant}: {method_label(method)}")
  ax.set(xlabel="held-out accuracy (%)", ylabel="test accuracy (%)", title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  reporting.write_png(fig, path)
