"""Scalars per step (epoch, round) to the workdir: metrics.jsonl for scripts and TensorBoard
event files for people (`tensorboard --logdir WORKDIR/tensorboard`), written through
tensorboardX so no TensorFlow is needed.

Every record names its phase (`train`, `fedavg`, `finetune_flip`, ...) and step; a
(phase, step) pair appears once. A resumed phase first `rewind`s to its checkpoint: the
records it wrote after that checkpoint are dropped (they will be written again, equal),
and TensorBoard is told to purge them too (`purge_step`), so a run killed and resumed any
number of times has the metrics of an uninterrupted one.

Files go through `tna_jax.runs.files` (epath), so the workdir may be a bucket: metrics.jsonl is
rewritten whole (objects in a bucket cannot be appended to; the file stays small), and
each phase's event file is written to a local directory by tensorboardX and copied into
`tensorboard/<phase>/` after every record. In a multi-process run only process 0 writes.
"""

import json
import os
import shutil
import tempfile
from typing import Mapping, Sequence

import numpy as np

from tna_jax.core import sharding
from tna_jax.runs import files, workdir


class MetricWriter:
  """Appends one JSON line per (phase, step) and mirrors every scalar to TensorBoard.

  Values may be scalars or per-model vectors; a vector value `test_accuracy=[a, b]` with
  `names=['vanilla_0', 'vanilla_1']` becomes TensorBoard tags `test_accuracy/vanilla_0` ...
  in the phase's TensorBoard run. An existing metrics.jsonl is kept (resume); phases that
  start again from scratch call `rewind(phase, 0)`.
  """

  def __init__(self, workdir: files.PathLike, *, tensorboard: bool = True):
    self.path = files.path(workdir) / "metrics.jsonl"
    self._tensorboard_dir = files.path(workdir) / "tensorboard"
    self._tensorboard = tensorboard and sharding.is_writer()
    self._boards: dict[str, tuple[object, str, int]] = {}  # phase -> (SummaryWriter, local dir, purge step)
    self._records = read_jsonl(self.path) if sharding.is_writer() and self.path.exists() else []

  def rewind(self, phase: str, step: int) -> None:
    """Forgets `phase`'s records after `step` (its last checkpoint): they are redone."""
    kept = [r for r in self._records if r.get("phase") != phase or r["step"] <= step]
    if len(kept) != len(self._records):
      self._records = kept
      self._flush()
    self._close_board(phase)
    self._boards[phase] = (None, "", step + 1)

  def write(self, phase: str, step: int, metrics: Mapping[str, object], names: Sequence[str] = ()) -> None:
    """Records `metrics` of `phase` at `step` in both places."""
    if not sharding.is_writer():
      return
    if any(r.get("phase") == phase and r["step"] == step for r in self._records):
      raise ValueError(f"metrics of phase {phase!r} step {step} were already written")
    self._records.append(files.jsonable({"phase": phase, "step": step, **({"models": list(names)} if names else {}),
                                         **metrics}))
    self._flush()
    if self._tensorboard:
      self._to_tensorboard(phase, step, metrics, list(names))

  def _flush(self) -> None:
    if sharding.is_writer():
      files.write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in self._records))

  def write_curves(self, phase: str, alphas: Sequence[float], curves: Mapping[str, Mapping[str, Sequence[float]]],
                   table: str = "", hparams: Mapping[str, object] | None = None,
                   results: Mapping[str, float] | None = None) -> None:
    """TensorBoard only (results.json holds the same): LMC curves, their table, hparams.

    Run `phase` gets each curve's loss and accuracy against alpha (tags `lmc_loss/<curve>`,
    `lmc_accuracy/<curve>`; the step is alpha in percent, TensorBoard's x-axis being an
    integer), `table` as a markdown text, and the HPARAMS tab pairs the run's `hparams`
    (config keys to scalars or strings) with `results` (e.g. each variant's barrier), so
    runs of a sweep can be compared there.
    """
    if not self._tensorboard:
      return
    board, local = self._board(phase)
    percents = [int(round(100 * float(a))) for a in alphas]
    for name, curve in curves.items():
      for key in ("loss", "accuracy"):
        for step, value in zip(percents, curve[key]):
          board.add_scalar(f"lmc_{key}/{name}", float(value), step)
    if table:
      board.add_text("summary", table)
    hparams = {k: v for k, v in workdir.flat(hparams or {}).items() if isinstance(v, (bool, int, float, str))}
    if hparams:
      # add_hparams would open a second writer on a new run (one event file per writer and
      # second); the same summaries go into this phase's own event file instead.
      for summary in _tensorboardx().summary.hparams(dict(hparams), dict(results or {})):
        board._get_file_writer().add_summary(summary)  # pylint: disable=protected-access
      for key, value in (results or {}).items():
        board.add_scalar(key, float(value), 0)
    self._close_board(phase)  # written once, and copied into the workdir before the run's results

  def _board(self, phase: str):
    """The tensorboardX writer of `phase` (created on first use) and its local directory."""
    board, local, purge = self._boards.get(phase, (None, "", 1))
    if board is None:
      local = tempfile.mkdtemp(prefix=f"tna_tb_{phase}_")
      board = _tensorboardx().SummaryWriter(local, purge_step=purge if purge > 1 else None)
      self._boards[phase] = (board, local, purge)
    return board, local

  def _to_tensorboard(self, phase: str, step: int, metrics: Mapping[str, object], names: list[str]) -> None:
    board, local = self._board(phase)
    for key, value in metrics.items():
      values = np.asarray(value, np.float64) if _numeric(value) else None
      if values is None:
        continue
      if values.ndim == 0:
        board.add_scalar(key, float(values), step)
      elif values.ndim == 1 and len(values) == len(names):
        for name, v in zip(names, values):
          board.add_scalar(f"{key}/{name}", float(v), step)
    board.flush()
    self._mirror(phase, local)

  def _mirror(self, phase: str, local: str) -> None:
    """Copies this session's event file of `phase` whole into the workdir."""
    for name in os.listdir(local):
      if os.path.isfile(os.path.join(local, name)):
        with open(os.path.join(local, name), "rb") as f:
          files.write_bytes(self._tensorboard_dir / phase / name, f.read())

  def _close_board(self, phase: str) -> None:
    board, local, _ = self._boards.pop(phase, (None, "", 1))
    if board is not None:
      board.close()
      self._mirror(phase, local)
      shutil.rmtree(local, ignore_errors=True)

  def close(self) -> None:
    for phase in list(self._boards):
      self._close_board(phase)


def _tensorboardx():
  """tensorboardX, imported on first use: it takes seconds to import, which runs with
  TensorBoard off (and `main --help`) should not pay."""
  import tensorboardX  # pylint: disable=g-import-not-at-top
  import tensorboardX.summary  # pylint: disable=g-import-not-at-top
  return tensorboardX


def _numeric(value: object) -> bool:
  try:
    return np.asarray(value).dtype.kind in "biuf"
  except (TypeError, ValueError):
    return False


def read_jsonl(path: files.PathLike) -> list[dict]:
  """The records of a metrics.jsonl file."""
  return [json.loads(line) for line in files.path(path).read_text().splitlines() if line.strip()]
