"""The `lmc` experiment: vanilla vs TNA-PFN vs pruning-at-init (and Lim et al.'s W-Asymmetric and
σ-Asymmetric nets, `tna_jax.core.asymmetric`), measured by LMC barriers.

All models start from one initialization. Each variant trains `num_models` models that
differ only in data order; TNA-PFN and pruning share one mask. Every model of every variant
trains in ONE vmapped program (sigma_asym's FiGLU MLP, another module, in a second), then
each variant's pair (models 0 and 1) gets an LMC curve
(one compiled call each), and for BatchNorm models a second curve with statistics
re-estimated at every alpha.

With K = `num_models` models per variant, every two of them get a curve (the pair's is
reused), whose barriers make the variant's K x K barrier matrix, and the K-way weight
average ("fusion", `fusion.model_soups.uniform_soup`) is scored on the test set next to the
models' mean accuracy: `k_models` in results.json, and a second table when K > 2.

With `align = weight | activation`, model 1 of each pair is also permuted onto model 0
(post-hoc matching, `tna_jax.alignment.matching`) and every curve is measured again, so one run
compares TNA-PFN, post-hoc matching and both; with `repair = True` every curve is also
measured with REPAIR. The table then shows each barrier before and after alignment, with
the matching's coordinate-descent sweeps and seconds.

Writes to the workdir: results.json, lmc_curves.png (and lmc_curves_aligned.png),
metrics.jsonl and tensorboard/ (per epoch) and orbax checkpoints (checkpoints/init, checkpoints/mask,
checkpoints/<variant>_<k>, and when aligned <variant>_1_aligned and <variant>_perms).
"""

from typing import Any

from absl import logging
import jax

from tna_jax.alignment import matching
from tna_jax.alignment.measurement import (align_pairs, check_finite_curves, make_measurement, measure_curves,
                                           measure_k_models)
from tna_jax.config import schema
from tna_jax.core import asymmetric, data, execution, mask_schedule, masks, models, optim, sharding, train
from tna_jax.fusion import pretrained
from tna_jax.runs import reporting, runtime


TABLE_COLUMNS = (
    ("variant", "variant", "s"),
    ("curve", "curve", "s"),
    ("acc A %", "accuracy_a", ".2f"),
    ("acc B %", "accuracy_b", ".2f"),
    ("mid acc %", "accuracy_mid", ".2f"),
    ("loss barrier", "loss_barrier", ".4f"),
    ("acc barrier pp", "accuracy_barrier_pp", ".2f"),
    ("acc barrier rel", "accuracy_barrier_rel", ".4f"),
)
ALIGNED_COLUMNS = (
    ("aligned mid acc %", "aligned_accuracy_mid", ".2f"),
    ("aligned loss barrier", "aligned_loss_barrier", ".4f"),
    ("aligned acc barrier pp", "aligned_accuracy_barrier_pp", ".2f"),
    ("match iters", "match_iterations", "d"),
    ("match s", "match_seconds", ".2f"),
)
K_MODEL_COLUMNS = (
    ("variant", "variant", "s"),
    ("curve", "bn_mode", "s"),
    ("models", "num_models", "d"),
    ("mean loss barrier", "loss_barrier_mean", ".4f"),
    ("max loss barrier", "loss_barrier_max", ".4f"),
    ("mean acc barrier pp", "accuracy_barrier_pp_mean", ".2f"),
    ("max acc barrier pp", "accuracy_barrier_pp_max", ".2f"),
    ("mean acc %", "mean_endpoint_accuracy", ".2f"),
    ("fused acc %", "fused_accuracy", ".2f"),
    ("fused loss", "fused_loss", ".4f"),
)


def validate(config) -> None:
  """Checks every value the run depends on before any data is read or file written."""
  schema.validate(config)


def planned_models(config) -> int:
  """Models trained side by side (every variant's pair), for `main --dry_run`."""
  return config.num_models * len(schema.values(config, "variants"))


