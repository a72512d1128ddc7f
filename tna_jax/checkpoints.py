"""Checkpoints as plain orbax pytrees, so anyone can read them with orbax alone:
`ocp.StandardCheckpointer().restore(path)`.

Multi-process runs: every process calls `save` and `restore` with the same path on storage
they share (a gs:// bucket or NFS); arrays spread over several processes are gathered
first, orbax writes each array once (from process 0) and synchronizes the processes.
"""

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tna_jax import sharding

PyTree = Any


def save(path: str, tree: PyTree) -> None:
  """Writes `tree` to `path` (orbax writes to a temporary directory and renames it, so a
  crash never leaves a half-written checkpoint under `path`). Saved as numpy, so it
  restores on any number of devices."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), sharding.fetch(tree))


def restore(path: str, like: PyTree | None = None) -> PyTree:
  """Reads a checkpoint; with `like`, into that structure (and dtypes), else as numpy."""
  with ocp.StandardCheckpointer() as checkpointer:
    if like is None:
      return checkpointer.restore(os.path.abspath(path))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)
    return checkpointer.restore(os.path.abspath(path), abstract)
