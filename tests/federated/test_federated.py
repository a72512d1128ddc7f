"""Federated learning: partitions, the compiled round, the algorithms' defining properties, resume."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tna_jax.config import loader
from tna_jax.core import masks, models, optim, train
from tna_jax import report
from tna_jax.errors import ConfigError, DivergedError, TnaError
from tna_jax.experiments import fed
from tna_jax.federated import algorithms, client, partition
from tna_jax.runs import checkpoints, workdir as workdir_lib

MEAN, STD = (0.5,), (0.29,)
LR = 0.05


def _dataset(n=256, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
  labels = (images.reshape(n, -1)[:, :10].argmax(1)).astype(np.int32)  # learnable
  return images, labels


def _setup(lr=LR, momentum=0.9):
  model = models.get_model(ml_collections.ConfigDict(dict(name="mlp", depth=1, width=16)), 10)
  variables = models.init_variables(model, jax.random.key(0), (8, 8, 1))
  opt = ml_collections.ConfigDict(dict(name="sgd", learning_rate=lr, momentum=momentum, weight_decay=5e-4))
  return model, variables, optim.make_optimizer(opt, 100)


def _round(model, tx, parts, *, batch_size=32, local_epochs=1, **spec):
  spec = algorithms.RoundSpec(batch_size=batch_size, local_epochs=local_epochs,
                              clients_per_round=spec.pop("clients_per_round", len(parts)), **spec)
  return algorithms.make_round(model, tx, client.pack(parts), spec, mean=MEAN, std=STD)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _flat(tree):
  """All leaves of a tree in one flat array."""
  return np.concatenate([x.ravel() for x in _leaves(tree)])


def _assert_trees_equal(a, b):
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# --- partitions ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", partition.KINDS)
def test_partitions_cover_every_example_once_and_are_reproducible(kind):
  labels = np.random.default_rng(0).integers(0, 10, 3000)
  parts = partition.partition(labels, kind, 20, seed=1, alpha=0.5, classes_per_client=2, min_client_size=10)
  assert len(parts) == 20
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(3000))
  again = partition.partition(labels, kind, 20, seed=1, alpha=0.5, classes_per_client=2, min_client_size=10)
  other = partition.partition(labels, kind, 20, seed=2, alpha=0.5, classes_per_client=2, min_client_size=10)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))
  assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
  assert min(len(p) for p in parts) >= 10
  counts = partition.label_counts(labels, parts, 10)
  present = (counts > 0).sum(1)
  if kind == "iid":
    assert present.min() == 10 and max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
  elif kind == "shards":
    assert (present == 2).all() and ((counts > 0).sum(0) == 4).all()  # every class held by 20 * 2 / 10 clients
  else:
    assert partition.summary(counts)["dominant_class_share_mean"] > 0.3  # skewed: iid would give ~0.1


def test_dirichlet_skew_grows_as_alpha_shrinks_and_the_size_guard_holds():
  labels = np.random.default_rng(0).integers(0, 10, 5000)
  share = {a: partition.summary(partition.label_counts(labels, partition.partition(
      labels, "dirichlet", 10, seed=0, alpha=a, min_client_size=50), 10))["dominant_class_share_mean"]
           for a in (0.1, 100.0)}
  assert share[0.1] > 0.5 > 0.2 > share[100.0]
  with pytest.raises(ConfigError, match="min_client_size=400"):
    partition.partition(labels, "iid", 20, seed=0, min_client_size=400)
  with pytest.raises(ConfigError, match="partition.kind='pathological'.*iid, dirichlet, shards"):
    partition.partition(labels, "pathological", 20, seed=0)


def test_local_test_weights_reweight_the_test_set_to_each_clients_labels():
  test_labels = np.array([0, 0, 1, 1, 1, 2])
  counts = np.array([[10, 0, 0], [5, 5, 0]])  # client 0: only class 0; client 1: half 0, half 1
  w = partition.local_test_weights(test_labels, counts)
  correct = np.array([1, 0, 1, 1, 0, 1], np.float32)  # per-class accuracy: 0.5, 2/3, 1
  local = (w * correct).sum(1) / w.sum(1)
  np.testing.assert_allclose(local, [0.5, 0.5 * 0.5 + 0.5 * 2 / 3], rtol=1e-6)


# --- the compiled round -------------------------------------------------------------------


def test_one_client_with_full_participation_equals_centralized_training():
  images, labels = _dataset(256)  # 8 full batches of 32: centralized training drops nothing
  model, variables, tx = _setup()
  decay = 0.5
  round_fn = _round(model, tx, [np.arange(256)], local_epochs=2, lr_decay=decay, data_seed=7)
  state = algorithms.init(algorithms.parse("fedavg"), variables, masks.MaskSpec(), local_epochs=2)
  for _ in range(2):
    state, _ = round_fn(state, jnp.asarray(images), jnp.asarray(labels))

  # Centralized: a fresh optimizer each round at lr * decay**round, the same batches.
  params = variables["params"]
  for r in range(2):
    round_tx = optim.make_optimizer(ml_collections.ConfigDict(dict(
        name="sgd", learning_rate=LR * decay**r, momentum=0.9, weight_decay=5e-4)), 100)
    epoch = jax.jit(train.make_epoch_fn(model, round_tx, batch_size=32, mean=MEAN, std=STD))
    central = train.init_train_state(round_tx, {"params": params}, masks.no_mask(params))
    for e in range(2):
      key = jax.random.fold_in(algorithms.client_key(7, r, 0), e)
      central, _ = epoch(central, key, jnp.asarray(images), jnp.asarray(labels))
    params = central.params
  _assert_trees_close(state.params, params)
  assert not np.allclose(_leaves(params)[0], _leaves(variables["params"])[0])


def test_padding_and_group_size_do_not_change_a_round():
  images, labels = _dataset(300)
  parts = partition.partition(labels, "dirichlet", 5, seed=0, alpha=0.3, min_client_size=5)
  model, variables, tx = _setup()
  state = algorithms.init(algorithms.parse("fedavg"), variables, masks.MaskSpec(), local_epochs=1)
  # One by one (no vmap), and vmapped in groups of 2 (3 groups, the last with a padding client).
  (one, one_metrics), (grouped, grouped_metrics) = [
      _round(model, tx, parts, client_batch=b)(state, jnp.asarray(images), jnp.asarray(labels)) for b in (1, 2)]
  _assert_trees_close(one.params, grouped.params)
  np.testing.assert_allclose(one_metrics["loss"], grouped_metrics["loss"], rtol=1e-5)
  assert grouped_metrics["loss"].shape == (5,)
  # A client's update ignores how far its index row is padded (other clients' sizes).
  small, padded = client.pack(parts[:1]), client.pack([parts[0], np.arange(300)])
  outs = [jax.jit(client.make_local_update(model, tx, batch_size=32, local_epochs=1, max_size=d.max_size,
                                           mean=MEAN, std=STD))(state.params, {}, state.mask, state.hyper, d.indices[0],
                                                                d.sizes[0], jax.random.key(3), jnp.asarray(images),
                                                                jnp.asarray(labels))
          for d in (small, padded)]
  _assert_trees_close(outs[0][0], outs[1][0])


def test_fedprox_minimizes_the_proximal_objective_and_with_mu_zero_equals_fedavg():
  images, labels = _dataset(256)
  model, variables, tx = _setup(lr=0.1)
  mu = 0.5
  state = algorithms.init(algorithms.parse("fedprox"), variables, masks.MaskSpec(), local_epochs=1, prox_mu=mu)
  after, _ = _round(model, tx, [np.arange(256)])(state, jnp.asarray(images), jnp.asarray(labels))

  # Reference: plain gradient steps on loss + mu/2 ||w - w_global||^2, on the same batches.
  anchor = variables["params"]

  def objective(params, x, y):
    logits = model.apply({"params": params}, (x.astype(jnp.float32) / 255 - MEAN[0]) / STD[0], train=True)
    distance = sum(jnp.sum((p - a) ** 2) for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(anchor)))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + mu / 2 * distance

  @jax.jit
  def step(params, opt_state, x, y):
    updates, opt_state = tx.update(jax.grad(objective)(params, x, y), opt_state, params,
                                   fixed_mask=masks.no_mask(params))
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = anchor, tx.init(anchor)
  positions = client.epoch_positions(jax.random.fold_in(algorithms.client_key(0, 0, 0), 0), 256, 256, 32)
  for batch in np.asarray(positions):
    params, opt_state = step(params, opt_state, jnp.asarray(images[batch]), jnp.asarray(labels[batch]))
  _assert_trees_close(after.params, params, rtol=1e-4, atol=1e-5)

  parts = partition.partition(labels, "dirichlet", 4, seed=0, alpha=0.5, min_client_size=20)
  round_fn = _round(model, tx, parts, local_epochs=3)

  def global_after(name, mu):
    state = algorithms.init(algorithms.parse(name), variables, masks.MaskSpec(), local_epochs=3, prox_mu=mu)
    return round_fn(state, jnp.asarray(images), jnp.asarray(labels))[0].params

  fedavg, prox0, prox = global_after("fedavg", 0.5), global_after("fedprox", 0.0), global_after("fedprox", 0.5)
  _assert_trees_equal(fedavg, prox0)
  moved = lambda p: sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(_leaves(p), _leaves(anchor)))
  assert moved(prox) < 0.95 * moved(fedavg)


def test_fedpfn_never_moves_a_frozen_entry_on_any_client_nor_on_the_server():
  images, labels = _dataset(400)
  parts = partition.partition(labels, "dirichlet", 4, seed=0, alpha=0.5, min_client_size=20)
  model, variables, tx = _setup(lr=0.1)
  spec = masks.MaskSpec(fixed_fraction=0.5, seed=3)
  state = algorithms.init(algorithms.parse("fedpfn+prox+m"), variables, spec, local_epochs=2, prox_mu=0.1)
  assert 0.45 < masks.fraction_fixed(state.mask) < 0.55
  packed = client.pack(parts)
  update = jax.jit(jax.vmap(client.make_local_update(model, tx, batch_size=32, local_epochs=2,
                                                     max_size=packed.max_size, mean=MEAN, std=STD),
                            in_axes=(None, None, None, None, 0, 0, 0, None, None)))
  keys = jax.vmap(lambda c: algorithms.client_key(0, 0, c))(jnp.arange(4))
  client_params, _, _ = update(state.params, {}, state.mask, state.hyper, packed.indices, packed.sizes, keys,
                               jnp.asarray(images), jnp.asarray(labels))
  for before, after, fixed in zip(_leaves(variables["params"]), _leaves(client_params), _leaves(state.mask)):
    for k in range(4):
      np.testing.assert_array_equal(after[k][fixed].view(np.uint32), before[fixed].view(np.uint32))
      assert (after[k][~fixed] != before[~fixed]).mean() > 0.5
  # Rounds with server momentum keep the frozen entries bit-identical at the server too.
  round_fn = _round(model, tx, parts, local_epochs=2)
  for _ in range(2):
    state, _ = round_fn(state, jnp.asarray(images), jnp.asarray(labels))
  for before, after, fixed in zip(_leaves(variables["params"]), _leaves(state.params), _leaves(state.mask)):
    np.testing.assert_array_equal(after[fixed].view(np.uint32), before[fixed].view(np.uint32))
    assert (after[~fixed] != before[~fixed]).mean() > 0.5


def test_fedpnu_trains_with_the_round_s_redrawn_mask_then_with_its_reverse():
  images, labels = _dataset(256)
  model, variables, tx = _setup()
  spec = masks.MaskSpec(fixed_fraction=0.4, seed=5, redraw="every_round")
  state = algorithms.init(algorithms.parse("fedpnu"), variables, spec, local_epochs=2)
  assert int(state.hyper.reverse_epoch) == 1  # int(2 / 2)
  round_fn = _round(model, tx, [np.arange(256)], local_epochs=2, mask=spec)
  start, _ = round_fn(state, jnp.asarray(images), jnp.asarray(labels))  # round 0; round 1 is checked
  after, _ = round_fn(start, jnp.asarray(images), jnp.asarray(labels))
  mask = after.mask  # the mask of round 1
  assert not np.array_equal(_leaves(mask)[0], _leaves(start.mask)[0])

  epoch = jax.jit(train.make_epoch_fn(model, tx, batch_size=32, mean=MEAN, std=STD))
  central = train.init_train_state(tx, {"params": start.params}, mask)
  keys = [jax.random.fold_in(algorithms.client_key(0, 1, 0), e) for e in range(2)]
  half, _ = epoch(central, keys[0], jnp.asarray(images), jnp.asarray(labels))
  full, _ = epoch(half.replace(fixed=masks.reverse(mask)), keys[1], jnp.asarray(images), jnp.asarray(labels))
  _assert_trees_close(after.params, full.params)
  for begin, mid, end, fixed in zip(_leaves(start.params), _leaves(half.params), _leaves(full.params), _leaves(mask)):
    np.testing.assert_array_equal(mid[fixed], begin[fixed])  # first half: the mask holds
    np.testing.assert_array_equal(end[~fixed], mid[~fixed])  # second half: its reverse holds
    assert (end[fixed] != mid[fixed]).mean() > 0.5


@pytest.mark.parametrize("redraw", masks.REDRAWS)
def test_entries_frozen_in_a_round_keep_their_values_from_its_start_and_clients_are_sampled_each_round(redraw):
  # With one local epoch FedPFN holds the round's mask, FedPNU its reverse from the start
  # (int(1 / 2) = 0); all three algorithms share one compiled round.
  images, labels = _dataset(400)
  parts = partition.partition(labels, "iid", 8, seed=0)
  model, variables, tx = _setup()
  spec = masks.MaskSpec(fixed_fraction=0.4, seed=1, redraw=redraw)
  round_fn = _round(model, tx, parts, clients_per_round=3, sample_seed=4, mask=spec)
  states = {name: algorithms.init(algorithms.parse(name), variables, spec, local_epochs=1)
            for name in ("fedpfn", "fedpnu", "fedavg")}
  params_seen = {name: [_flat(variables["params"])] for name in states}  # at the start of each round, and after
  frozen_seen, clients_seen = {name: [] for name in states}, []
  for _ in range(2):
    for name, state in states.items():
      states[name], metrics = round_fn(state, jnp.asarray(images), jnp.asarray(labels))
      frozen = _flat(states[name].mask if name != "fedpnu" else masks.reverse(states[name].mask))
      start, end = params_seen[name][-1], _flat(states[name].params)
      np.testing.assert_array_equal(end[frozen].view(np.uint32), start[frozen].view(np.uint32))
      assert (end[~frozen] != start[~frozen]).mean() > 0.9
      params_seen[name].append(end)
      frozen_seen[name].append(frozen)
      if name == "fedpfn":
        clients_seen.append(np.asarray(metrics["clients"]))
      np.testing.assert_array_equal(metrics["clients"], clients_seen[-1])  # the same clients for every algorithm
  assert not any(frozen_seen["fedavg"][0])  # unmasked algorithms ignore the redraw
  for name in ("fedpfn", "fedpnu"):
    if redraw == "never":  # one mask: its frozen entries never leave their initial values
      assert np.array_equal(*frozen_seen[name])
      first, last = params_seen[name][0], params_seen[name][-1]
      np.testing.assert_array_equal(last[frozen_seen[name][0]].view(np.uint32),
                                    first[frozen_seen[name][0]].view(np.uint32))
    else:  # a new mask each round, and the entries it releases train again
      assert not np.array_equal(*frozen_seen[name])
      released = frozen_seen[name][0] & ~frozen_seen[name][1]
      assert released.sum() > 100 and (params_seen[name][2][released] != params_seen[name][1][released]).mean() > 0.9
  assert all(len(set(c)) == 3 and list(c) == sorted(c) for c in clients_seen)
  assert not np.array_equal(*clients_seen)
  sampling = algorithms.RoundSpec(batch_size=32, local_epochs=1, clients_per_round=3, sample_seed=4)
  np.testing.assert_array_equal(algorithms.clients_of_round(sampling, 8, jnp.int32(1)), clients_seen[1])


@pytest.mark.parametrize("name,error", [("fedsgd", "algorithm='fedsgd'"), ("fedpfn+momentum", "modifier"),
                                        ("fedpfn+prox+prox", "repeats"), ("fedadam+m", "SGD servers only"),
                                        ("fedavg@0.3", "only fedpfn and fedpnu"), ("fedpnu@1", "0 < ratio < 1"),
                                        ("fedpfn@0", "0 < ratio < 1"), ("fedpnu@3o%", "0 < ratio < 1"),
                                        ("fedpnu@", "0 < ratio < 1")])
def test_unknown_algorithms_and_bad_mask_ratios_are_clear_errors(name, error):
  with pytest.raises(ConfigError, match=error):
    algorithms.parse(name)


def test_an_algorithm_s_own_mask_ratio_is_the_one_its_clients_hold():
  images, labels = _dataset(64)
  model, variables, tx = _setup()
  spec = algorithms.RoundSpec(batch_size=32, local_epochs=1, clients_per_round=1,
                              mask=masks.MaskSpec(fixed_fraction=0.4, redraw="every_round"))
  plain, own = algorithms.parse("fedpnu"), algorithms.parse("fedpfn+prox@0.8")
  assert (plain.fixed_fraction, own.fixed_fraction, own.prox) == (None, 0.8, True)
  assert own.label(spec.mask) == "FedPFN+prox (mask ratio 0.8, redrawn every round)"
  assert plain.label(masks.MaskSpec()) == "FedPNU (mask ratio 0.4, never redrawn)"
  assert algorithms.parse("fedavgm").label(spec.mask) == "FedAvgM"
  # A mask drawn once lives in the state, so algorithms that differ only in ratio share a round.
  never = dataclasses.replace(spec, mask=masks.MaskSpec(fixed_fraction=0.4))
  assert never.for_algorithm(own) == never.for_algorithm(plain) == never != spec.for_algorithm(own)
  state = algorithms.init(own, variables, spec.mask, local_epochs=1)
  assert abs(masks.fraction_fixed(state.mask) - 0.8) < 0.05
  # A mask redrawn every round is redrawn at the algorithm's ratio.
  state, _ = algorithms.make_round(model, tx, client.pack([np.arange(64)]), spec.for_algorithm(own), mean=MEAN,
                                   std=STD)(state, jnp.asarray(images), jnp.asarray(labels))
  assert abs(masks.fraction_fixed(state.mask) - 0.8) < 0.05
  assert not np.array_equal(_leaves(state.mask)[0], _leaves(own.mask_spec(spec.mask).draw(variables["params"]))[0])


# --- the server optimizer -----------------------------------------------------------------


def _server_state(name, **server):
  params = {"layer": {"kernel": jnp.asarray([[0.5, -1.0, 2.0], [0.0, 0.25, -0.75]], jnp.float32),
                      "bias": jnp.asarray([0.1, -0.2, 0.3], jnp.float32)}}
  return algorithms.init(algorithms.parse(name), {"params": params}, masks.MaskSpec(), local_epochs=1,
                         server=algorithms.ServerHyper(**server))


# Two rounds' weighted mean client updates (client params - global params), f32-exact values.
MEAN_UPDATES = [{"layer": {"kernel": np.asarray([[0.01, -0.02, 0.0], [0.5, -0.125, 0.03]], np.float32),
                           "bias": np.asarray([-0.004, 0.0, 0.25], np.float32)}},
                {"layer": {"kernel": np.asarray([[-0.03, -0.01, 0.002], [0.25, 0.0625, -0.5]], np.float32),
                           "bias": np.asarray([0.008, 0.0, -0.0625], np.float32)}}]


def test_fedadam_server_step_equals_a_hand_computed_adam_step():
  lr, b1, b2, eps = 0.03, 0.8, 0.95, 1e-3
  state = _server_state("fedadam", adaptive_learning_rate=lr, b1=b1, b2=b2, eps=eps, learning_rate=5.0)
  step = jax.jit(algorithms.server_step)
  params = jax.tree.map(lambda p: np.asarray(p, np.float64), state.params)
  m = v = jax.tree.map(np.zeros_like, params)
  for t, update in enumerate(MEAN_UPDATES, start=1):
    state = step(state, update)
    g = jax.tree.map(lambda u: -np.asarray(u, np.float64), update)  # the pseudo-gradient
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g**2, v, g)
    params = jax.tree.map(lambda p, m, v: p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps), params, m, v)
    _assert_trees_close(state.params, params, rtol=1e-6, atol=1e-7)
  assert int(state.opt_state[0].count) == 2
  # A zero pseudo-gradient entry never moves (frozen entries stay frozen under FedAdam too).
  assert float(state.params["layer"]["bias"][1]) == np.float32(-0.2)


def test_fedavg_and_fedavgm_server_steps_are_the_plain_arithmetic_bit_for_bit():
  fedavg, fedavgm = _server_state("fedavg"), _server_state("fedavgm", learning_rate=0.7, momentum=0.9)
  step = jax.jit(algorithms.server_step)
  params, velocity = jax.tree.map(np.asarray, fedavg.params), jax.tree.map(np.zeros_like, MEAN_UPDATES[0])
  momentum_params = params
  for update in MEAN_UPDATES:
    fedavg, fedavgm = step(fedavg, update), step(fedavgm, update)
    params = jax.tree.map(np.add, params, update)  # FedAvg: the weighted mean of the clients' params
    velocity = jax.tree.map(lambda v, u: np.float32(0.9) * v + u, velocity, update)
    momentum_params = jax.tree.map(lambda p, v: p + np.float32(0.7) * v, momentum_params, velocity)
    _assert_trees_equal(fedavg.params, params)
    _assert_trees_equal(fedavgm.params, momentum_params)


def test_the_server_state_is_typed_and_continues_exactly_after_a_checkpoint(tmp_path):
  images, labels = _dataset(200)
  model, variables, tx = _setup()
  round_fn = _round(model, tx, partition.partition(labels, "iid", 3, seed=0), lr_decay=0.5)
  states = {name: algorithms.init(algorithms.parse(name), variables, masks.MaskSpec(), local_epochs=1)
            for name in ("fedavg", "fedavgm", "fedadam", "fedyogi")}
  for name, state in states.items():
    assert isinstance(state.hyper, algorithms.ClientHyper) and isinstance(state.server, algorithms.ServerHyper)
    assert state.optimizer == {"fedadam": "adam", "fedyogi": "yogi"}.get(name, "sgd")
    assert [x.dtype for x in jax.tree.leaves(state.hyper)] == [jnp.float32, jnp.int32, jnp.bool_, jnp.float32]
    assert state.server.momentum == np.float32(0.9 if name == "fedavgm" else 0.0)
  # FedAvg and FedAvgM share one server program: the same state structure.
  assert jax.tree.structure(states["fedavg"]) == jax.tree.structure(states["fedavgm"])
  adam = states["fedadam"]
  assert jax.tree.structure(adam.opt_state[0].mu) == jax.tree.structure(adam.params)
  for _ in range(2):
    adam, _ = round_fn(adam, jnp.asarray(images), jnp.asarray(labels))
  assert jax.tree.structure(adam) == jax.tree.structure(states["fedadam"])
  assert float(adam.hyper.lr_scale) == 0.5 and int(adam.round) == 2 and int(adam.opt_state[0].count) == 2
  # A restored state (the experiment's resume) continues bit for bit.
  saved = checkpoints.StepCheckpoints(tmp_path / "ckpt")
  saved.save(2, adam, {})
  saved.wait()
  restored, _ = saved.restore(2, states["fedadam"])
  saved.close()
  _assert_trees_equal(restored, adam)
  after, restored_after = (round_fn(jax.tree.map(jnp.asarray, s), jnp.asarray(images), jnp.asarray(labels))[0]
                           for s in (adam, restored))
  _assert_trees_equal(restored_after, after)
  assert not np.array_equal(_leaves(after.params)[0], _leaves(adam.params)[0])


# --- the experiment -----------------------------------------------------------------------


def _config(**overrides):
  config = loader.apply_preset(loader.defaults("fed"), "quick")
  config.model.name, config.model.depth, config.model.width = "mlp", 1, 32
  config.num_train, config.num_test = 600, 300
  config.algorithms = "fedavg,fedpfn+m"
  config.num_rounds, config.checkpoint.every = 3, 2
  config.update(overrides)
  return config


def test_fed_run_writes_plots_and_summary_and_refuses_to_clobber(tmp_path, capsys):
  # Preempted and resumed runs: tests/test_preemption.py.
  config = _config(algorithms="fedavg,fedpfn+m@0.6,fedpnu@0.2")
  workdir = str(tmp_path / "run")
  results = fed.run(config, workdir)
  for png in ("accuracy.png", "label_distribution.png"):
    assert os.path.getsize(os.path.join(workdir, png)) > 1000
  with open(os.path.join(workdir, "results.json")) as f:
    summary = {row["algorithm"]: row for row in json.load(f)["summary"]}
  assert list(summary) == ["fedavg", "fedpfn+m@0.6", "fedpnu@0.2"]
  assert 10 < summary["fedavg"]["final_accuracy"] <= 100 and "mask_ratio" not in summary["fedavg"]
  # One row per ratio, each saying which mask it ran under.
  assert [(row["mask_ratio"], row["mask_redraw"]) for row in list(summary.values())[1:]] == [(0.6, "never"),
                                                                                             (0.2, "never")]
  assert "FedPNU (mask ratio 0.2, never redrawn)" in capsys.readouterr().out
  assert [h["round"] for h in results["history"]["fedavg"]] == list(range(1, config.num_rounds + 1))
  with pytest.raises(ConfigError, match="results.json"):
    fed.run(config, workdir)
  # An unfinished run resumes under a new algorithm list or reporting keys, not under a new prox_mu.
  saved = json.loads(json.dumps(config.to_dict()))
  assert not workdir_lib.changed_keys(saved, _config(algorithms="fedavg", final_rounds=1).to_dict(),
                                      fed.RESUMABLE_CHANGES)
  assert workdir_lib.changed_keys(saved, _config(prox_mu=0.5).to_dict(), fed.RESUMABLE_CHANGES) == ["prox_mu"]


def test_report_averages_fed_runs_over_seeds_and_refuses_to_mix_them_with_lmc_runs(tmp_path):
  runs = {seed: fed.run(_config(num_rounds=2, init_seed=seed, data_seed=seed), str(tmp_path / f"seed{seed}"))
          for seed in (0, 1)}
  workdirs = [str(tmp_path / f"seed{seed}") for seed in runs]
  combined = report.combine(workdirs)
  assert combined["keys"] == []  # seeds are replicates, not settings
  for name in ("fedavg", "fedpfn+m"):
    (row,) = [r for r in combined["summary"] if r["variant"] == name]
    finals = [next(s["final_accuracy"] for s in r["summary"] if s["algorithm"] == name) for r in runs.values()]
    assert row["n"] == 2 and row["seeds"] == [0, 1] and finals[0] != finals[1]
    assert row["final_accuracy"] == pytest.approx(np.mean(finals))
    assert row["final_accuracy_std"] == pytest.approx(np.std(finals, ddof=1))
    fedavg = [next(s["final_accuracy"] for s in r["summary"] if s["algorithm"] == "fedavg") for r in runs.values()]
    assert row["gain_vs_fedavg_pp"] == pytest.approx(np.mean(np.subtract(finals, fedavg)))  # paired by seed
    curve = combined["rounds"][row["label"]]
    accuracies = np.array([[100 * h["test_accuracy"] for h in r["history"][name]] for r in runs.values()])
    assert curve["round"] == [1, 2] and curve["n"] == 2
    np.testing.assert_allclose(curve["test_accuracy"], accuracies.mean(0), rtol=1e-6)
    np.testing.assert_allclose(curve["test_accuracy_std"], accuracies.std(0, ddof=1), rtol=1e-6)
  table = report.write_report(combined, str(tmp_path / "report"))
  assert "final acc %" in table and "vs FedAvg pp" in table and "FedAvg" in table
  assert os.path.getsize(tmp_path / "report" / "report.png") > 1000

  lmc_dir = tmp_path / "lmc_run"
  lmc_dir.mkdir()
  (lmc_dir / "results.json").write_text(json.dumps({"config": {"experiment": "lmc"}, "summary": []}))
  with pytest.raises(TnaError, match="fed, lmc"):
    report.combine([workdirs[0], str(lmc_dir)])


def test_a_diverging_algorithm_names_the_command_that_finishes_the_others(tmp_path):
  workdir = str(tmp_path / "run")
  overrides = dict(prox_mu=1e30, local_epochs=3, num_rounds=2)  # the proximal step overflows
  with pytest.raises(DivergedError, match="fedprox is not finite at round 1.*--config.algorithms=fedavg$"):
    fed.run(_config(algorithms="fedavg,fedprox", **overrides), workdir)
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  results = fed.run(_config(algorithms="fedavg", **overrides), workdir)  # as the message says
  assert [row["algorithm"] for row in results["summary"]] == ["fedavg"]
  assert all(np.isfinite(row["final_accuracy"]) for row in results["summary"])


def test_bad_config_values_are_clear_errors_before_anything_is_written(tmp_path):
  bad_server = ml_collections.ConfigDict({**loader.defaults("fed").server.to_dict(), "b2": 1.0})
  for overrides, match in ((dict(algorithms="fedavg,fedbogus"), "fedbogus"),
                           (dict(client_fraction=0.0), "client_fraction=0.0"),
                           (dict(num_rounds=0), "num_rounds=0 must be >= 1"),
                           (dict(algorithms="fedavg,fedpnu@1.5"), "fedpnu@1.5.*0 < ratio < 1"),
                           (dict(server=bad_server), "server.b2=1.0 is out of range")):
    with pytest.raises(ConfigError, match=match):
      fed.run(_config(**overrides), str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad")


def test_a_round_sharded_over_devices_equals_the_single_device_round():
  script = """
