"""K models trained together equal the same models trained one by one; masks hold."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tna_jax.core import data, execution, masks, models, optim, sharding, train


def _dataset(n=512, num_classes=10, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
  labels = (images.reshape(n, -1)[:, :num_classes].argmax(1)).astype(np.int32)  # learnable
  return data.Dataset(name="synthetic", train_images=images, train_labels=labels, test_images=images[:200],
                      test_labels=labels[:200], num_classes=num_classes, mean=(0.5,), std=(0.29,))


def _setup(model_cfg, fraction=0.4, opt="sgd", epochs=3, batch_size=64):
  ds = _dataset()
  model = models.get_model(ml_collections.ConfigDict(model_cfg), ds.num_classes)
  variables = models.init_variables(model, jax.random.key(0), ds.image_shape)
  mask = masks.fixed_mask(variables["params"], fraction, seed=1)
  opt_cfg = ml_collections.ConfigDict(dict(name=opt, learning_rate=0.05, momentum=0.9, weight_decay=5e-3))
  tx = optim.make_optimizer(opt_cfg, epochs * (len(ds.train_labels) // batch_size))
  return ds, model, variables, mask, tx


def _fit(model, tx, states, seeds, ds, epochs=3, batch_size=64, eval_every=1):
  return train.fit(model, tx, states, seeds, ds, num_epochs=epochs, batch_size=batch_size, eval_batch_size=100,
                   progress=False, eval_every=eval_every)


@pytest.mark.parametrize("model_cfg", [
    dict(name="mlp", depth=2, width=32),
    dict(name="resnet20", norm="batchnorm", width_multiplier=0.25),
])
def test_models_trained_together_equal_models_trained_one_by_one(model_cfg):
  # Together = `fit` (on CPU the models run one after another inside the program) and the
  # vmapped program of accelerators. Float noise between vmapped and single convolutions
  # grows with every step of a chaotic BN ResNet (1e-7 after one step, 1e-3 after eight),
  # so that one is compared after 2 steps.
  epochs = 1 if model_cfg["name"] == "resnet20" else 3
  ds, model, variables, mask, tx = _setup(model_cfg, epochs=epochs)
  if model_cfg["name"] == "resnet20":
    ds = ds.subset(128, 100)
  seeds = [11, 12, 13]
  stack = lambda: train.stack([train.init_train_state(tx, variables, mask)] * len(seeds))
  images, labels = jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels)
  together, history = _fit(model, tx, stack(), seeds, ds, epochs)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  vmapped_epochs = train.make_train_epochs(model, tx, mesh, batch_size=64, mean=ds.mean, std=ds.std,
                                           num_examples=len(labels),
                                           policy=dataclasses.replace(execution.policy(mesh), sequential=False))
  vmapped = stack()
  for epoch in range(epochs):
    vmapped, _ = vmapped_epochs(vmapped, jnp.asarray(seeds), epoch, images, labels)
  epoch_fn = jax.jit(train.make_epoch_fn(model, tx, batch_size=64, mean=ds.mean, std=ds.std))
  for k, seed in enumerate(seeds):
    state = train.init_train_state(tx, variables, mask)
    for epoch in range(epochs):
      state, _ = epoch_fn(state, jax.random.fold_in(jax.random.key(seed), epoch), images, labels)
    # One after another inside the call (the CPU default) runs each model's own program:
    # bit-identical to training it alone.
    chex.assert_trees_all_equal(train.unstack(together.variables, k), state.variables)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                 train.unstack(vmapped.variables, k), state.variables)
  # Different data orders really give different models, and training learned something.
  a, b = (train.unstack(together.params, k) for k in (0, 1))
  assert not np.allclose(jax.tree.leaves(a)[0], jax.tree.leaves(b)[0])
  assert len(history) == epochs and len(history[-1]["test_accuracy"]) == len(seeds)
  if epochs == 3:
    # Evaluating less often changes nothing but which records have test metrics: the last always does.
    sparse, sparse_history = _fit(model, tx, stack(), seeds, ds, epochs, eval_every=2)
    chex.assert_trees_all_equal(sparse.variables, together.variables)
    assert ["test_accuracy" in r for r in sparse_history] == [False, True, True]
    np.testing.assert_array_equal(sparse_history[-1]["test_accuracy"], history[-1]["test_accuracy"])
    assert all(r["train_flops"] == history[0]["train_flops"] > 0 and r["train_flops_per_s"] > 0
               for r in sparse_history)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_training_never_moves_fixed_entries_and_pruned_entries_stay_zero(opt):
  ds, model, variables, mask, tx = _setup(dict(name="mlp", depth=2, width=32), fraction=0.5, opt=opt)
  pruned = {"params": masks.prune(variables["params"], mask)}
  states = train.stack([train.init_train_state(tx, variables, mask), train.init_train_state(tx, pruned, mask),
                        train.init_train_state(tx, variables, masks.no_mask(variables["params"]))])
  trained, history = _fit(model, tx, states, [1, 1, 1], ds)
  for init, k in ((variables["params"], 0), (pruned["params"], 1)):
    after = train.unstack(trained.params, k)
    for p0, p1, m in zip(jax.tree.leaves(init), jax.tree.leaves(after), jax.tree.leaves(mask)):
      p0, p1, m = np.asarray(p0), np.asarray(p1), np.asarray(m)
      np.testing.assert_array_equal(p0[m].view(np.uint32), p1[m].view(np.uint32))
      assert (p0[~m] != p1[~m]).mean() > 0.5
  vanilla = train.unstack(trained.params, 2)
  moved = [np.mean(np.asarray(p0) != np.asarray(p1)) for p0, p1 in zip(jax.tree.leaves(variables["params"]),
                                                                       jax.tree.leaves(vanilla))]
  assert min(moved) > 0.5, "vanilla training must move (almost) every entry"
  assert history[-1]["train_loss"][2] < history[0]["train_loss"][2]


def test_batch_size_larger_than_data_is_an_error():
  ds, model, variables, mask, tx = _setup(dict(name="mlp", depth=1, width=8))
  with pytest.raises(ValueError, match="batch_size=4096"):
    _fit(model, tx, train.stack([train.init_train_state(tx, variables, mask)]), [0], ds, batch_size=4096)
