"""mask.select: masks chosen from the base's weight magnitudes, against numpy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tna_jax.core import masks
from tna_jax.errors import ConfigError


def _base():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"Dense_0": {"kernel": jax.random.normal(k1, (30, 40)), "bias": jnp.zeros(40)},  # bias: all ties
          "head": {"kernel": jax.random.normal(k2, (40, 7)), "bias": jnp.arange(7.0) - 3.0}}


@pytest.mark.parametrize("select", ["magnitude_small", "magnitude_large"])
def test_magnitude_rules_fix_exactly_the_smallest_or_largest_entries_of_each_leaf(select):
  base, fraction = _base(), 0.3
  mask = masks.fixed_mask(base, fraction, seed=5, select=select, exclude="bias")
  for path, leaf in (("Dense_0", "kernel"), ("head", "kernel")):
    w, m = np.abs(np.asarray(base[path][leaf])).ravel(), np.asarray(mask[path][leaf]).ravel()
    k = int(round(fraction * w.size))
    order = np.argsort(w if select == "magnitude_small" else -w, kind="stable")
    assert m.sum() == k
    np.testing.assert_array_equal(np.flatnonzero(m), np.sort(order[:k]))  # no ties among random normals
  assert not np.asarray(mask["head"]["bias"]).any()  # excluded leaves stay trainable
  # Ties (the all-zero bias) are broken by the seeded order: exactly k fixed, depending on the seed.
  tied = [np.asarray(masks.fixed_mask(base, 0.5, seed=s, select=select, include="Dense_0/bias")["Dense_0"]["bias"])
          for s in (1, 1, 2)]
  assert tied[0].sum() == 20
  np.testing.assert_array_equal(tied[0], tied[1])
  assert not np.array_equal(tied[0], tied[2])
  # head/bias = -3..3: |w| ranks 0 < 1,1 < 2,2 < 3,3; the 3 smallest are 0 and both 1s, the 3 largest both 3s and a 2.
  head_bias = np.asarray(masks.fixed_mask(base, 3 / 7, seed=0, select=select, include="head/bias")["head"]["bias"])
  fixed = set(np.flatnonzero(head_bias).tolist())
  if select == "magnitude_small":
    assert fixed == {2, 3, 4}
  else:
    assert {0, 6} < fixed and len(fixed & {1, 5}) == 1


def test_random_select_is_the_default_draw_and_every_contributor_gets_the_same_mask():
  base = _base()
  chex.assert_trees_all_equal(masks.fixed_mask(base, 0.4, seed=3, select="random"), masks.fixed_mask(base, 0.4, seed=3))
  spec = masks.MaskSpec(fixed_fraction=0.4, seed=3, select="magnitude_small")
  # Each contributor draws the mask from the shared base: the same mask, whatever else differs between them.
  chex.assert_trees_all_equal(spec.draw(base), spec.draw(jax.tree.map(jnp.copy, base)))
  fine_tuned = jax.tree.map(lambda w: w + 0.5, base)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(spec.draw(base)),
                                                          jax.tree.leaves(spec.draw(fine_tuned))))


def test_magnitude_rules_need_weight_granularity_and_a_known_name():
  with pytest.raises(ConfigError, match="mask.select='magnitude_small'.*granularity='weight'"):
    masks.fixed_mask(_base(), 0.4, seed=0, select="magnitude_small", granularity="neuron")
  with pytest.raises(ConfigError, match="mask.select='largest'.*random, magnitude_small, magnitude_large"):
    masks.MaskSpec(select="largest")
