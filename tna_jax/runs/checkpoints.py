"""Checkpoints as plain orbax pytrees, verified on restore.

Two kinds, both readable with orbax alone:
- `save` / `restore`: one named checkpoint (`ocp.StandardCheckpointer().restore(path)`),
  the outputs of a run (initialization, mask, trained models, soups, fused bases);
- `StepCheckpoints`: the numbered checkpoints of one resumable phase (an epoch or round
  loop), an orbax `CheckpointManager` that saves every N steps or minutes, keeps the
  last few, saves asynchronously on accelerators and never leaves a half-written step
  (orbax writes into a temporary directory and commits it).

Every checkpoint carries, in orbax's own step metadata, a crc32 of every array and of the
JSON it stores beside them (a phase's history). `restore` recomputes them, so a flipped
byte is an error that names the checkpoint and the array instead of a silently different
model. Checkpoints written by other tools carry no checksums and load unverified.

Arrays are saved as numpy (fetched to the host first), so a checkpoint restores onto any
number of devices. Multi-process runs: every process calls `save` and `restore` with the
same path on storage they share (a gs:// bucket or NFS); orbax writes each array once.
"""

import datetime
import json
import zlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from tna_jax.core import sharding
from tna_jax.errors import TnaError
from tna_jax.runs import files

PyTree = Any
_CHECKSUMS = "tna_checksums"  # key of our entry in orbax's custom step metadata
_OUTPUT_ADVICE = "Use an intact copy, or run the experiment that wrote it again."
_STEP_ADVICE = ("Delete that directory (the run then resumes from the checkpoint before it) or start the run again "
                "with a new --workdir.")


class CheckpointError(TnaError):
  """A checkpoint is missing, unreadable or does not match its checksums."""


def checksums(tree: PyTree, meta: Any = None) -> dict[str, str]:
  """crc32 (hex) of every leaf's dtype, shape and bytes, by tree path; '#meta' for `meta`."""
  sums = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    array = np.ascontiguousarray(leaf)
    header = f"{array.dtype.str}{array.shape}".encode()
    sums[jax.tree_util.keystr(path)] = f"{zlib.crc32(array.tobytes(), zlib.crc32(header)):08x}"
  if meta is not None:
    sums["#meta"] = f"{zlib.crc32(json.dumps(meta, sort_keys=True).encode()):08x}"
  return sums


def _verify(where: str, tree: PyTree, meta: Any, stored: dict[str, str] | None, advice: str) -> None:
  if stored is None:
    return  # written by another tool: nothing to check against
  actual = checksums(tree, meta)
  bad = sorted(k for k in set(stored) | set(actual) if stored.get(k) != actual.get(k))
  if bad:
    raise CheckpointError(
        f"checkpoint {where} is corrupt: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} does not match the "
        f"checksum stored when it was saved. {advice}")


def _abstract(like: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)


def _unreadable(where: str, error: Exception, advice: str) -> CheckpointError:
  return CheckpointError(f"checkpoint {where} cannot be read ({type(error).__name__}: {str(error)[:300]}). {advice}")


def save(path: files.PathLike, tree: PyTree) -> None:
  """Writes `tree` to `path` with its checksums, replacing a checkpoint already there (a
  run that is resumed writes its outputs again). orbax writes into a temporary directory
  and renames it, so a crash never leaves a half-written checkpoint under `path`."""
  host = sharding.fetch(tree)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(files.path(path), host, force=True, custom_metadata={_CHECKSUMS: checksums(host)})


def restore(path: files.PathLike, like: PyTree | None = None) -> PyTree:
  """Reads and verifies a checkpoint; with `like`, into that structure (and dtypes), else
  as numpy.

  Raises:
    CheckpointError: the directory is not a checkpoint, cannot be read or is corrupt.
  """
  directory = files.path(path)
  where = str(directory)
  if not directory.is_dir():
    raise CheckpointError(f"{where} is not an orbax checkpoint directory.")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      stored = (checkpointer.metadata(directory).custom_metadata or {}).get(_CHECKSUMS)
      tree = checkpointer.restore(directory, *(() if like is None else (_abstract(like),)))
  except (ValueError, OSError, RuntimeError, KeyError, TypeError) as e:
    raise _unreadable(where, e, _OUTPUT_ADVICE) from None
  tree = jax.tree.map(np.asarray, tree)
  _verify(where, tree, None, stored, _OUTPUT_ADVICE)
  return tree


class StepCheckpoints:
  """The numbered checkpoints of one phase under `directory` (`<directory>/<step>`).

  A checkpoint is a pytree of arrays (`state`) plus JSON (`meta`, e.g. the history so far),
  both covered by the checksums. `due(step)` says whether a step should be saved: every
  `every` steps, every `every_minutes` minutes (0: off) and always the phase's `last`.
  """

  def __init__(self, directory: files.PathLike, *, keep: int = 2, every: int = 1, every_minutes: float = 0.0,
               last: int | None = None, asynchronous: bool = False):
    self.directory = files.path(directory)
    self.every, self.every_minutes, self.last = every, every_minutes, last
    self._last_save = datetime.datetime.now()
    # One unnamed item with its handler given: orbax then reads a step's metadata without
    # warning that it cannot restore the item "default".
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=True),  # a save cut short by a kill leaves a temporary directory
        item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def due(self, step: int) -> bool:
    minutes = (datetime.datetime.now() - self._last_save).total_seconds() / 60
    return (step % self.every == 0 or step == self.last or
            (self.every_minutes > 0 and minutes >= self.every_minutes))

  def save(self, step: int, state: PyTree, meta: Any) -> None:
    """Saves `state` and the JSON-able `meta` as step `step` (asynchronously where enabled)."""
    host = sharding.fetch(state)
    meta = files.jsonable(meta)
    self._manager.save(step, args=ocp.args.StandardSave(host), force=True,
                       custom_metadata={_CHECKSUMS: checksums(host, meta), "meta": meta})
    self._last_save = datetime.datetime.now()

  def restore(self, step: int, like: PyTree | Callable[[Any], PyTree]) -> tuple[PyTree, Any]:
    """(state, meta) of step `step`, verified; `like` is the state's structure, or a function
    of `meta` that builds it (for states whose shape depends on how far the phase got)."""
    where = str(self.directory / str(step))
    try:
      custom = self._manager.metadata(step).custom_metadata or {}
      meta = custom.get("meta")
      target = like(meta) if callable(like) else like
      state = self._manager.restore(step, args=ocp.args.StandardRestore(_abstract(target)))
    except (ValueError, OSError, RuntimeError, KeyError, TypeError, AttributeError) as e:
      raise _unreadable(where, e, _STEP_ADVICE) from None
    state = jax.tree.map(np.asarray, state)
    _verify(where, state, meta, custom.get(_CHECKSUMS), _STEP_ADVICE)
    return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(state)), meta

  def wait(self) -> None:
    """Blocks until an asynchronous save has committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
