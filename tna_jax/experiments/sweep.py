"""The `sweep` experiment: the paper's figures, LMC barriers against a grid of settings over seeds.

A sweep is a grid of `lmc` runs (`sweep.grid`, `tna_jax.config.grid`: e.g. the mask ratio of
TNA-PFN and pruning, the width, the depth, the masked layers) crossed with `sweep.seeds`
replicates. Replicate r of a point is the lmc run of that point's config with init_seed + r,
mask.seed + r and data seeds data_seed + r * num_models + i, so the replicates differ in
initialization, mask and data order.

Few compiled programs: a grid point's variant trains `num_models` models, and every model
whose training compiles to the same program (same model shapes, optimizer, epochs and
batches: `program_key`) trains in ONE `train.fit` call with the others, its mask and initial
values being arguments stacked on the model axis (vmapped on accelerators, one after another
on CPU). Points of other shapes (width, depth) get a program each. Models that would train
identically are trained once (`training_identity`): vanilla does not depend on the mask
ratio, and a ratio of 0 is vanilla. The run reports how many models and programs it used.

Each (point, replicate) is then measured as the lmc experiment measures a run
(`tna_jax.alignment.measurement`): per variant, the curve between models 0 and 1 (per
BatchNorm mode, with REPAIR and after alignment when configured), the barrier matrix of
all K models and the accuracy of their weight average. Every curve gives one tidy row.

Resumable point by point: each program's training is a phase (a checkpoint every
`checkpoint.every` epochs) and the measurement is a phase with a checkpoint after every
(point, replicate), so a killed sweep started again continues where it stopped and ends with
the results of an uninterrupted one.

Writes to the workdir: results.json (rows, summary, grid, models and programs),
sweep_rows.csv (one row per point, variant, curve and seed), sweep_summary.csv (mean, std
and 95 % interval over seeds), sweep.png and sweep.pdf (barriers and accuracy against the
first axis, bands of one standard deviation), metrics.jsonl and tensorboard/.
"""

import json
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from tna_jax.alignment import measurement
from tna_jax.config import grid, schema
from tna_jax.core import asymmetric, data, execution, mask_schedule, masks, models, optim, sharding, train
from tna_jax.runs import aggregate, reporting, runtime, workdir

# The keys whose values decide the compiled training program (besides the dataset).
PROGRAM_SECTIONS = ("model.", "optimizer.", "augment.")
PROGRAM_KEYS = ("num_models", "num_epochs", "batch_size", "eval_every")
MASK_KEYS = ("granularity", "include", "exclude", "seed")  # with the ratio: what draws a variant's mask
DRAW_KEYS = {"tna": tuple(f"mask.{k}" for k in MASK_KEYS), "pruning": tuple(f"mask.{k}" for k in MASK_KEYS),
             "wasym": ("wasym.scale", "wasym.seed")}  # per variant, with its ratio: what draws its fixed entries


class Job(NamedTuple):
  """The `num_models` models of one variant at one point and replicate, trained together."""

  variant: str
  config: ml_collections.ConfigDict  # the point's config with the replicate's seeds


def validate(config) -> None:
  """Checks every value the run depends on, every grid point included, before any data is read."""
  schema.validate(config)


def axes(config) -> list[grid.Axis]:
  """The axes of the config's `sweep.grid`."""
  return grid.parse(config.sweep.grid, schema.declared(config.experiment))


def replicate(point: ml_collections.ConfigDict, r: int) -> ml_collections.ConfigDict:
  """The point's config for replicate `r`: its init, mask (and W-Asymmetric) and data seeds moved by r."""
  return grid.apply(point, {"init_seed": point.init_seed + r, "mask.seed": point.mask.seed + r,
                            "wasym.seed": point.wasym.seed + r, "data_seed": point.data_seed + r * point.num_models})


