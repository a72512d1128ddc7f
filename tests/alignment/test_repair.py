"""REPAIR: endpoints unchanged, interpolated statistics restored at every site, for every
kind of layer the correction is folded into (Dense, Conv, LayerNorm, BatchNorm)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tna_jax.alignment import interpolation, repair
from test_permutations import TINY_MODELS, tiny


@functools.partial(jax.jit, static_argnums=0)
def _repair_at(model, variables_a, variables_b, images, alphas):
  """Per alpha: logits of the plain and the repaired interpolation, the repaired network's
  site statistics and their targets."""
  sites = repair.sites(model, variables_a)
  stats_a, stats_b = (repair.channel_stats(model, v, images, sites) for v in (variables_a, variables_b))

  def at(alpha):
    plain = interpolation.interpolate(variables_a, variables_b, alpha)
    target = interpolation.interpolate(stats_a, stats_b, alpha)
    repaired = repair.repair(model, plain, images, target)
    return (model.apply(plain, images, train=False), model.apply(repaired, images, train=False),
            repair.channel_stats(model, repaired, images, sites), target,
            repair.channel_stats(model, plain, images, sites))

  return jax.vmap(at)(alphas)


# Folding into Dense and Conv biases (mlp, cnn; as resnet20-none), LayerNorm and BatchNorm, and a ViT
# (embedding, norms and MLP Dense layers are sites; its pos_embedding and attention are left alone).
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20-batchnorm", "resnet20-layernorm", "vit"])
def test_repair_keeps_endpoints_and_restores_interpolated_statistics(name):
  model, variables_a, _ = tiny(name)
  _, variables_b, _ = tiny(name, seed=1)
  images = jax.random.normal(jax.random.key(0), (64,) + TINY_MODELS[name][1])
  plain, repaired, stats, target, plain_stats = _repair_at(model, variables_a, variables_b, images,
                                                           jnp.array([0.0, 1.0, 0.5]))
  for i in (0, 1):  # Endpoints: REPAIR changes nothing.
    scale = np.abs(plain[i]).max()
    np.testing.assert_allclose(repaired[i], plain[i], rtol=1e-4, atol=1e-4 * scale)
  # Midpoint: every site has the interpolation of the endpoints' mean and std ...
  for site, (mean, std) in stats.items():
    np.testing.assert_allclose(mean[2], target[site][0][2], atol=2e-3 * float(np.abs(target[site][1][2]).max()),
                               err_msg=site)
    np.testing.assert_allclose(std[2], target[site][1][2], rtol=2e-3, err_msg=site)
  # ... which the plain interpolation lacks (its channels have collapsed in spread).
  collapsed = [np.mean(plain_stats[site][1][2] / target[site][1][2]) for site in stats]
  assert min(collapsed) < 0.9
  assert not np.allclose(repaired[2], plain[2], atol=1e-2)


def test_sites_are_the_layers_that_can_absorb_the_correction():
  for name, expected in (("mlp", ("fc1", "fc2")), ("cnn", ("conv1", "conv2", "conv3", "fc1"))):
    model, variables, _ = tiny(name)
    assert repair.sites(model, variables) == expected
  for norm, kind in (("batchnorm", "norm"), ("layernorm", "norm"), ("none", "conv")):
    model, variables, _ = tiny(f"resnet20-{norm}")
    sites = repair.sites(model, variables)
    assert len(sites) == 1 + 9 * 2 + 2  # stem, two per block, two shortcuts
    assert all(site.rsplit("/", 1)[-1].startswith((kind, "shortcut_" + kind)) for site in sites), sites
    assert "head" not in sites
