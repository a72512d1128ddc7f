"""The life of one experiment in its workdir: every experiment runs inside a `Run`.

    with runtime.Run(config, workdir) as run:   # decides fresh / resume / overwrite; writes nothing
      ...build (load data, make the model; bad input fails here, nothing written)...
      run.start()                                # lock, config.json
      phase = run.phase("train", total=config.num_epochs, unit="epoch")
      state, history = phase.restore(fresh_state)
      ...loop, calling phase.record(record, state) after every epoch / round...
      run.save("model", variables); run.finish(results, table)

A `Run` owns the workdir's lifecycle (`tna_jax.runs.workdir`: resume the same command, refuse a
finished or different run, overwrite by building beside the old run and swapping), the
lock, the metrics (`MetricWriter`: metrics.jsonl and TensorBoard, rewound on resume so no
step repeats), the checkpoints of each resumable phase (`checkpoints.StepCheckpoints`:
every N steps or minutes, keep-N, atomic, asynchronous on accelerators), timed phases, and
the final outputs (written by process 0; results.json last, as strict JSON).

A phase resumes exactly: its loop must derive every random choice from seeds and the step
number, so a run killed at any moment and started again ends bit-identical (on the same
machine type and library versions) to one never interrupted. A non-finite training loss
ends the run with `DivergedError` before the diverged step is checkpointed or recorded.

`TNA_KILL_AFTER=PHASE:STEP` makes the process kill itself (SIGKILL) right after recording
that step: the tests use it to preempt runs at exact points.
"""

import contextlib
import os
import signal
import time
from typing import Any, Callable, Iterator, Sequence

from etils import epath
import jax
import numpy as np

from tna_jax.core import sharding
from tna_jax.errors import DivergedError  # re-exported: runs raise it from Phase.record
from tna_jax.runs import checkpoints, files, metric_writer, reporting, workdir

PyTree = Any


class Run:
  """One experiment's run in `workdir_path`; see the module docstring.

  `resumable` names config keys (dotted) that may differ when an unfinished run resumes,
  because they do not change what it computes (e.g. the number of evaluations reported).
  """

  def __init__(self, config, workdir_path: str, *, resumable: Sequence[str] = ()):
    self.config = config
    self._config_dict = files.jsonable(config.to_dict())
    self.plan = workdir.plan(workdir_path, self._config_dict, overwrite=config.overwrite, resumable=tuple(resumable))
    self.dir: epath.Path = self.plan.directory
    self.seconds: dict[str, float] = {}
    self.asynchronous = jax.default_backend() != "cpu"  # orbax saves in the background on accelerators
    self.writer: metric_writer.MetricWriter | None = None
    self._lock: workdir.Lock | None = None
    self._phases: list[Phase] = []
    sharding.barrier("tna_run_planned")  # every process has read the workdir before process 0 writes

  def __enter__(self) -> "Run":
    return self

  def __exit__(self, *exc) -> None:
    for phase in self._phases:
      phase.close()
    if self.writer is not None:
      self.writer.close()
    if self._lock is not None:
      self._lock.release()

  def start(self) -> None:
    """Takes the workdir: creates it, locks it and records the config. Call it once the
    inputs are known to be good, so a mistake never leaves a file behind."""
    if sharding.is_writer():
      self._lock = workdir.start(self.plan, self._config_dict)
      if self.plan.resume:
        print(f"Resuming the unfinished run in {self.dir}")
    sharding.barrier("tna_run_started")
    self.writer = metric_writer.MetricWriter(self.dir)

  def phase(self, name: str, *, total: int, unit: str, names: Sequence[str] = (), every: int | None = None) -> "Phase":
    """A resumable loop of `total` steps (epochs or rounds) with its own checkpoints, every
    `every` steps (default: the config's `checkpoint.every`)."""
    if self.writer is None:
      raise RuntimeError("Run.start() must come before Run.phase()")
    phase = Phase(self, name, total=total, unit=unit, names=names, every=every)
    self._phases.append(phase)
    return phase

  @contextlib.contextmanager
  def timed(self, name: str) -> Iterator[None]:
    """Adds the wall time of the block to `self.seconds[name]`."""
    start = time.perf_counter()
    yield
    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

  def path(self, *parts: str) -> epath.Path:
    """A path inside the run's directory."""
    return self.dir.joinpath(*parts)

  def save(self, name: str, tree: PyTree) -> None:
    """An output checkpoint `checkpoints/<name>` (replaced if a resumed run writes it again)."""
    checkpoints.save(self.path("checkpoints", name), tree)

  def finish(self, results: dict, summary: str) -> epath.Path:
    """Writes results.json (last: it marks the run complete), moves an overwrite into place,
    prints `summary`. Returns where the run now is."""
    for phase in self._phases:
      phase.checkpoints.wait()
    reporting.write_json(self.path(workdir.RESULTS), results)
    sharding.barrier("tna_run_results")
    location, backup = self.plan.workdir, None
    if sharding.is_writer():
      if self._lock is not None:
        self._lock.release()
        self._lock = None
      backup = workdir.complete(self.plan)
    print(summary)
    print(f"\nResults in {location}" + (f" (the run it replaced is kept in {backup})" if backup else ""))
    return location


