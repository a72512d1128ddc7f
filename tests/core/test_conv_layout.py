"""CPU speed rewrites give the same numbers: canonical convolutions, models one after another."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tna_jax.core import conv_layout, masks, optim, stacking, train


class _TinyConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    del train
    x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="VALID", name="conv1")(x))
    x = nn.relu(nn.Conv(6, (3, 3), padding=1, name="conv2")(x))
    return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def test_canonical_convolutions_compute_the_same_training_steps():
  model = _TinyConvNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 9, 9, 2)), train=False)
  tx = optim.make_optimizer(ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, momentum=0.9)), 10)
  state = train.init_train_state(tx, variables, masks.no_mask(variables["params"]))
  x = jax.random.normal(jax.random.key(1), (2, 4, 9, 9, 2))
  y = jnp.array([[0, 1, 2, 3]] * 2)
  step = lambda s, b: train.train_step(model, tx, s, *b)
  plain = jax.jit(lambda s: jax.lax.scan(step, s, (x, y)))(state)
  fast = jax.jit(lambda s: jax.lax.scan(conv_layout.canonical_convolutions(step), s, (x, y)))(state)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(fast)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Any layout, e.g. NCHW activations with OIHW kernels.
  conv = lambda a, w: jax.lax.conv_general_dilated(a, w, (1, 2), [(1, 0), (0, 2)], rhs_dilation=(2, 1),
                                                   dimension_numbers=("NCHW", "OIHW", "CNHW"))
  a, w = jax.random.normal(jax.random.key(2), (2, 3, 7, 8)), jax.random.normal(jax.random.key(3), (5, 3, 2, 3))
  np.testing.assert_allclose(conv_layout.canonical_convolutions(conv)(a, w), conv(a, w), rtol=1e-5, atol=1e-5)
  jaxpr = jax.make_jaxpr(conv_layout.canonical_convolutions(jax.grad(lambda w: conv(a, w).sum())))(w)
  convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 2  # forward and weight gradient, both canonical
  assert all(tuple(e.params["dimension_numbers"]) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)) for e in convs)


def test_map_stacked_one_after_another_equals_vmap():
  model = _TinyConvNet()
  stacked = jax.vmap(lambda k: model.init(k, jnp.zeros((1, 9, 9, 2)), train=False))(
      jax.random.split(jax.random.key(0), 3))
  x = jax.random.normal(jax.random.key(1), (5, 9, 9, 2))
  apply = lambda variables, x, scale: scale * model.apply(variables, x, train=False)
  scales = jnp.array([1.0, 2.0, 3.0])
  for in_axes, args in (((0, None, 0), (stacked, x, scales)), ((0, None, None), (stacked, x, 2.0))):
    batched = jax.jit(stacking.map_stacked(apply, sequential=False, in_axes=in_axes))(*args)
    one_by_one = jax.jit(stacking.map_stacked(apply, sequential=True, in_axes=in_axes))(*args)
    assert one_by_one.shape == (3, 5, 10)
    np.testing.assert_allclose(one_by_one, batched, rtol=1e-5, atol=1e-6)
  jaxpr = jax.make_jaxpr(stacking.map_stacked(apply, sequential=True, in_axes=(0, None, 0)))(stacked, x, scales)
  assert [e.primitive.name for e in jaxpr.jaxpr.eqns] == ["scan"]  # one loop, no batched (grouped) convolution
  with pytest.raises(ValueError, match=r"in_axes=\(0, 1\) for 2 arguments; allowed: 0 or None"):
    stacking.map_stacked(lambda a, b: a + b, sequential=True, in_axes=(0, 1))(scales, scales)
