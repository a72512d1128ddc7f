"""Tidy result rows, their mean and spread over seeds, and CSV files of them.

A sweep (and `python -m tna_jax.report`) records one row per measured curve: the values
that name it (grid keys, variant, curve, seed) and its metrics; `report` makes one row per
federated algorithm and seed the same way. `summarize` groups the rows
that differ only in their seed and reports, per metric, the mean, the sample standard
deviation and the half-width of a 95 % confidence interval (Student's t), which the
figures draw as error bands.
"""

import csv
import io
import math
from typing import Any, Sequence

import numpy as np
from scipy import stats

from tna_jax.core import sharding
from tna_jax.runs import files, reporting

# The measured columns of a tidy row, in the order a table or CSV shows them: the pair's
# curve, the curve after post-hoc alignment, and the K models (barrier matrix, weight average).
PAIR_METRICS = ("accuracy_a", "accuracy_b", "accuracy_mid", "loss_barrier", "accuracy_barrier_pp",
                "accuracy_barrier_rel")
ALIGNED_METRICS = ("aligned_accuracy_mid", "aligned_loss_barrier", "aligned_accuracy_barrier_pp",
                   "aligned_accuracy_barrier_rel", "match_iterations", "match_seconds")
K_MODEL_METRICS = ("loss_barrier_mean", "loss_barrier_max", "accuracy_barrier_pp_mean", "accuracy_barrier_pp_max",
                   "mean_endpoint_accuracy", "fused_accuracy", "fused_loss", "fusion_gain_pp")
# A federated algorithm's row of `experiments.fed.summarize` (accuracies in %), and
# gain_vs_fedavg_pp: final accuracy minus FedAvg's in the same run (`tna_jax.report`).
FED_METRICS = ("final_accuracy", "gain_vs_fedavg_pp", "best_accuracy", "last_accuracy", "local_accuracy",
               "worst_client_accuracy", "seconds_per_round")
METRICS = PAIR_METRICS + ALIGNED_METRICS + K_MODEL_METRICS + FED_METRICS

# The summary table: a column per measured mean ± std (after the keys that name a row).
SUMMARY_COLUMNS = (
    ("variant", "label", "s"),
    ("curve", "curve", "s"),
    ("seeds", "n", "d"),
    ("loss barrier", "loss_barrier_text", "s"),
    ("acc barrier pp", "accuracy_barrier_pp_text", "s"),
    ("acc %", "mean_endpoint_accuracy_text", "s"),
    ("fused acc %", "fused_accuracy_text", "s"),
)
ALIGNED_SUMMARY_COLUMNS = (
    ("aligned loss barrier", "aligned_loss_barrier_text", "s"),
    ("match iters", "match_iterations_text", "s"),
    ("match s", "match_seconds_text", "s"),
)
FED_SUMMARY_COLUMNS = (
    ("algorithm", "label", "s"),
    ("seeds", "n", "d"),
    ("final acc %", "final_accuracy_text", "s"),
    ("vs FedAvg pp", "gain_vs_fedavg_pp_text", "s"),
    ("best acc %", "best_accuracy_text", "s"),
    ("local acc %", "local_accuracy_text", "s"),
    ("worst client %", "worst_client_accuracy_text", "s"),
    ("s/round", "seconds_per_round_text", "s"),
)


def spread(values: Sequence[float]) -> dict[str, float]:
  """mean, std (sample, n - 1; 0 for one value) and ci95 (half-width, t with n - 1 degrees
  of freedom; 0 for one value) of `values`."""
  x = np.asarray(values, np.float64)
  n = len(x)
  std = float(np.std(x, ddof=1)) if n > 1 else 0.0
  ci95 = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else 0.0
  return {"mean": float(np.mean(x)), "std": std, "ci95": ci95}


def summarize(rows: Sequence[dict], by: Sequence[str], seed_key: str = "seed") -> list[dict[str, Any]]:
  """One row per distinct value of the `by` columns (first-seen order): those values, `n`
  (rows, i.e. seeds), the seeds, and for every metric of `METRICS` that all its rows have,
  `<metric>` (the mean), `<metric>_std` and `<metric>_ci95` (`spread`)."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(tuple(row.get(key) for key in by), []).append(row)
  summary = []
  for values, members in groups.items():
    out: dict[str, Any] = dict(zip(by, values))
    out["n"] = len(members)
    out["seeds"] = [m.get(seed_key) for m in members]
    for metric in METRICS:
      if all(isinstance(m.get(metric), (int, float)) for m in members):
        result = spread([m[metric] for m in members])
        out.update({metric: result["mean"], f"{metric}_std": result["std"], f"{metric}_ci95": result["ci95"]})
    summary.append(out)
  return summary


def columns_of(rows: Sequence[dict], first: Sequence[str] = ()) -> list[str]:
  """The columns of `rows`: `first`, then every other key in first-seen order."""
  columns = list(first)
  for row in rows:
    columns += [key for key in row if key not in columns]
  return columns


def write_csv(path: files.PathLike, rows: Sequence[dict], columns: Sequence[str]) -> None:
  """`rows` as CSV with a header of `columns` (a missing value is an empty cell, a list is
  joined by spaces), written atomically by process 0."""
  if not sharding.is_writer():
    return
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(columns)
  for row in rows:
    writer.writerow(["" if row.get(c) is None else " ".join(map(str, row[c])) if isinstance(row[c], list) else row[c]
                     for c in columns])
  files.write_text(path, buffer.getvalue())


def summary_table(summary: Sequence[dict], keys: Sequence[str]) -> str:
  """`summarize`'s rows as a text table: the `keys` that name a row, then each measured
  metric as 'mean ± std': a federated algorithm's accuracies (`FED_SUMMARY_COLUMNS`), or a
  curve's barriers and accuracies (`SUMMARY_COLUMNS`, and after alignment when measured)."""
  cells = [{**row, **{f"{m}_text": f"{row[m]:.4g} ± {row[m + '_std']:.2g}" for m in METRICS if m in row}}
           for row in summary]
  if any("final_accuracy" in row for row in summary):
    columns = FED_SUMMARY_COLUMNS
  else:
    aligned = any("aligned_loss_barrier" in row for row in summary)
    columns = SUMMARY_COLUMNS + (ALIGNED_SUMMARY_COLUMNS if aligned else ())
  return reporting.format_table(cells, tuple((key, key, "") for key in keys) + columns)
