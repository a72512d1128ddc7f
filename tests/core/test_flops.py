"""FLOPs from XLA's cost analysis (loops counted per step), hardware peaks, MFU."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from tna_jax.core import flops, masks, models, optim, sharding, train

B, STEPS, IN, WIDTH, CLASSES = 16, 4, 784, 32, 10  # MLP 784-32-32-10


def _mlp_epoch():
  """A compiled epoch (4 steps of 16) of one MLP 784-32-32-10 with SGD momentum and a mask."""
  model = models.get_model(ml_collections.ConfigDict(dict(name="mlp", depth=2, width=WIDTH)), CLASSES)
  tx = optim.make_optimizer(ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.05, momentum=0.9,
                                                           weight_decay=5e-4)), 100)
  variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
  state = train.init_train_state(tx, variables, masks.fixed_mask(variables["params"], 0.4, seed=1))
  images, labels = jnp.zeros((B * STEPS, 28, 28, 1), jnp.uint8), jnp.zeros((B * STEPS,), jnp.int32)
  epoch = train.make_epoch_fn(model, tx, batch_size=B, mean=(0.5,), std=(0.25,))
  return model, tx, state, images, labels, jax.jit(epoch).lower(state, jax.random.key(0), images, labels).compile()


def test_mlp_epoch_flops_match_the_hand_count():
  model, tx, state, images, labels, compiled = _mlp_epoch()
  # The hand count, per example of a step:
  # - forward: 2 * in * out multiply-adds per dense layer;
  # - backward: the weight gradient (2 * in * out per layer) and the gradient with respect to
  #   each layer's input (2 * in * out), which the first layer does not need (its input is
  #   the data), so backward = 2 x forward - 2 * 784 * 32;
  # - the input normalization: 3 elementwise ops per pixel (/255, -mean, /std).
  # Per parameter and step, the optimizer: weight decay (mul, add), momentum (mul, add), the
  # learning rate (mul), the freeze (select) and apply_updates (add): 7 elementwise ops.
  # Biases, relu, softmax cross-entropy and the shuffle are left out (about 1 % here).
  layers = [(IN, WIDTH), (WIDTH, WIDTH), (WIDTH, CLASSES)]
  forward = sum(2 * i * o for i, o in layers)
  backward = 2 * forward - 2 * IN * WIDTH
  params = sum(i * o + o for i, o in layers)
  per_step = B * (forward + backward + 3 * IN) + 7 * params
  hand = STEPS * per_step
  count = flops.count(compiled)
  assert count.flops == pytest.approx(hand, rel=0.10)
  assert count.xla_flops < 0.5 * hand  # XLA's own figure counts the scan body once
  assert not count.unknown_trip_counts
  # K=2 models in one compiled call (one after another on CPU) cost twice one model.
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  epochs = train.make_train_epochs(model, tx, mesh, batch_size=B, mean=(0.5,), std=(0.25,), num_examples=B * STEPS)
  two = epochs.lower(train.stack([state, state]), jnp.arange(2), 0, images, labels).compile()
  assert flops.flops(two) == pytest.approx(2 * count.flops, rel=0.01)


def test_loops_count_once_per_trip_nested_ones_too():
  a, b = jnp.ones((64, 32)), jnp.ones((32, 32))
  matmul = 2 * 64 * 32 * 32

  def nested(a, b):
    inner = lambda c: jax.lax.scan(lambda c, _: (c @ b, None), c, None, length=7)[0]
    return jax.lax.scan(lambda c, _: (inner(c) @ b, None), a, None, length=3)[0]

  assert flops.flops_of(nested, a, b) == pytest.approx(3 * 8 * matmul, rel=1e-3)
  assert flops.flops_of(jnp.matmul, a, b) == matmul  # no loop: XLA's figure as it is


def test_cost_analysis_accepts_the_list_form_of_older_jax():
  class Old:
    def cost_analysis(self):
      return [{"flops": 3.0, "bytes accessed": 1.0}, {"flops": 2.0}]

  assert flops.cost_analysis(Old()) == {"flops": 5.0, "bytes accessed": 1.0}


@pytest.mark.parametrize("kind, name", [
    ("TPU v4", "TPU v4"), ("TPU v5 lite", "TPU v5e"), ("TPU v5e", "TPU v5e"), ("TPU v5", "TPU v5p"),
    ("TPU v5p", "TPU v5p"), ("TPU v6 lite", "TPU v6e"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100-PCIE-40GB", "A100"), ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"),
])
def test_device_kinds_map_to_their_published_peaks(kind, name):
  peak = flops.peak_for(kind)
  assert peak.name == name and peak.bf16 > 1e14 and peak.source
  assert peak.fp32 is None or peak.fp32 < peak.bf16


def test_cpu_has_no_published_peak_but_a_measured_one():
  assert flops.peak_for("cpu") is None and flops.peak_for("TPU v9") is None
  measured = flops.cpu_matmul_peak(256, repeats=2)
  assert measured > 1e8 and flops.cpu_matmul_peak(256, repeats=2) == measured  # measured once per process
  assert flops.mfu(2e9, 2.0, 4e9) == pytest.approx(0.25) and flops.achieved(6.0, 2.0) == 3.0