def run(config, workdir: str) -> dict[str, Any]:
  """Trains the variants, measures their LMC curves and writes everything to `workdir`.

  Training is a resumable phase ('train', a checkpoint every `checkpoint.every` epochs; 'train_1'
  for the second program when sigma_asym trains beside other variants);
  matching and curves are deterministic functions of the trained models, so a resumed run
  ends with the same results as an uninterrupted one.
  """
  validate(config)
  with runtime.Run(config, workdir) as run:
    dataset = pretrained.load_dataset(config, config.num_train or None, config.num_test or None)
    train.check_batch_size(config.batch_size, len(dataset.train_labels))
    # base.source=hf: every model is fine-tuned from the checkpoint's variables (the LMC of pretrained models).
    model, variables = pretrained.load_model(config, dataset.num_classes, dataset.image_shape)
    init_key = jax.random.key(config.init_seed)
    if variables is None:
      variables = models.init_variables(model, init_key, dataset.image_shape, config.model.init)
    params = variables["params"]
    mask_spec = masks.MaskSpec.from_config(config.mask)
    total_steps = len(dataset.train_labels) // config.batch_size * config.num_epochs
    schedule = mask_schedule.Schedule.from_config(config.mask)
    variants = schema.values(config, "variants")

    def start(variant: str) -> tuple[dict, Any, Any]:
      """The variant's (initial variables, mask, release), from the one init (sigma_asym: of its FiGLU MLP)."""
      own_model = asymmetric.variant_model(variant, model, config.sigma_asym.scale)
      own = variables if own_model is model else models.init_variables(own_model, init_key, dataset.image_shape,
                                                                         config.model.init)
      wasym = asymmetric.WAsymSpec.from_config(config.wasym) if variant == "wasym" else None
      return mask_schedule.training_start(variant, own, mask_spec, config.pruning_fraction, schedule, total_steps,
                                          wasym)

    started = list(dict.fromkeys(("tna", "pruning", *variants)))
    starts = dict(zip(started, mask_schedule.with_releases([start(v) for v in started])))
    tna_mask, pruning_mask = starts["tna"][1], starts["pruning"][1]
    k = config.num_models
    logging.info("Model %s: %d parameters; fixed fraction %.3f (tna), %.3f (pruning)", pretrained.model_label(config),
                 sum(p.size for p in jax.tree.leaves(params)), masks.fraction_fixed(tna_mask),
                 masks.fraction_fixed(pruning_mask))

    tx = optim.make_optimizer(config.optimizer, total_steps)
    # One compiled program per module: every variant but sigma_asym (the FiGLU MLP) trains in the first.
    groups = []
    program_groups = asymmetric.model_groups(model, variants, config.sigma_asym.scale)
    for g, (group_model, group_variants) in enumerate(program_groups):
      group_names = [f"{v}_{i}" for v in group_variants for i in range(k)]
      mesh = sharding.make_mesh(len(group_names), config.batch_size)
      states = train.create_states(
          lambda starts: train.stack([train.init_train_state(tx, *starts[v]) for v in group_variants
                                      for _ in range(k)]),  # called at once: the loop variable is current
          mesh, {v: starts[v] for v in group_variants})
      groups.append((g, group_model, group_variants, group_names, mesh, states))

    run.start()
    names, final, trained, curves, aligned_curves, rows, k_models, aligned, speeds = [], {}, {}, {}, {}, [], {}, {}, []
    for g, group_model, group_variants, group_names, mesh, states in groups:
      policy = execution.policy(mesh)
      phase = run.phase("train" if g == 0 else f"train_{g}", total=config.num_epochs, unit="epoch",
                        names=group_names)
      states, history = phase.restore(states)
      with run.timed("train"):
        states, history = train.fit(
            group_model, tx, states, [config.data_seed + i for _ in group_variants for i in range(k)], dataset,
            num_epochs=config.num_epochs, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
            flip=config.augment.flip, crop_padding=config.augment.crop_padding, on_epoch=phase.record,
            history=history, mesh=mesh, policy=policy, eval_every=config.eval_every)
      with run.timed("lmc"):
        group_aligned = align_pairs(config, group_model, states.variables, group_variants, dataset, policy)
        measurement = make_measurement(config, group_model, states.variables, dataset, policy)
        group_curves, group_aligned_curves, group_rows = measure_curves(config, states.variables, group_variants,
                                                                        group_aligned, measurement)
        group_k_models, k_model_curves = measure_k_models(config, states.variables, group_variants, group_curves,
                                                          measurement)
      check_finite_curves(group_curves, group_aligned_curves, k_model_curves)
      names += group_names
      final.update({n: {key: history[-1][key][i] for key in ("test_accuracy", "test_loss")}
                    for i, n in enumerate(group_names)})
      trained.update({n: train.unstack(states.variables, i) for i, n in enumerate(group_names)})
      curves.update(group_curves)
      aligned_curves.update(group_aligned_curves)
      rows += group_rows
      k_models.update(group_k_models)
      aligned.update(group_aligned)
      speeds.append(train.speed_summary(history))
    rows.sort(key=lambda row: variants.index(row["variant"]))  # stable: each variant's curves keep their order

    results = {
        "config": config.to_dict(),
        "models": names,
        "final": final,
        "alphas": curves.pop("alphas"),
        "curves": curves,
        "summary": rows,
        "k_models": k_models,
        "train_seconds": run.seconds["train"],
        "lmc_seconds": run.seconds["lmc"],
        "train_speed": speeds[0],  # the first program's (every variant but sigma_asym)
    }
    if aligned:
      results["aligned_curves"] = aligned_curves
      results["alignment"] = {variant: {"method": config.align, **result.summary()}
                              for variant, (_, result) in aligned.items()}
    write_outputs(run, config, results, variables, tna_mask, trained, aligned)
    extras = (f", align={config.align}" if aligned else "") + (", REPAIR" if config.repair else "")
    k_model_table = ""
    if k > 2:
      k_model_table = (f"\n\nAll {k * (k - 1) // 2} pairs of the {k} models of each variant, and their weight average "
                       "(fused):\n" + reporting.format_table(list(k_models.values()), K_MODEL_COLUMNS))
    run.finish(results, f"\nLMC between models 0 and 1 of each variant ({pretrained.model_label(config)} on "
               f"{config.dataset}, "
               f"{config.num_epochs} epochs{extras}, train {run.seconds['train']:.0f}s, curves "
               f"{run.seconds['lmc']:.1f}s):\n" +
               reporting.format_table(rows, TABLE_COLUMNS + (ALIGNED_COLUMNS if aligned else ())) + k_model_table +
               "\n\nTraining speed (median epoch, compilation excluded):\n" +
               reporting.format_table([results["train_speed"]], train.SPEED_COLUMNS))
  return results