class Phase:
  """A checkpointed loop: restore, then `record` each step; see `Run.phase`."""

  def __init__(self, run: Run, name: str, *, total: int, unit: str, names: Sequence[str] = (),
               every: int | None = None):
    cfg = run.config.checkpoint
    self.run, self.name, self.total, self.unit, self.names = run, name, total, unit, list(names)
    self.checkpoints = checkpoints.StepCheckpoints(
        run.path("checkpoints", name), keep=cfg.keep, every=every or cfg.every, every_minutes=cfg.every_minutes,
        last=total, asynchronous=run.asynchronous)
    self.history: list[dict] = []
    self._kill_after = os.environ.get("TNA_KILL_AFTER", "")

  def restore(self, fresh: PyTree, like: PyTree | Callable[[Any], PyTree] | None = None) -> tuple[PyTree, list[dict]]:
    """(state, history) from the phase's latest checkpoint, else (`fresh`, []). `like` is
    the checkpoint's structure when it differs from `fresh`'s (a function of the stored
    meta when its shapes depend on the step)."""
    step = self.checkpoints.latest_step()
    self.run.writer.rewind(self.name, step or 0)
    if step is None:
      self.history = []
      return fresh, []
    state, meta = self.checkpoints.restore(step, fresh if like is None else like)
    self.history = list(meta["history"])
    if step < self.total:
      print(f"{self.name}: resuming after {self.unit} {step} of {self.total}")
    return state, list(self.history)

  @property
  def done(self) -> int:
    """Steps completed so far."""
    return len(self.history)

  def record(self, record: dict, state: PyTree, names: Sequence[str] | None = None) -> None:
    """Step `done + 1` finished with metrics `record` and state `state`: checks the loss,
    writes the metrics, and checkpoints when due."""
    step = self.done + 1
    losses = np.asarray(record.get("train_loss", 0.0), np.float64)
    if not np.all(np.isfinite(losses)):
      which = (f" (models {', '.join(n for n, l in zip(self.names, losses.ravel()) if not np.isfinite(l))})"
               if losses.ndim and len(self.names) == losses.size else "")
      kept = self.checkpoints.latest_step()
      where = (f"the last good checkpoint ({self.unit} {kept}) is kept in {self.checkpoints.directory}" if kept
               else "no checkpoint was written")
      raise DivergedError(f"training diverged: the training loss of {self.name} is not finite at {self.unit} "
                          f"{step}{which}; {where}. Lower the learning rate or check the data; no results were "
                          "written.")
    self.history.append(files.jsonable(record))
    self.run.writer.write(self.name, step, record, self.names if names is None else names)
    if self.checkpoints.due(step):
      self.checkpoints.save(step, state, {"history": self.history})
    if self._kill_after == f"{self.name}:{step}":
      self.checkpoints.wait()
      os.kill(os.getpid(), signal.SIGKILL)

  def close(self) -> None:
    self.checkpoints.wait()
    self.checkpoints.close()
