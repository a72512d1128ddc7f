"""Combines the results of several `lmc` or `sweep` workdirs, or of several `fed` workdirs,
into one table, CSV and figure.

    python -m tna_jax.report workdirs/width_64 workdirs/width_256 workdirs/width_1024 --out=reports/width
    python -m tna_jax.report workdirs/fed_seed0 workdirs/fed_seed1 --out=reports/fed

Each workdir's results.json becomes tidy rows (a sweep's rows as they are; an lmc run's
table rows, its init_seed as the seed; a fed run's row per algorithm, its init_seed as the
seed), and every config key whose value differs between the workdirs (seeds and the fed
algorithm list aside) becomes a column. Rows that differ only in their seed are aggregated
(mean, std and 95 % interval, `tna_jax.runs.aggregate`), so three runs with init_seed 0, 1
and 2 make one point with error bars. Writes report_rows.csv, report_summary.csv,
report.json and report.png / report.pdf to `--out`, and prints the table. The figure of
barrier runs is against `--x` (by default the first sweep axis or differing key); of fed
runs, each algorithm's test accuracy and loss per round, mean ± std over seeds.
"""

import sys
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging

from tna_jax.core import mask_schedule
from tna_jax.errors import TnaError
from tna_jax.experiments import fed
from tna_jax.runs import aggregate, files, reporting, workdir
from tna_jax.runs.saved_runs import RunNotFoundError

SEED_KEYS = ("init_seed", "data_seed", "mask.seed", "partition.seed", "sweep.seeds")  # replicates, not settings
# Bookkeeping, and the fed algorithm list (each row names its algorithm).
IGNORED = ("experiment", "sweep.", "checkpoint.", "overwrite", "eval_every", "eval_batch_size", "distributed",
           "algorithms")
# The experiments report combines, in families whose runs can share one table.
FAMILIES = {"lmc": "barrier", "sweep": "barrier", "fed": "fed"}

_OUT = flags.DEFINE_string("out", "report", "directory for the combined table, CSVs and figure")
_X = flags.DEFINE_string("x", "", "config key on the figure's x-axis; '' = the first sweep axis or differing key")


def load_results(workdir_path: str) -> dict[str, Any]:
  """The results.json of a finished lmc, sweep or fed run; RunNotFoundError naming the problem otherwise."""
  path = files.path(workdir_path) / workdir.RESULTS
  if not path.exists():
    raise RunNotFoundError(f"{workdir_path!r} has no {workdir.RESULTS}: it is not a finished run (an unfinished "
                           "run resumes with the command that started it).")
  results = files.read_json(path)
  experiment = results.get("config", {}).get("experiment")
  if experiment not in FAMILIES:
    raise RunNotFoundError(f"{workdir_path!r} is a run of the {experiment!r} experiment; report combines lmc and "
                           "sweep runs, or fed runs.")
  return results


def tidy_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  """A run's tidy rows: a sweep's `rows`; an lmc run's table rows with their K-model columns;
  a fed run's row per algorithm, with its final accuracy minus FedAvg's in the same run
  (same initialization, partition and data order: the paired difference, free of the
  variation between seeds) when the run has FedAvg; seed = init_seed."""
  config = results["config"]
  if config["experiment"] == "sweep":
    return [dict(row) for row in results["rows"]]
  if config["experiment"] == "fed":
    fedavg = next((row for row in results["summary"] if row["algorithm"] == "fedavg"), None)
    return [{"variant": row["algorithm"], "seed": config["init_seed"], "init_seed": config["init_seed"],
             "label": row["label"], **{m: row[m] for m in aggregate.FED_METRICS if m in row},
             **({"gain_vs_fedavg_pp": row["final_accuracy"] - fedavg["final_accuracy"]} if fedavg else {})}
            for row in results["summary"]]
  sections = {(s["variant"], s["bn_mode"]): s for s in results.get("k_models", {}).values()}
  rows = []
  for row in results["summary"]:
    section = sections.get((row["variant"], row["bn_mode"]), {}) if not row.get("repair") else {}
    label = reporting.variant_label(row["variant"], config["mask"]["fixed_fraction"], config["pruning_fraction"],
                                    schedule=mask_schedule.Schedule.from_config(config["mask"]).describe(),
                                    fixed_per_unit=config.get("wasym", {}).get("fixed_per_unit"))
    rows.append({"variant": row["variant"], "seed": config["init_seed"], "init_seed": config["init_seed"],
                 "label": label,
                 "curve": row["curve"], **{m: row[m] for m in aggregate.METRICS if m in row},
                 **{m: section[m] for m in aggregate.K_MODEL_METRICS if m in section}})
  return rows


def differing_keys(configs: Sequence[dict]) -> list[str]:
  """The flat config keys whose values differ between `configs` (seeds and bookkeeping aside)."""
  flats = [workdir.flat(c) for c in configs]
  keys = list(dict.fromkeys(k for flat in flats for k in flat))
  return [k for k in keys if k not in SEED_KEYS and not k.startswith(IGNORED)
          and len({repr(flat.get(k)) for flat in flats}) > 1]


