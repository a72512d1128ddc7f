"""Scalars per step (epoch, round) to the workdir: metrics.jsonl for scripts and TensorBoard
event files for people (`tensorboard --logdir WORKDIR/tensorboard`), written through
tensorboardX so no TensorFlow is needed."""

import json
import os
from typing import Mapping, Sequence

import numpy as np

from tna_jax import reporting, sharding


class MetricWriter:
  """Appends one JSON line per step and mirrors every scalar to TensorBoard.

  Values may be scalars or per-model vectors; a vector value `test_accuracy=[a, b]` with
  `names=['vanilla_0', 'vanilla_1']` becomes TensorBoard tags `test_accuracy/vanilla_0` ...
  Starting a writer truncates an earlier metrics.jsonl unless `resume` is set. In a
  multi-process run only process 0 writes (`sharding.is_writer`).
  """

  def __init__(self, workdir: str, names: Sequence[str] = (), *, resume: bool = False, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.names = list(names)
    self._tb = None
    if not sharding.is_writer():
      return
    os.makedirs(workdir, exist_ok=True)
    if not resume and os.path.exists(self.path):
      os.remove(self.path)
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, object], names: Sequence[str] | None = None) -> None:
    """Records `metrics` at `step` in both places; `names` replaces the writer's own for
    this record (runs that train several groups of models one group after another)."""
    names = self.names if names is None else list(names)
    record = {"step": step, **({"models": names} if names else {}), **metrics}
    reporting.append_jsonl(self.path, record)
    if self._tb is None:
      return
    for key, value in metrics.items():
      values = np.asarray(value, np.float64)
      if values.ndim == 0:
        self._tb.add_scalar(key, float(values), step)
      elif values.ndim == 1 and len(values) == len(names):
        for name, v in zip(names, values):
          self._tb.add_scalar(f"{key}/{name}", float(v), step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
