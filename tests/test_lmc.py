"""LMC curves: endpoints, identical models, vmapped curve vs a per-alpha loop, BN reset."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tna_jax import evaluate, lmc

MEAN, STD = (0.5,), (0.25,)


class TinyNet(nn.Module):
  """Dense -> BatchNorm -> relu -> Dense: small enough to check statistics by hand."""

  num_classes: int = 4
  bn_momentum: float = 0.9
  use_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16, name="hidden")(x.reshape(x.shape[0], -1))
    if self.use_bn:
      x = nn.BatchNorm(momentum=self.bn_momentum, use_running_average=not train, name="bn")(x)
    return nn.Dense(self.num_classes, name="head")(nn.relu(x))


def _setup(use_bn=False, n=300):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
  labels = rng.integers(0, 4, n).astype(np.int32)
  model = TinyNet(use_bn=use_bn)
  x = jnp.zeros((1, 4, 4, 1))
  va = model.init(jax.random.key(1), x, train=False)
  vb = model.init(jax.random.key(2), x, train=False)
  if use_bn:  # distinct running statistics, so interpolating them matters
    vb = {**vb, "batch_stats": jax.tree.map(lambda s: s + 0.5, vb["batch_stats"])}
  return model, va, vb, evaluate.make_batches(images, labels, 64), images


def _eval(model, variables, batches):
  return jax.device_get(evaluate.evaluate(evaluate.inference_fn(model), variables, batches, MEAN, STD))


def test_make_batches_counts_every_example_once():
  _, _, _, batches, _ = _setup(n=300)
  assert batches.images.shape[:2] == (5, 64)
  assert float(batches.weights.sum()) == 300


def test_curve_endpoints_equal_individual_evaluations():
  model, va, vb, batches, _ = _setup()
  curve = jax.device_get(lmc.lmc_curve(model, va, vb, jnp.linspace(0, 1, 5), batches, MEAN, STD))
  for idx, v in ((0, va), (-1, vb)):
    single = _eval(model, v, batches)
    assert curve["loss"][idx] == pytest.approx(float(single["loss"]), rel=1e-5)
    assert curve["accuracy"][idx] == pytest.approx(float(single["accuracy"]), abs=1e-6)


def test_identical_models_have_zero_barrier():
  model, va, _, batches, _ = _setup()
  alphas = jnp.linspace(0, 1, 7)
  curve = jax.device_get(lmc.lmc_curve(model, va, va, alphas, batches, MEAN, STD))
  result = lmc.barriers(alphas, curve["loss"], curve["accuracy"])
  assert result["loss_barrier"] == pytest.approx(0.0, abs=1e-5)
  assert result["accuracy_barrier_pp"] == pytest.approx(0.0, abs=1e-4)
  assert result["accuracy_barrier_rel"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("use_bn,chunk", [(False, 0), (False, 2), (True, 0), (True, 3)])
def test_vmapped_curve_equals_per_alpha_loop(use_bn, chunk):
  model, va, vb, batches, _ = _setup(use_bn)
  alphas = jnp.linspace(0, 1, 7)
  curve = jax.device_get(lmc.lmc_curve(model, va, vb, alphas, batches, MEAN, STD, alpha_chunk=chunk))
  for i, alpha in enumerate(np.asarray(alphas)):
    single = _eval(model, lmc.interpolate(va, vb, alpha), batches)
    assert curve["loss"][i] == pytest.approx(float(single["loss"]), rel=1e-5)
    assert curve["accuracy"][i] == pytest.approx(float(single["accuracy"]), abs=1e-6)


def test_bn_reset_reestimates_statistics_from_training_batches():
  model, va, vb, batches, images = _setup(use_bn=True)
  reset_images = jnp.asarray(images[:256].reshape(4, 64, 4, 4, 1))
  stats = lmc.reestimate_batch_stats(model, va, reset_images, MEAN, STD)
  # By hand: mean over batches of each batch's mean and (biased) variance of the BN input.
  x = (images[:256].reshape(4, 64, -1).astype(np.float32) / 255 - MEAN[0]) / STD[0]
  h = x @ np.asarray(va["params"]["hidden"]["kernel"]) + np.asarray(va["params"]["hidden"]["bias"])
  np.testing.assert_allclose(stats["bn"]["mean"], h.mean(1).mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["bn"]["var"], h.var(1).mean(0), rtol=1e-4, atol=1e-5)
  # The reset curve differs from the raw one (the statistics of vb were shifted) but is
  # still one consistent evaluation per alpha.
  alphas = jnp.linspace(0, 1, 3)
  raw = jax.device_get(lmc.lmc_curve(model, va, vb, alphas, batches, MEAN, STD))
  reset = jax.device_get(lmc.lmc_curve(model, va, vb, alphas, batches, MEAN, STD, bn_mode="reset",
                                       reset_images=reset_images))
  assert not np.allclose(raw["loss"], reset["loss"])
  expected = _eval(model, {**va, "batch_stats": stats}, batches)
  assert reset["loss"][0] == pytest.approx(float(expected["loss"]), rel=1e-5)


def test_barriers_on_a_known_curve():
  alphas = np.linspace(0, 1, 5)
  loss = np.array([1.0, 1.5, 2.5, 2.0, 2.0])  # line: 1, 1.25, 1.5, 1.75, 2
  accuracy = np.array([0.9, 0.8, 0.5, 0.7, 0.8])  # line: .9 .875 .85 .825 .8
  result = lmc.barriers(alphas, loss, accuracy)
  assert result["loss_barrier"] == pytest.approx(1.0)
  assert result["loss_barrier_alpha"] == 0.5
  assert result["accuracy_barrier_pp"] == pytest.approx(35.0)
  assert result["accuracy_barrier_rel"] == pytest.approx(0.35 / 0.85)
