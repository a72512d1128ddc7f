"""REPAIR (Jordan et al., 2022): undo the variance collapse of interpolated networks.

Averaging two networks' weights shrinks the spread of each channel's pre-activations (the
endpoints' units are not perfectly correlated), and the damage compounds with depth.
REPAIR measures, on training images, each channel's mean and standard deviation in both
endpoints, and rescales the interpolated network's channels to the interpolation of
those statistics. The correction is folded into the layer that produces the channel
(kernel and bias of a Dense/Conv, scale and bias of a norm), so a repaired network is
plain variables of the same model.

All channels are corrected in ONE forward pass over the whole image set: each site's
output is normalized with its exact statistics on those images before later layers see
it, which is what the folded network computes. So the corrected statistics are exact,
and at alpha = 0 or 1 (targets = the network's own statistics) REPAIR changes nothing.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from tna_jax.alignment import permutations
from tna_jax.core import tree_utils

PyTree = Any
Stats = dict[str, tuple[jax.Array, jax.Array]]  # module -> (per-channel mean, std)
EPS = 1e-5  # added to variances, as BatchNorm does


def sites(model, variables: Mapping[str, PyTree]) -> tuple[str, ...]:
  """Modules whose output channels REPAIR rescales.

  Every permuted layer with a per-channel bias to absorb the shift: Dense and Conv layers
  with a bias, LayerNorm and BatchNorm. Convs without a bias feed a norm, which is
  repaired instead; the head (unpermuted logits) is left alone, and so are modules
  described leaf by leaf (`permutations.Leaves`: attention projections, LoRA layers),
  whose leaves the per-channel fold below does not fit.
  """
  spec = permutations.spec_for(model, variables)
  paths = set(spec.leaf_axes())
  return tuple(layer.module for layer in spec.layers if isinstance(layer, permutations.Layer)
               and layer.p_out is not None and f"{layer.module}/bias" in paths)


def _moments(y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel (last axis) mean and std over all other axes."""
  y = y.astype(jnp.float32)
  axes = tuple(range(y.ndim - 1))
  return jnp.mean(y, axes), jnp.sqrt(jnp.var(y, axes) + EPS)


def channel_stats(model, variables: Mapping[str, PyTree], images: jax.Array, modules) -> Stats:
  """Mean and std of each channel of `modules`' outputs on float `images` [N, ...]."""
  _, outputs = permutations.module_outputs(model, variables, images, modules)
  return {m: _moments(outputs[m]) for m in modules}


def repair(model, variables: Mapping[str, PyTree], images: jax.Array, target: Stats) -> dict:
  """`variables` with each site's channels rescaled to `target` (mean, std) on `images`.

  Args:
    model: the flax module.
    variables: typically an interpolation of two (aligned) endpoints.
    images: float training images [N, ...], normalized; all N go through at once.
    target: per site (keys: `sites(...)`), the interpolation of the endpoints'
      `channel_stats` on the same images.
  """

  def correct(module, y):
    mean, std = _moments(y)
    target_mean, target_std = target[module]
    return ((y - mean) / std * target_std + target_mean).astype(y.dtype)

  _, outputs = permutations.module_outputs(model, variables, images, tuple(target), edit=correct)
  scale, shift = {}, {}
  for module, (target_mean, target_std) in target.items():
    mean, std = _moments(outputs[module])
    scale[module] = target_std / std
    shift[module] = target_mean - scale[module] * mean

  def fold(path: str, leaf: jax.Array) -> jax.Array:
    module, name = path.rsplit("/", 1) if "/" in path else ("", path)  # a transformer's own pos_embedding
    if module not in scale:
      return leaf
    leaf = leaf * scale[module].astype(leaf.dtype)
    return leaf + shift[module].astype(leaf.dtype) if name == "bias" else leaf

  return {**variables, "params": tree_utils.map_with_path_str(fold, variables["params"])}
