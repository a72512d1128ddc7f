"""big_vision's ViT checkpoints (.npz): read into `transformers.ViT`'s layout, and written.

big_vision publishes its ViTs as one .npz of '/'-joined parameter paths; `load` converts
every layout it has used (see there) so `bases.graft` can put the result on a model, and
`save` writes params the same way (tests and hand-made bases).
"""

import io
import zipfile
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from tna_jax.core import tree_utils
from tna_jax.errors import DataNotFoundError
from tna_jax.runs import files

PyTree = Any


def load(path: str) -> dict:
  """The params of a big_vision ViT checkpoint (.npz), in `transformers.ViT`'s layout.

  Reads what big_vision writes and publishes: keys are '/'-joined parameter paths, maybe
  under 'params/' or 'opt/target/'; bfloat16 arrays stored as raw 2-byte voids; blocks
  either one per layer (`encoderblock_{i}`) or stacked by `scan` (`encoderblock` with a
  leading depth axis); and the older vit_jax names (pre-linen module numbering such as
  `MultiHeadDotProductAttention_1`, position embeddings inside `Transformer` or
  `posembed_input`, and the class token's position embedding folded into `cls`).
  """
  if not path or not files.path(path).is_file():
    raise DataNotFoundError(f"base.path={path!r} is not a file; pass a big_vision ViT .npz checkpoint.")
  # Imported on use: importing flax.training.checkpoints logs a missing-TensorFlow warning in every run.
  from flax.training import checkpoints as flax_checkpoints  # pylint: disable=g-import-not-at-top
  try:
    with np.load(io.BytesIO(files.path(path).read_bytes()), allow_pickle=False) as npz:
      flat = {tuple(key.split("/")): _recover_dtype(npz[key]) for key in npz.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise DataNotFoundError(f"base.path={path!r} is not a readable .npz file ({type(e).__name__}: {e}); pass an "
                            "intact big_vision ViT checkpoint.") from None
  tree = flax.traverse_util.unflatten_dict(flat)
  if "params" in tree:
    tree = tree["params"]
  elif "opt" in tree:
    tree = tree["opt"]["target"]
  tree = flax_checkpoints.convert_pre_linen(tree)
  return _fix_vit_layout(dict(tree))


def save(path: str, params: PyTree) -> None:
  """Writes params as big_vision does: one array per '/'-joined path, in one .npz."""
  flat = {tree_utils.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  files.write_bytes(path, buffer.getvalue())


def _recover_dtype(array: np.ndarray) -> np.ndarray:
  """bfloat16 saved by numpy as 2-byte voids, back to numbers (float32)."""
  if array.dtype.kind == "V" and array.dtype.itemsize == 2:
    return array.view(jnp.bfloat16).astype(np.float32)
  return array


def _fix_vit_layout(params: dict) -> dict:
  """Old position-embedding places, the folded class token, and scanned blocks."""
  encoder = params.get("Transformer", {})
  if "posembed_input" in encoder:
    params["pos_embedding"] = encoder.pop("posembed_input")["pos_embedding"]
  if "pos_embedding" in encoder:
    params["pos_embedding"] = encoder.pop("pos_embedding")
  if "pos_embedding" in params and "cls" in params:
    pe = params["pos_embedding"]
    side = int(np.sqrt(pe.shape[1] - 1))
    if side * side + 1 == pe.shape[1]:  # Old layout: cls was concatenated before adding posemb.
      params["cls"] = params["cls"] + pe[:, :1]
      params["pos_embedding"] = pe[:, 1:]
  if "encoderblock" in encoder:  # big_vision's scan=True: one block with a leading depth axis.
    stacked = encoder.pop("encoderblock")
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
      encoder[f"encoderblock_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