def combine(workdirs: Sequence[str], x: str = "") -> dict[str, Any]:
  """The combined rows, summary, keys and x-axis of `workdirs` (see the module docstring)."""
  results = [load_results(w) for w in workdirs]
  configs = [r["config"] for r in results]
  experiments = sorted({c["experiment"] for c in configs})
  if len({FAMILIES[e] for e in experiments}) > 1:
    raise TnaError(f"the runs are of the experiments {', '.join(experiments)}: report combines lmc and sweep runs, "
                   "or fed runs, not both in one table.")
  keys = differing_keys(configs)
  grid_axes = [tuple(g["keys"]) for r in results if r["config"]["experiment"] == "sweep" for g in r["grid"]]
  keys += [k for k in dict.fromkeys(k for axis in grid_axes for k in axis) if k not in keys]
  rows = []
  for w, r in zip(workdirs, results):
    flat = workdir.flat(r["config"])
    rows += [{"workdir": str(w), **{k: flat.get(k) for k in keys}, **row} for row in tidy_rows(r)]
  x = x or (grid_axes[0][0] if grid_axes else keys[0] if keys else "")
  if x and x not in keys:
    raise TnaError(f"--x={x!r} is not a key that differs between the runs or a sweep axis; allowed: "
                   f"{', '.join(keys) or 'none (the runs differ only in seeds)'}.")
  x_keys = next((list(axis) for axis in grid_axes if x in axis), [x] if x else [])  # tied keys share the x-axis
  summary = aggregate.summarize(rows, [*keys, "variant", "label", "curve"])
  report = {"workdirs": list(map(str, workdirs)), "keys": keys, "x_keys": x_keys, "rows": rows, "summary": summary}
  if experiments == ["fed"]:
    report["rounds"] = round_curves(results, keys)
  return report


def round_curves(results: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, list[float]]]:
  """Fed runs' test accuracy (%) and loss per round, mean and std over the runs that differ only
  in their seed, per algorithm (named by its label and the differing `keys`): over the
  rounds every such run evaluated."""
  groups: dict[str, list[dict[str, list[float]]]] = {}
  for r in results:
    flat = workdir.flat(r["config"])
    for row in r["summary"]:
      name = row["label"] + reporting.settings_suffix(flat, keys)
      groups.setdefault(name, []).append(fed.round_curves(r["history"][row["algorithm"]]))
  curves = {}
  for name, members in groups.items():
    common = sorted(set.intersection(*(set(m["round"]) for m in members)))
    curve = {"round": common, "n": len(members)}
    for metric in ("test_accuracy", "test_loss"):
      by_round = [[dict(zip(m["round"], m[metric]))[t] for m in members] for t in common]
      spreads = [aggregate.spread(values) for values in by_round]
      curve[metric] = [s["mean"] for s in spreads]
      curve[f"{metric}_std"] = [s["std"] for s in spreads]
    curves[name] = curve
  return curves


def write_report(report: dict[str, Any], out: str) -> str:
  """Writes the report's CSVs, JSON and figure to `out`; returns the table."""
  out_dir = files.path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  aggregate.write_csv(out_dir / "report_rows.csv", report["rows"], aggregate.columns_of(report["rows"]))
  aggregate.write_csv(out_dir / "report_summary.csv", report["summary"], aggregate.columns_of(report["summary"]))
  reporting.write_json(out_dir / "report.json", report)
  x_keys = report["x_keys"]
  runs = len(report["workdirs"])
  title = f"{runs} run{'s' if runs > 1 else ''}: mean ± std over seeds"
  if "rounds" in report:
    curves = report["rounds"]
    if len({curve["n"] for curve in curves.values()}) > 1:  # say which lines have fewer seeds
      curves = {f"{name} ({curve['n']} seed{'s' if curve['n'] > 1 else ''})": curve for name, curve in curves.items()}
    reporting.plot_rounds(out_dir / "report.png", curves, title)
  elif x_keys:
    others = [k for k in report["keys"] if k not in x_keys]
    reporting.plot_sweep(out_dir / "report.png", report["summary"], x_keys, others, title)
  return aggregate.summary_table(report["summary"], report["keys"])


def main(argv: Sequence[str]) -> None:
  workdirs = argv[1:]
  if not flags.FLAGS["verbosity"].present:  # absl's INFO lines (backend probing) would bury the table
    logging.set_verbosity(logging.WARNING)
  if not workdirs:
    raise app.UsageError("name one or more workdirs of finished lmc, sweep or fed runs: "
                         "python -m tna_jax.report WORKDIR...")
  try:
    report = combine(workdirs, _X.value)
    table = write_report(report, _OUT.value)
  except TnaError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  print(table)
  print(f"\n{len(report['rows'])} rows from {len(workdirs)} runs; report in {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