import jax, jax.numpy as jnp, numpy as np, ml_collections
from tna_jax.core import masks, models, optim, sharding
from tna_jax.federated import algorithms, client, partition
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (300, 8, 8, 1), dtype=np.uint8)
labels = images.reshape(300, -1)[:, :10].argmax(1).astype(np.int32)
parts = partition.partition(labels, "dirichlet", 6, seed=0, alpha=0.5, min_client_size=5)
model = models.get_model(ml_collections.ConfigDict(dict(name="mlp", depth=1, width=16)), 10)
variables = models.init_variables(model, jax.random.key(0), (8, 8, 1))
tx = optim.make_optimizer(ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.05, momentum=0.9)), 100)
spec = algorithms.RoundSpec(batch_size=16, local_epochs=1, clients_per_round=6)
state = algorithms.init(algorithms.parse("fedpfn"), variables, masks.MaskSpec(), local_epochs=1)
mesh = sharding.make_mesh(6, 16)
assert mesh.shape[sharding.MODELS] == 2 and mesh.shape[sharding.DATA] == 2, mesh.shape
out = []
for m in (None, mesh):
  s, _ = algorithms.make_round(model, tx, client.pack(parts), spec, mean=(0.5,), std=(0.29,), mesh=m)(
      state, jnp.asarray(images), jnp.asarray(labels))
  out.append(jax.tree.leaves(s.params))
for a, b in zip(*out):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
print("OK")
"""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
