"""Combines the results of several `lmc` or `sweep` workdirs into one table, CSV and figure.

    python -m tna_jax.report workdirs/width_64 workdirs/width_256 workdirs/width_1024 --out=reports/width

Each workdir's results.json becomes tidy rows (a sweep's rows as they are; an lmc run's
table rows, its init_seed as the seed), and every config key whose value differs between
the workdirs (seeds aside) becomes a column. Rows that differ only in their seed are
aggregated (mean, std and 95 % interval, `tna_jax.runs.aggregate`), so three lmc runs with
init_seed 0, 1 and 2 make one point with error bars. Writes report_rows.csv,
report_summary.csv, report.json and report.png / report.pdf (against `--x`, by default the
first sweep axis or the first differing key) to `--out`, and prints the table.
"""

import sys
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging

from tna_jax.errors import TnaError
from tna_jax.runs import aggregate, files, reporting, workdir
from tna_jax.runs.saved_runs import RunNotFoundError

SEED_KEYS = ("init_seed", "data_seed", "mask.seed", "sweep.seeds")  # replicates, not settings
IGNORED = ("experiment", "sweep.", "checkpoint.", "overwrite", "eval_every", "eval_batch_size", "distributed")

_OUT = flags.DEFINE_string("out", "report", "directory for the combined table, CSVs and figure")
_X = flags.DEFINE_string("x", "", "config key on the figure's x-axis; '' = the first sweep axis or differing key")


def load_results(workdir_path: str) -> dict[str, Any]:
  """The results.json of a finished lmc or sweep run; RunNotFoundError naming the problem otherwise."""
  path = files.path(workdir_path) / workdir.RESULTS
  if not path.exists():
    raise RunNotFoundError(f"{workdir_path!r} has no {workdir.RESULTS}: it is not a finished run (an unfinished "
                           "run resumes with the command that started it).")
  results = files.read_json(path)
  experiment = results.get("config", {}).get("experiment")
  if experiment not in ("lmc", "sweep"):
    raise RunNotFoundError(f"{workdir_path!r} is a run of the {experiment!r} experiment; report combines lmc and "
                           "sweep runs.")
  return results


def tidy_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  """A run's tidy rows: a sweep's `rows`; an lmc run's table rows with their K-model columns,
  seed = init_seed."""
  config = results["config"]
  if config["experiment"] == "sweep":
    return [dict(row) for row in results["rows"]]
  sections = {(s["variant"], s["bn_mode"]): s for s in results.get("k_models", {}).values()}
  rows = []
  for row in results["summary"]:
    section = sections.get((row["variant"], row["bn_mode"]), {}) if not row.get("repair") else {}
    rows.append({"variant": row["variant"], "seed": config["init_seed"], "init_seed": config["init_seed"],
                 "label": reporting.variant_label(row["variant"], config["mask"]["fixed_fraction"],
                                                  config["pruning_fraction"]),
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
  return {"workdirs": list(map(str, workdirs)), "keys": keys, "x_keys": x_keys, "rows": rows, "summary": summary}


def write_report(report: dict[str, Any], out: str) -> str:
  """Writes the report's CSVs, JSON and figure to `out`; returns the table."""
  out_dir = files.path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  aggregate.write_csv(out_dir / "report_rows.csv", report["rows"], aggregate.columns_of(report["rows"]))
  aggregate.write_csv(out_dir / "report_summary.csv", report["summary"], aggregate.columns_of(report["summary"]))
  reporting.write_json(out_dir / "report.json", report)
  x_keys = report["x_keys"]
  if x_keys:
    others = [k for k in report["keys"] if k not in x_keys]
    reporting.plot_sweep(out_dir / "report.png", report["summary"], x_keys, others,
                         f"{len(report['workdirs'])} runs: mean ± std over seeds")
  aligned = any("aligned_loss_barrier" in row for row in report["summary"])
  return aggregate.summary_table(report["summary"], report["keys"], aligned=aligned)


def main(argv: Sequence[str]) -> None:
  workdirs = argv[1:]
  if not flags.FLAGS["verbosity"].present:  # absl's INFO lines (backend probing) would bury the table
    logging.set_verbosity(logging.WARNING)
  if not workdirs:
    raise app.UsageError("name one or more workdirs of finished lmc or sweep runs: python -m tna_jax.report WORKDIR...")
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