def units(config) -> list[tuple[dict[str, Any], int, ml_collections.ConfigDict]]:
  """Every (grid overrides, replicate, config) of the sweep, the replicates of a point together."""
  return [(overrides, r, replicate(grid.apply(config, overrides), r))
          for overrides in grid.points(axes(config)) for r in range(config.sweep.seeds)]


def program_key(config, variant: str) -> str:
  """What the compiled training program depends on: models with equal keys train together
  (sigma_asym's FiGLU MLP is a module of its own)."""
  flat = workdir.flat(config)
  return json.dumps({"figlu_scale": config.sigma_asym.scale if variant == "sigma_asym" else None,
                     **{k: v for k, v in flat.items() if k.startswith(PROGRAM_SECTIONS) or k in PROGRAM_KEYS}},
                    sort_keys=True)


def training_identity(job: Job) -> str:
  """Equal for jobs whose models train bit-identically: the program, the init and data seeds,
  and the draw of the fixed entries (none for vanilla and for a ratio of 0, which is vanilla;
  sigma_asym's fixed F comes with its program and init) with TNA-PFN's schedule (none when constant)."""
  config, variant = job.config, job.variant
  ratio = grid.get_value(config, reporting.RATIO_KEYS[variant]) if variant in reporting.RATIO_KEYS else None
  mask = None
  if variant == "sigma_asym":
    mask = {"variant": variant}
  elif ratio:
    schedule = mask_schedule.Schedule.from_config(config.mask).key() if variant == "tna" else {}
    mask = {"variant": variant, "ratio": ratio,
            **{k.split(".", 1)[-1]: grid.get_value(config, k) for k in DRAW_KEYS[variant]}, **schedule}
  return json.dumps({"program": program_key(config, variant), "init_seed": config.init_seed,
                     "data_seed": config.data_seed, "mask": mask}, sort_keys=True)


def plan(config) -> tuple[list[list[Job]], dict[str, tuple[int, int]]]:
  """The training programs: ([the jobs of each program], {training identity: (program, index)})."""
  programs: dict[str, list[Job]] = {}
  where: dict[str, tuple[int, int]] = {}
  for _, _, point in units(config):
    for variant in schema.values(config, "variants"):
      job = Job(variant, point)
      identity = training_identity(job)
      if identity not in where:
        key = program_key(point, variant)
        jobs = programs.setdefault(key, [])
        where[identity] = (list(programs).index(key), len(jobs))
        jobs.append(job)
  return list(programs.values()), where


def planned_programs(config, programs: list[list[Job]] | None = None) -> list[tuple[ml_collections.ConfigDict, int]]:
  """(config, models) of each compiled training program (of `programs`, default `plan(config)`'s),
  for `main --dry_run`'s estimates and the run's count."""
  return [(jobs[0].config, jobs[0].config.num_models * len(jobs)) for jobs in programs or plan(config)[0]]


def planned_models(config) -> int:
  """Models the sweep trains (each distinct one once), for `main --dry_run`."""
  return sum(count for _, count in planned_programs(config))


