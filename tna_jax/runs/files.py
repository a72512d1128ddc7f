"""Files under a workdir or a base path, local or in a bucket, through one abstraction.

Every file the library writes or reads under a workdir (results, metrics, plots, the lock,
the config of a run) goes through `etils.epath`, the path layer orbax itself uses, so
`--workdir=gs://bucket/run` works on a TPU VM exactly like a local directory. Checkpoint
arrays are written by orbax (tensorstore), which speaks the same URLs.

Writes are whole-file and atomic where the store allows it: the content goes to a
temporary name beside the target and is renamed into place, so a reader (or a run killed
midway) never sees half a file. Files get the process's default mode (0644 under the usual
umask), never the 0600 of `tempfile`.
"""

import json
import os
import uuid
from typing import Any

from etils import epath
import numpy as np

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path: URLs (gs://, s3://) untouched, local paths made absolute."""
  text = os.fspath(p)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def is_local(p: PathLike) -> bool:
  """Whether `p` names a file on this machine (no URL scheme)."""
  return "://" not in os.fspath(p)


def write_bytes(target: PathLike, data: bytes) -> None:
  """Writes `data` to `target` through a temporary sibling and a rename."""
  target = path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
  tmp.write_bytes(data)
  tmp.replace(target)


def write_text(target: PathLike, text: str) -> None:
  """`write_bytes` for UTF-8 text."""
  write_bytes(target, text.encode())


def write_json(target: PathLike, obj: Any) -> None:
  """Strict JSON (RFC 8259): numpy values become lists and numbers, and non-finite floats
  become null, so no parser meets a bare NaN and no NaN can pass for a number."""
  write_text(target, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def read_json(source: PathLike) -> Any:
  return json.loads(path(source).read_text())


def jsonable(obj: Any) -> Any:
  """`obj` with numpy/jax values as Python ones and non-finite floats as None."""
  if isinstance(obj, dict):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if hasattr(obj, "tolist"):  # numpy and jax arrays and scalars
    return jsonable(np.asarray(obj).tolist())
  if isinstance(obj, float) and not np.isfinite(obj):
    return None
  return obj
