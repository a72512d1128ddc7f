"""What a person looks at: results JSON written atomically, tables on stdout, plots (PNG and PDF).

In a multi-process run every process computes the same results, and only process 0
(`sharding.is_writer`) writes files, so workers never race on one path. Files go through
`tna_jax.runs.files` (epath), so a workdir may be a bucket.
"""

import io
from typing import Any, Sequence

import numpy as np

from tna_jax.alignment import interpolation
from tna_jax.core import sharding
from tna_jax.runs import files

DPI = 200  # figures are read on screens and printed


def write_json(path: files.PathLike, obj: Any) -> None:
  """Strict JSON through a temporary file and a rename (`files.write_json`), process 0 only:
  readers never see half a file, and an earlier file at `path` survives a crash."""
  if sharding.is_writer():
    files.write_json(path, obj)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
  """A fixed-width text table; columns are (header, key, format spec)."""
  cells = [[header for header, _, _ in columns]]
  cells += [[_cell(row.get(key), spec) for _, key, spec in columns] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _cell(value, spec: str) -> str:
  """One table cell: '-' for a missing value, 'nan' for a non-finite number (never a 0)."""
  if value is None:
    return "-"
  if isinstance(value, (float, np.floating)) and not np.isfinite(value):
    return str(float(value))
  return format(value, spec)


def plot_curves(path: files.PathLike, alphas: np.ndarray, curves: dict[str, dict[str, np.ndarray]], title: str,
                labels: dict[str, str] | None = None) -> None:
  """Loss and accuracy against alpha, one line per curve, each curve's barrier marked.

  Each barrier (`interpolation.barriers`: the largest gap between the curve and the straight line
  through its endpoints) is drawn as a dotted vertical segment from that line to the curve
  at its alpha, with its size in the legend. `labels` maps curve names to what a reader
  understands ('TNA-PFN (40 % fixed)'); unmapped names are shown as they are.
  """
  if not sharding.is_writer():
    return
  labels = labels or {}
  fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(10, 4))
  for name, curve in curves.items():
    label = labels.get(name, name)
    loss, accuracy = np.asarray(curve["loss"]), 100 * np.asarray(curve["accuracy"])
    found = interpolation.barriers(alphas, loss, accuracy / 100)
    for ax, values, barrier, alpha, unit in (
        (ax_loss, loss, found["loss_barrier"], found["loss_barrier_alpha"], ""),
        (ax_acc, accuracy, found["accuracy_barrier_pp"], found["accuracy_barrier_alpha"], " pp")):
      line, = ax.plot(alphas, values, marker=".", label=f"{label} (barrier {barrier:.3g}{unit})")
      if np.isfinite(alpha):
        on_line = (1 - alpha) * values[0] + alpha * values[-1]
        on_curve = np.interp(alpha, alphas, values)
        ax.vlines(alpha, min(on_line, on_curve), max(on_line, on_curve), colors=line.get_color(), linestyles=":")
  ax_loss.set(xlabel="interpolation weight alpha", ylabel="test loss", title="loss along the segment")
  ax_acc.set(xlabel="interpolation weight alpha", ylabel="test accuracy (%)", title="accuracy along the segment")
  save_figure(fig, (ax_loss, ax_acc), path, title)


VARIANT_NAMES = {"tna": "TNA-PFN", "pruning": "pruning at init", "wasym": "W-Asymmetric",
                 "sigma_asym": "σ-Asymmetric (FiGLU)"}  # as papers name the variants


def variant_label(variant: str, fixed_fraction: float, pruning_fraction: float, *, schedule: str = "",
                  fixed_per_unit: int | None = None) -> str:
  """How a paper names a training variant: 'vanilla', 'TNA-PFN (40 % fixed)', 'pruning at init (40 %)',
  'W-Asymmetric (64 fixed per unit)', 'σ-Asymmetric (FiGLU)'; `schedule` (`mask_schedule.Schedule.describe`)
  follows TNA-PFN's ratio: 'TNA-PFN (60 % fixed, linear to 0 % by 100 % of training)'."""
  return {"tna": f"{VARIANT_NAMES['tna']} ({100 * fixed_fraction:.0f} % fixed{schedule})",
          "pruning": f"{VARIANT_NAMES['pruning']} ({100 * pruning_fraction:.0f} %)",
          "wasym": f"{VARIANT_NAMES['wasym']} ({fixed_per_unit} fixed per unit)",
          "sigma_asym": VARIANT_NAMES["sigma_asym"]}.get(variant, variant)