def write_outputs(run: runtime.Run, config, results: dict, init_variables: dict, mask, trained: dict[str, dict],
                  aligned: dict[str, tuple[dict, matching.MatchResult]]) -> None:
  """The curves' PNGs and orbax checkpoints of init, mask, every model and, when aligned,
  each variant's aligned model 1 and its permutations (results.json comes last, from
  `Run.finish`)."""
  run.save("init", init_variables)
  run.save("mask", mask)
  for name, variables in trained.items():
    run.save(name, variables)
  for variant, (variables, result) in aligned.items():
    run.save(f"{variant}_1_aligned", variables)
    run.save(f"{variant}_perms", result.perms)
  rows = results["summary"]
  run.writer.write_curves(
      "lmc", results["alphas"],
      {**results["curves"], **{f"{k} aligned": v for k, v in results.get("aligned_curves", {}).items()}},
      table="    " + reporting.format_table(rows, TABLE_COLUMNS).replace("\n", "\n    "),  # a markdown code block
      hparams=config.to_dict(), results={f"{key}/{row['variant']}/{row['curve']}": row[key] for row in rows
               for key in ("loss_barrier", "accuracy_barrier_pp")})
  title = f"LMC: {pretrained.model_label(config)} on {config.dataset}"
  labels = curve_labels(config, results["curves"])
  reporting.plot_curves(run.path("lmc_curves.png"), results["alphas"], results["curves"], title, labels)
  if aligned:
    reporting.plot_curves(run.path("lmc_curves_aligned.png"), results["alphas"], results["aligned_curves"],
                          f"{title}, model 1 aligned by {config.align} matching", labels)


def curve_labels(config, names) -> dict[str, str]:
  """Curve names ('tna (reset BN) +REPAIR') as a reader reads them: the variant spelled out
  with its ratio ('TNA-PFN (40 % fixed) (reset BN) +REPAIR')."""
  labels = {}
  for name in names:
    variant, _, rest = name.partition(" ")
    spelled = reporting.variant_label(variant, config.mask.fixed_fraction, config.pruning_fraction,
                                      schedule=mask_schedule.Schedule.from_config(config.mask).describe(),
                                      fixed_per_unit=config.get("wasym", {}).get("fixed_per_unit"))  # older: none
    labels[name] = f"{spelled} {rest}".strip()
  return labels