def run(config, workdir_path: str) -> dict[str, Any]:
  """Trains every distinct model of the grid, measures every point and replicate, and writes
  the rows, the summary over seeds and the figure to `workdir_path`."""
  validate(config)
  with runtime.Run(config, workdir_path) as run:
    dataset = data.load_dataset(config.dataset, config.data_dir, config.num_train or None, config.num_test or None)
    train.check_batch_size(config.batch_size, len(dataset.train_labels))
    programs, where = plan(config)
    num_models = sum(count for _, count in planned_programs(config, programs))
    num_points = len(grid.points(axes(config)))
    print(f"Sweep: {num_points} points x {config.sweep.seeds} seeds; {num_models} distinct "
          f"models in {len(programs)} compiled training programs")
    run.start()
    trained = []
    with run.timed("train"):
      for p, jobs in enumerate(programs):
        trained.append(train_program(run, f"train_{p}", jobs, dataset))
    with run.timed("measure"):
      rows = measure(run, config, programs, where, trained, dataset)

    summary = summarize(config, rows)
    results = {
        "config": config.to_dict(),
        "grid": [{"keys": list(axis.keys), "values": list(axis.values)} for axis in axes(config)],
        "seeds": config.sweep.seeds,
        "models": num_models,
        "programs": len(programs),
        "rows": rows,
        "summary": summary,
        "train_seconds": run.seconds["train"],
        "measure_seconds": run.seconds["measure"],
    }
    write_outputs(run, config, results)
    run.finish(results, f"\nSweep of {config.model.name} on {config.dataset} ({num_points} points, "
               f"{config.sweep.seeds} seeds, {num_models} models in {len(programs)} programs; train "
               f"{run.seconds['train']:.0f}s, curves {run.seconds['measure']:.0f}s), mean ± std over seeds:\n" +
               aggregate.summary_table(summary, grid_keys(config)))
  return results


def train_program(run: runtime.Run, name: str, jobs: list[Job], dataset: data.Dataset) -> dict:
  """Trains the `num_models` models of every job as ONE compiled program (a resumable phase
  `name`); returns their stacked variables, job j's models at [j * num_models, (j + 1) * num_models)."""
  config = jobs[0].config
  k = config.num_models
  model = asymmetric.variant_model(jobs[0].variant, models.get_model(config.model, dataset.num_classes),
                                   config.sigma_asym.scale)
  init = {seed: models.init_variables(model, jax.random.key(seed), dataset.image_shape, config.model.init)
          for seed in sorted({job.config.init_seed for job in jobs})}
  total_steps = len(dataset.train_labels) // config.batch_size * config.num_epochs
  starts = mask_schedule.with_releases([
      mask_schedule.training_start(job.variant, init[job.config.init_seed], masks.MaskSpec.from_config(job.config.mask),
                                   job.config.pruning_fraction, mask_schedule.Schedule.from_config(job.config.mask),
                                   total_steps, asymmetric.WAsymSpec.from_config(job.config.wasym)) for job in jobs])
  tx = optim.make_optimizer(config.optimizer, total_steps)
  names = [f"{name}/{j}_{job.variant}_{i}" for j, job in enumerate(jobs) for i in range(k)]
  data_seeds = [job.config.data_seed + i for job in jobs for i in range(k)]
  mesh = sharding.make_mesh(len(names), config.batch_size)
  policy = execution.policy(mesh)
  states = train.create_states(
      lambda starts: train.stack([train.init_train_state(tx, *start) for start in starts for _ in range(k)]),
      mesh, starts)
  phase = run.phase(name, total=config.num_epochs, unit="epoch", names=names)
  states, history = phase.restore(states)
  if phase.done < config.num_epochs:
    print(f"{name}: {len(names)} models of {config.model.name} as one program")
    states, _ = train.fit(
        model, tx, states, data_seeds, dataset, num_epochs=config.num_epochs, batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size, flip=config.augment.flip, crop_padding=config.augment.crop_padding,
        on_epoch=phase.record, history=history, mesh=mesh, policy=policy, eval_every=config.eval_every)
  return jax.device_get(states.variables)


