"""What a person looks at: results JSON written atomically, tables on stdout, PNG plots.

In a multi-process run every process computes the same results, and only process 0
(`sharding.is_writer`) writes files, so workers never race on one path. Files go through
`tna_jax.files` (epath), so a workdir may be a bucket.
"""

import io
from typing import Any, Sequence

import numpy as np

from tna_jax import files, sharding


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


def plot_curves(path: files.PathLike, alphas: np.ndarray, curves: dict[str, dict[str, np.ndarray]], title: str) -> None:
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


def save_figure(fig, axes, path: files.PathLike, title: str) -> None:
  """Grids, legends and a title on `axes`, then `write_png`."""
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  write_png(fig, path)


def write_png(fig, path: files.PathLike) -> None:
  """The figure laid out and written as PNG through a rename (a crash never leaves half an
  image at `path`), by process 0 only; the figure is closed either way."""
  fig.tight_layout()
  if sharding.is_writer():
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    files.write_bytes(path, buffer.getvalue())
  pyplot().close(fig)