# the ratio each variant's label names (0 of it is vanilla)
RATIO_KEYS = {"tna": "mask.fixed_fraction", "pruning": "pruning_fraction", "wasym": "wasym.fixed_per_unit"}
SCHEDULE_KEYS = ("mask.schedule", "mask.final_fraction", "mask.schedule_end")  # TNA-PFN's label spells them out too
AXIS_LABELS = {
    "mask.fixed_fraction": "mask ratio (fraction of entries fixed)",
    "mask.fixed_fraction+pruning_fraction": "mask ratio (fraction of entries fixed, or pruned)",
    "pruning_fraction": "fraction of entries pruned at init",
    "model.width": "width (units per hidden layer)",
    "model.width_multiplier": "width multiplier",
    "model.depth": "depth (hidden layers)",
    "mask.include": "masked layers",
    "wasym.fixed_per_unit": "W-Asymmetric: entries fixed per unit",
    "mask.granularity": "mask granularity",
    "mask.schedule": "mask ratio schedule (fixed fraction over training)",
    "mask.schedule_end": "fraction of training at which the schedule ends",
    "optimizer.learning_rate": "learning rate",
    "num_epochs": "training epochs",
    "num_models": "models fused (K)",
}
SWEEP_PANELS = (("loss_barrier", "loss barrier"), ("accuracy_barrier_pp", "accuracy barrier (pp)"),
                ("mean_endpoint_accuracy", "test accuracy of the models (%)"))
# Against the number of models K: the barriers over all pairs, and the K-way weight average's accuracy.
K_MODEL_PANELS = (("loss_barrier_mean", "loss barrier, mean over pairs"),
                  ("accuracy_barrier_pp_max", "accuracy barrier (pp), worst pair"),
                  ("fused_accuracy", "accuracy of the K-way average (%)"))


def series_label(row: dict, x_keys: Sequence[str], other_keys: Sequence[str], show_curve: bool) -> str:
  """A line of a sweep figure as a reader names it: 'TNA-PFN (40 % fixed)', or 'TNA-PFN' when
  the x-axis is its ratio (or its schedule), then the curve's BN mode (when curves differ) and the values of
  the grid's other axes ('width 64')."""
  variant = row["variant"]
  spelled_on_x = RATIO_KEYS.get(variant) in x_keys or (variant == "tna" and bool(set(SCHEDULE_KEYS) & set(x_keys)))
  label = VARIANT_NAMES.get(variant, variant) if spelled_on_x else row["label"]
  if show_curve:
    label += f" ({row['curve']})"
  return label + settings_suffix(row, other_keys)


def settings_suffix(values: dict, keys: Sequence[str]) -> str:
  """The settings `keys` (dotted config keys) of `values` as a label's tail: ', width 64, depth 2'."""
  return "".join(f", {key.rsplit('.', 1)[-1]} {values.get(key)}" for key in keys)


def plot_band(ax, xs: Sequence[float], mean: Sequence[float], std: Sequence[float] | None, **line_kwargs) -> None:
  """A line of means on `ax` with a band of one standard deviation either side (none when
  `std` is None)."""
  mean = np.asarray(mean)
  line, = ax.plot(xs, mean, **line_kwargs)
  if std is not None:
    std = np.asarray(std)
    ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)