def measure(run: runtime.Run, config, programs: list[list[Job]], where: dict[str, tuple[int, int]],
            trained: list[dict], dataset: data.Dataset) -> list[dict]:
  """The tidy rows of every (point, replicate): a resumable phase with a checkpoint after each.

  A trained variant is measured once however many points share it (vanilla at every ratio);
  what was measured before a resume is read back from the phase's history.
  """
  all_units = units(config)
  variants = schema.values(config, "variants")
  phase = run.phase("measure", total=len(all_units), unit="point", every=1)
  _, history = phase.restore({"points": np.zeros((), np.int32)})
  measured = {identity: rows for record in history for identity, rows in record["measured"].items()}
  measurements: dict[int, measurement.Measurement] = {}
  rows = [row for record in history for row in record["rows"]]
  for u in tqdm(range(phase.done, len(all_units)), desc="measure", unit="point", initial=phase.done,
                total=len(all_units), disable=not sharding.is_writer(), dynamic_ncols=True):
    overrides, r, point = all_units[u]
    new, unit_rows = {}, []
    for variant in variants:
      identity = training_identity(Job(variant, point))
      p, j = where[identity]
      if identity not in measured:
        k = point.num_models
        variables = jax.tree.map(lambda x: x[j * k:(j + 1) * k], trained[p])
        model = asymmetric.variant_model(variant, models.get_model(point.model, dataset.num_classes),
                                         point.sigma_asym.scale)
        if p not in measurements:  # a program's models share the model and (the grid's rule) the lmc keys
          measurements[p] = measurement.make_measurement(point, model, variables, dataset, execution.policy())
        measured[identity] = new[identity] = measure_variant(point, model, variant, variables, dataset,
                                                             measurements[p])
      label = reporting.variant_label(variant, point.mask.fixed_fraction, point.pruning_fraction,
                                      schedule=mask_schedule.Schedule.from_config(point.mask).describe(),
                                      fixed_per_unit=point.wasym.fixed_per_unit)
      unit_rows += [{"point": u // config.sweep.seeds, **overrides, "variant": variant, "label": label, "seed": r,
                     "init_seed": point.init_seed, **row} for row in measured[identity]]
    rows += unit_rows
    phase.record({"rows": unit_rows, "measured": new}, {"points": np.asarray(u + 1, np.int32)})
  return rows


def measure_variant(point, model, variant: str, variables: dict, dataset: data.Dataset,
                    measure_with: measurement.Measurement) -> list[dict]:
  """One row per curve of the variant's pair (BN modes, REPAIR), with its alignment's and its
  K models' columns."""
  aligned = measurement.align_pairs(point, model, variables, [variant], dataset, measure_with.policy)
  curves, aligned_curves, rows = measurement.measure_curves(point, variables, [variant], aligned, measure_with)
  k_models, k_curves = measurement.measure_k_models(point, variables, [variant], curves, measure_with)
  measurement.check_finite_curves(curves, aligned_curves, k_curves)
  out = []
  for row in rows:
    section = k_models.get(measurement.curve_name(variant, row["bn_mode"], measure_with.bn_modes), {})
    k_model_metrics = {key: section[key] for key in aggregate.K_MODEL_METRICS if key in section}
    out.append({key: value for key, value in {**row, **k_model_metrics}.items()
                if key not in ("variant", "repair", "bn_mode")})
  return out


def grid_keys(config) -> list[str]:
  """The keys the grid sets, axis by axis."""
  return [key for axis in axes(config) for key in axis.keys]


def summarize(config, rows: list[dict]) -> list[dict]:
  """The rows' mean, std and 95 % interval over seeds, per point, variant and curve."""
  return aggregate.summarize(rows, ["point", *grid_keys(config), "variant", "label", "curve"])


def write_outputs(run: runtime.Run, config, results: dict) -> None:
  """The CSVs of the rows and of the summary, and the figure against the first axis."""
  rows, summary = results["rows"], results["summary"]
  aggregate.write_csv(run.path("sweep_rows.csv"), rows, aggregate.columns_of(rows))
  aggregate.write_csv(run.path("sweep_summary.csv"), summary, aggregate.columns_of(summary))
  sweep_axes = axes(config)
  if sweep_axes:
    x_keys = sweep_axes[0].keys
    reporting.plot_sweep(run.path("sweep.png"), summary, x_keys, grid_keys(config)[len(x_keys):],
                         f"{config.model.name} on {config.dataset}, {config.num_epochs} epochs: mean ± std over "
                         f"{config.sweep.seeds} seeds")
