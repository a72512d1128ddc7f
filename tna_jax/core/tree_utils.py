"""Small pure helpers over parameter pytrees: stable path names and per-leaf keys."""

import zlib
from typing import Any

import jax

PyTree = Any


def path_str(path: tuple) -> str:
  """'Dense_0/kernel' for a flax params path; stable across processes and runs.

  `jax.tree_util.keystr` in its simple form: each dict key, attribute name or sequence index
  as `str`, joined by '/'. These strings feed the crc of `path_key`, so the per-leaf mask and
  permutation keys depend on exactly this form (tests/test_masks.py pins it).
  """
  return jax.tree_util.keystr(path, simple=True, separator="/")


def path_key(key: jax.Array, path: str) -> jax.Array:
  """A key for one leaf, derived from its path with crc32 (never `hash()`, which is salted)."""
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def map_with_path_str(fn, tree: PyTree, *rest: PyTree) -> PyTree:
  """tree_map where `fn(path_str, leaf, *rest_leaves)` also gets the leaf's path string."""
  return jax.tree_util.tree_map_with_path(lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest)