def plot_sweep(path: files.PathLike, summary: Sequence[dict], x_keys: Sequence[str], other_keys: Sequence[str],
               title: str) -> None:
  """Each panel a metric's mean against the axis `x_keys` (their shared value), one line per
  series (`series_label`), its band one standard deviation over seeds either side. An axis
  of names (granularity, layer presets) is drawn as categories in grid order, each point
  with an error bar of one standard deviation. The panels
  are `SWEEP_PANELS`, or `K_MODEL_PANELS` against the number of models."""
  if not sharding.is_writer():
    return
  x = x_keys[0]
  panels = K_MODEL_PANELS if x == "num_models" else SWEEP_PANELS
  ticks = list(dict.fromkeys(row[x] for row in summary))
  categorical = any(isinstance(t, str) for t in ticks)
  show_curve = len({row["curve"] for row in summary}) > 1
  series: dict[str, list[dict]] = {}
  for row in summary:
    series.setdefault(series_label(row, x_keys, other_keys, show_curve), []).append(row)
  series = merge_identical_series(series, x, [metric for metric, _ in panels], x_keys, other_keys, show_curve)
  fig, axes = pyplot().subplots(1, len(panels), figsize=(5 * len(panels), 4))
  for ax, (metric, ylabel) in zip(axes, panels):
    for label, rows in series.items():
      rows = sorted((r for r in rows if metric in r), key=lambda r: ticks.index(r[x]) if categorical else r[x])
      if not rows:
        continue
      xs = [ticks.index(r[x]) if categorical else r[x] for r in rows]
      mean = np.array([r[metric] for r in rows])
      std = np.array([r[f"{metric}_std"] for r in rows])
      if categorical:  # names in no order: points with error bars, unjoined
        ax.errorbar(xs, mean, yerr=std, marker="o", linestyle="none", capsize=3, label=label)
      else:
        plot_band(ax, xs, mean, std, marker="o", label=label)
    if categorical:
      ax.set_xticks(range(len(ticks)), ticks)
    elif min(ticks) > 0 and max(ticks) / min(ticks) >= 16:  # widths, learning rates: a log axis, ticks at the values
      ax.set_xscale("log", base=2)
      ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
      ax.minorticks_off()
    ax.set(xlabel=AXIS_LABELS.get("+".join(x_keys), AXIS_LABELS.get(x, x)), ylabel=ylabel)
  save_figure(fig, axes, path, title)


def merge_identical_series(series: dict[str, list[dict]], x: str, metrics: Sequence[str], x_keys: Sequence[str],
                           other_keys: Sequence[str], show_curve: bool) -> dict[str, list[dict]]:
  """`series` with the lines of the same models drawn once (vanilla at every TNA-PFN mask setting
  of the grid: the sweep trains them once), named without the settings that did not change them."""
  groups: dict[tuple, list[str]] = {}
  for label, rows in series.items():
    values = tuple(sorted((str(r[x]), r["curve"], *(r.get(m) for m in metrics)) for r in rows))
    groups.setdefault((rows[0]["variant"], values), []).append(label)
  merged = {}
  for labels in groups.values():
    rows = series[labels[0]]
    if len(labels) > 1:
      same = [k for k in other_keys if len({r.get(k) for label in labels for r in series[label]}) == 1]
      merged[series_label(rows[0], x_keys, same, show_curve)] = rows
    else:
      merged[labels[0]] = rows
  return merged


def plot_rounds(path: files.PathLike, series: dict[str, dict[str, Sequence[float]]], title: str) -> None:
  """A federated run's global model against the round: test accuracy (%) and test loss, one
  line per series (label -> its `round`, `test_accuracy` and `test_loss` lists), with a band
  of one standard deviation either side where the series has `test_accuracy_std` and
  `test_loss_std` (runs over several seeds)."""
  if not sharding.is_writer():
    return
  fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
  for label, curve in series.items():
    for ax, metric in zip(axes, ("test_accuracy", "test_loss")):
      plot_band(ax, curve["round"], curve[metric], curve.get(f"{metric}_std"), label=label)
  axes[0].set(xlabel="round", ylabel="test accuracy (%)", title="global model accuracy")
  axes[1].set(xlabel="round", ylabel="test loss", title="global model loss")
  save_figure(fig, axes, path, title)


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed). Imported on first use: the
  backend must be chosen before pyplot loads, and runs that plot nothing skip the import."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, axes, path: files.PathLike, title: str) -> None:
  """Grids, legends and a title on `axes`, then `write_png`."""
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  write_png(fig, path)


def write_png(fig, path: files.PathLike) -> None:
  """The figure laid out and written as PNG (200 dpi) and, beside it, as PDF (same name,
  .pdf) for a paper; each through a rename (a crash never leaves half an image at `path`),
  by process 0 only. The figure is closed either way."""
  fig.tight_layout()
  if sharding.is_writer():
    for fmt, target in (("png", files.path(path)), ("pdf", files.path(path).with_suffix(".pdf"))):
      buffer = io.BytesIO()
      fig.savefig(buffer, format=fmt, dpi=DPI)
      files.write_bytes(target, buffer.getvalue())
  pyplot().close(fig)
