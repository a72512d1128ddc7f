"""What a person looks at: results JSON written atomically, tables on stdout, PNG plots.

In a multi-process run every process computes the same results, and only process 0
(`sharding.is_writer`) writes files, so workers never race on one path.
"""

import json
import os
import tempfile
from typing import Any, Sequence

import numpy as np

from tna_jax import sharding


def write_json(path: str, obj: Any) -> None:
  """Writes JSON through a temporary file and a rename: readers never see half a file, and
  an earlier file at `path` survives a crash."""
  if not sharding.is_writer():
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
    json.dump(_jsonable(obj), f, indent=2)
    tmp = f.name
  os.replace(tmp, path)


def append_jsonl(path: str, record: dict) -> None:
  """Appends one JSON line (per-epoch metrics)."""
  if not sharding.is_writer():
    return
  with open(path, "a") as f:
    f.write(json.dumps(_jsonable(record)) + "\n")


def _jsonable(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if hasattr(obj, "tolist"):  # numpy and jax arrays and scalars
    return _jsonable(np.asarray(obj).tolist())
  return obj


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
  """A fixed-width text table; columns are (header, key, format spec)."""
  cells = [[header for header, _, _ in columns]]
  cells += [[format(row[key], spec) if row.get(key) is not None else "-" for _, key, spec in columns] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def plot_curves(path: str, alphas: np.ndarray, curves: dict[str, dict[str, np.ndarray]], title: str) -> None:
  """Loss and accuracy against alpha, one line per curve name; saved as PNG."""
  if not sharding.is_writer():
    return
  fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(10, 4))
  for name, curve in curves.items():
    ax_loss.plot(alphas, curve["loss"], marker=".", label=name)
    ax_acc.plot(alphas, 100 * np.asarray(curve["accuracy"]), marker=".", label=name)
  ax_loss.set(xlabel="alpha", ylabel="test loss", title="loss along the segment")
  ax_acc.set(xlabel="alpha", ylabel="test accuracy (%)", title="accuracy along the segment")
  save_figure(fig, (ax_loss, ax_acc), path, title)


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, axes, path: str, title: str) -> None:
  """Grids, legends and a title on `axes`, then the PNG written through a rename (a crash
  never leaves half an image at `path`)."""
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  pyplot().close(fig)
  os.replace(tmp, path)
