"""What a workdir holds and what a new run may do with it: start, resume or overwrite.

A workdir is in one of these states, read without writing anything:

  empty        absent or an empty directory: a fresh run starts there;
  unfinished   config.json but no results.json: the same command resumes it; a config that
               differs in a key that changes the computation is refused, naming the keys;
  finished     results.json: refused, unless overwrite=True;
  foreign      files but no config.json (not a run of this library, or a run of a version
               that wrote none): refused, unless overwrite=True.

An overwrite never touches the old run while the new one is made: the new run is built in
the sibling `WORKDIR.next` (resumable like any run, if killed), and only once it is
complete is the old run moved to `WORKDIR.previous-<time>` (kept) and the new one renamed
into place. Whenever the run is killed, at least one whole run exists; a later command
finishes an interrupted swap first.

A lock (`.lock` in the directory being written) refuses a second run into the same
workdir while the first is alive; one left by a dead process (same host and no such pid,
or no heartbeat for `STALE_SECONDS` from another host) is taken over.
"""

import dataclasses
import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from etils import epath

from tna_jax.errors import ConfigError
from tna_jax.runs import files

CONFIG, RESULTS, LOCK = "config.json", "results.json", ".lock"
STALE_SECONDS = 600
HEARTBEAT_SECONDS = 60
# Keys that never change what a run computes, so a run may resume under new values.
ALWAYS_RESUMABLE = ("overwrite", "checkpoint.every", "checkpoint.every_minutes", "checkpoint.keep")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where a run writes (`directory`) and whether it continues what is there already."""

  workdir: epath.Path
  directory: epath.Path  # the workdir itself, or WORKDIR.next for an overwrite
  resume: bool

  @property
  def staged(self) -> bool:
    return self.directory != self.workdir


def staging_dir(workdir: epath.Path) -> epath.Path:
  return workdir.parent / f"{workdir.name}.next"


def flat(config, prefix: str = "") -> dict[str, Any]:
  """{'mask.fixed_fraction': 0.4, ...} of a nested config (a ConfigDict or a plain dict)."""
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def changed_keys(saved: dict, now: dict, resumable: tuple[str, ...] = ()) -> list[str]:
  """Keys whose values differ between two configs, except the resumable ones."""
  saved, now = flat(saved), flat(files.jsonable(now))
  skip = set(ALWAYS_RESUMABLE) | set(resumable)
  return sorted(k for k in set(saved) | set(now) if k not in skip and saved.get(k) != now.get(k))


def plan(workdir: files.PathLike, config: dict, *, overwrite: bool, resumable: tuple[str, ...] = ()) -> Plan:
  """Decides where the run writes, reading the workdir only.

  Raises:
    ConfigError: the workdir is a file, not writable, holds a finished or foreign run
      (without overwrite), or an unfinished run of another config.
  """
  root = files.path(workdir)
  _check_writable(root)
  _finish_interrupted_swap(root)
  state = _state(root)
  if state == "empty":
    return Plan(root, root, resume=False)
  if state == "unfinished" and not overwrite:
    changed = changed_keys(files.read_json(root / CONFIG), config, resumable)
    if changed:
      raise ConfigError(f"workdir {str(root)!r} holds an unfinished run whose config differs in "
                        f"{', '.join(changed)}; rerun with the same config to resume it, use a new --workdir, or pass "
                        "--config.overwrite=True to replace it (the old run is kept until the new one is complete).")
    return Plan(root, root, resume=True)
  if not overwrite:
    raise _occupied(root, state)
  staging = staging_dir(root)
  resume = (_state(staging) == "unfinished" and not changed_keys(files.read_json(staging / CONFIG), config, resumable))
  return Plan(root, staging, resume=resume)


def _occupied(directory: epath.Path, state: str) -> ConfigError:
  """The refusal of a workdir holding a finished run or foreign files (without overwrite)."""
  what = "a finished run (results.json)" if state == "finished" else "files that are not a tna_jax run"
  return ConfigError(f"workdir {str(directory)!r} already holds {what}; use a new --workdir or pass "
                     "--config.overwrite=True to replace it (the old run is kept until the new one is complete).")


def _state(directory: epath.Path) -> str:
  if not directory.exists() or not any(directory.iterdir()):
    return "empty"
  if (directory / RESULTS).exists():
    return "finished"
  return "unfinished" if (directory / CONFIG).exists() else "foreign"


def _check_writable(root: epath.Path) -> None:
  if root.exists() and not root.is_dir():
    raise ConfigError(f"--workdir={str(root)!r} is a file; pass a directory (it is created if missing).")
  if not files.is_local(root):
    return  # a bucket: permissions show on the first write
  existing = root
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir={str(root)!r} is not writable ({str(existing)!r} is "
                      f"{'not a directory' if not existing.is_dir() else 'read-only'}); pass a directory you can "
                      "write to.")


def _finish_interrupted_swap(root: epath.Path) -> None:
  """An overwrite killed between moving the old run away and the new one in: finish it."""
  staging = staging_dir(root)
  if not root.exists() and (staging / RESULTS).exists():
    staging.rename(root)


def start(plan_: Plan, config: dict) -> "Lock":
  """Creates the run's directory, locks it, clears what an abandoned overwrite left in a
  staging directory, and records the config (a resumed run keeps its own). Returns the
  held lock."""
  directory = plan_.directory
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir={str(plan_.workdir)!r} cannot be created ({e.strerror or e}); pass a directory you "
                      "can write to.") from None
  lock = Lock(directory)
  lock.acquire()
  if _state(directory) == "finished":  # another run finished between `plan` and the lock
    lock.release()
    raise _occupied(directory, "finished")
  if plan_.staged and not plan_.resume:
    for entry in directory.iterdir():
      if entry.name != LOCK:
        entry.rmtree() if entry.is_dir() else entry.unlink()
  if not plan_.resume:
    files.write_json(directory / CONFIG, config)
  return lock


def complete(plan_: Plan) -> epath.Path | None:
  """After results.json is written: moves a staged run into place. Returns the backup of
  the run it replaced (None when nothing was replaced)."""
  if not plan_.staged:
    return None
  backup = None
  if plan_.workdir.exists():
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    backup = plan_.workdir.parent / f"{plan_.workdir.name}.previous-{stamp}"
    plan_.workdir.rename(backup)
  plan_.directory.rename(plan_.workdir)
  return backup


class Lock:
  """`.lock` in a run's directory: host, pid and a heartbeat refreshed by a thread.

  Local directories are locked with an exclusive create; buckets (no such primitive) with
  write-then-read-back of a unique token, which is enough for the mistakes it guards
  against (two commands started by hand into one workdir).
  """

  def __init__(self, directory: epath.Path):
    self.path = directory / LOCK
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _content(self) -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                       "heartbeat": time.time()})

  def acquire(self) -> None:
    holder = self._holder()
    if holder is not None:
      if _alive(holder):
        raise ConfigError(f"workdir {str(self.path.parent)!r} is in use by a live run (host {holder.get('host')}, "
                          f"pid {holder.get('pid')}); wait for it to end or use another --workdir (if no run is using it, "
                          f"delete {str(self.path)!r}).")
      self.path.unlink()  # stale: its process is gone
    if files.is_local(self.path):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        raise ConfigError(f"workdir {str(self.path.parent)!r} was just locked by another run; use another "
                          "--workdir.") from None
      with os.fdopen(fd, "w") as f:
        f.write(self._content())
    else:
      self.path.write_text(self._content())
      if (self._holder() or {}).get("token") != self.token:
        raise ConfigError(f"workdir {str(self.path.parent)!r} was just locked by another run; use another --workdir.")
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()

  def _holder(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except ValueError:
      return {}  # half-written by a process that died: stale

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      if (self._holder() or {}).get("token") == self.token:
        files.write_text(self.path, self._content())

  def release(self, directory: epath.Path | None = None) -> None:
    """Stops the heartbeat and removes the lock (from `directory` if the run moved)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      path = (directory / LOCK) if directory is not None else self.path
      if path.exists():
        path.unlink()


def _alive(holder: dict) -> bool:
  """Whether the process that wrote a lock still runs."""
  if not holder:
    return False
  if holder.get("host") == socket.gethostname():
    try:
      os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      return True
    return True
  return time.time() - float(holder.get("heartbeat", 0)) < STALE_SECONDS
