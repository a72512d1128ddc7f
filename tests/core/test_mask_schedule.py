"""Mask ratio schedules: the fraction per step, nested masks in one seeded release order, released
entries that start from their initial values, constant = today's runs, and the CLI."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tna_jax.config import loader, schema
from tna_jax.core import data, mask_schedule, masks, models, optim, sharding, train
from tna_jax.errors import ConfigError
from tna_jax.experiments import sweep
from tna_jax.federated import algorithms, client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 24  # updates of the trajectory fixture: 3 epochs of 8 batches


def _fraction(kind, start, final, end, t):
  """The schedule by hand, in float64."""
  p = min(t, end) / end
  return {"constant": start, "linear": start + (final - start) * p,
          "cosine": final + (start - final) * (1 + math.cos(math.pi * p)) / 2,
          "step": start if t < end else final}[kind]


@pytest.mark.parametrize("kind", mask_schedule.SCHEDULES)
def test_the_fraction_follows_the_schedule_and_starts_and_ends_exactly(kind):
  fraction = jax.jit(mask_schedule.fraction_at)
  index = mask_schedule.SCHEDULES.index(kind)
  got = [float(fraction(index, 0.6, 0.1, 10, t)) for t in range(14)]
  np.testing.assert_allclose(got, [_fraction(kind, 0.6, 0.1, 10, t) for t in range(14)], atol=1e-6)
  assert got[0] == np.float32(0.6) and (kind == "constant" or got[-1] == np.float32(0.1))
  assert all(a >= b for a, b in zip(got, got[1:]))  # never fixes an entry again
  assert fraction._cache_size() == 1  # the step is data: one compiled function for every step


def _model_and_data(n=512):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
  labels = images.reshape(n, -1)[:, :10].argmax(1).astype(np.int32)
  dataset = data.Dataset(name="synthetic", train_images=images, train_labels=labels, test_images=images[:100],
                         test_labels=labels[:100], num_classes=10, mean=(0.5,), std=(0.29,))
  model = models.get_model(ml_collections.ConfigDict(dict(name="mlp", depth=1, width=16)), 10)
  return model, models.init_variables(model, jax.random.key(0), (8, 8, 1)), dataset


def _assert_bits_equal(a, b):
  np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def _tx():
  opt = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4))
  return optim.make_optimizer(opt, STEPS)


def test_the_release_order_is_seeded_per_leaf_and_the_initial_mask_is_an_exact_fraction():
  _, variables, _ = _model_and_data()
  params = variables["params"]
  spec = masks.MaskSpec(fixed_fraction=0.6, seed=3)
  position = mask_schedule.positions(params, spec)
  for leaf, u in zip(jax.tree.leaves(params), jax.tree.leaves(position)):  # a permutation of (rank + 1/2) / n
    np.testing.assert_allclose(np.sort(np.asarray(u).ravel()), (np.arange(leaf.size) + 0.5) / leaf.size, rtol=1e-6)
  again = mask_schedule.positions(jax.tree.map(jnp.zeros_like, params), spec)  # only seed and paths count
  jax.tree.map(np.testing.assert_array_equal, position, again)
  other = mask_schedule.positions(params, masks.MaskSpec(fixed_fraction=0.6, seed=4))
  assert not np.array_equal(position["fc1"]["kernel"], other["fc1"]["kernel"])
  fixed, release = mask_schedule.Schedule("linear").start(params, spec, 10)
  for leaf, m in zip(jax.tree.leaves(params), jax.tree.leaves(fixed)):
    assert int(np.sum(m)) == math.ceil(0.6 * leaf.size - 0.5)  # round(0.6 n), ties down
  assert int(release.end) == 10 and int(release.step) == 0
  # Neuron granularity ranks whole output units; include/exclude leave other leaves out.
  neurons = mask_schedule.positions(params, masks.MaskSpec(granularity="neuron", include="fc1", seed=3))
  kernel = np.asarray(neurons["fc1"]["kernel"])
  assert (kernel == kernel[:1]).all() and np.array_equal(kernel[0], np.asarray(neurons["fc1"]["bias"]))
  assert (np.asarray(neurons["head"]["kernel"]) == 1).all()  # not eligible: never below any fraction


@pytest.fixture(scope="module")
def trajectory():
  """A linear schedule 0.75 -> 0.1 ending at 3/4 of training: every step's mask and params."""
  model, variables, dataset = _model_and_data()
  tx = _tx()
  spec = masks.MaskSpec(fixed_fraction=0.75, seed=1)
  schedule = mask_schedule.Schedule("linear", final_fraction=0.1, end=0.75)
  fixed, release = schedule.start(variables["params"], spec, STEPS)
  state = train.init_train_state(tx, variables, fixed, release)
  step = jax.jit(lambda state, images, labels: train.train_step(model, tx, state, images, labels))
  images = data.normalize(jnp.asarray(dataset.train_images), dataset.mean, dataset.std)
  masks_seen, params_seen, traces = [], [variables["params"]], []
  for t in range(STEPS):
    batch = slice(64 * (t % 8), 64 * (t % 8 + 1))
    state, _ = step(state, images[batch], jnp.asarray(dataset.train_labels[batch]))
    masks_seen.append(jax.device_get(state.fixed))
    params_seen.append(jax.device_get(state.params))
    traces.append(jax.device_get(optax.tree_utils.tree_get(state.opt_state, "trace")))
  return dict(model=model, variables=variables, dataset=dataset, tx=tx, fixed=fixed, release=release, step=step,
              masks=masks_seen, params=params_seen, traces=traces, end=schedule.end_step(STEPS))


def test_masks_over_steps_are_nested_and_follow_the_schedule_within_one_entry_per_leaf(trajectory):
  assert trajectory["end"] == 18
  previous = trajectory["fixed"]
  for t, mask in enumerate(trajectory["masks"]):
    wanted = _fraction("linear", 0.75, 0.1, trajectory["end"], t)
    for before, now in zip(jax.tree.leaves(previous), jax.tree.leaves(mask)):
      before, now = np.asarray(before), np.asarray(now)
      assert not (now & ~before).any(), f"step {t} fixed an entry again"
      assert abs(now.sum() - wanted * now.size) <= 1, (t, now.sum(), wanted * now.size)
    previous = mask
  assert trajectory["step"]._cache_size() == 1  # one compiled step for every step of the schedule


def test_an_entry_released_at_step_s_keeps_its_initial_value_until_s_and_moves_after(trajectory):
  init, fixed = trajectory["params"][0], trajectory["fixed"]
  moved_after_release = []
  for path_index, (m0, *per_step) in enumerate(zip(jax.tree.leaves(fixed), *map(jax.tree.leaves,
                                                                               trajectory["masks"]))):
    values = [np.asarray(jax.tree.leaves(p)[path_index]) for p in trajectory["params"]]
    m0, per_step = np.asarray(m0), np.asarray(per_step)
    # release[e] = the first update whose mask no longer holds e (STEPS: never released).
    released_at = np.where(m0, np.argmin(np.concatenate([per_step, np.zeros_like(per_step[:1])]), axis=0), -1)
    for s in range(STEPS):
      entries = released_at == s
      for t in range(s + 1):  # params after t updates: updates 0 .. s-1 held the entry fixed
        _assert_bits_equal(values[t][entries], values[0][entries])
      moved_after_release.append(values[STEPS][entries] != values[0][entries])
    still = released_at == STEPS
    _assert_bits_equal(values[STEPS][still], values[0][still])
  moved = np.concatenate(moved_after_release)
  assert moved.size > 500 and moved.mean() > 0.9  # released entries train (bar ReLU-dead units)


def test_a_released_entry_starts_with_fresh_momentum_while_the_others_keep_theirs():
  tx = optim.make_optimizer(ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, momentum=0.9)), 10)
  params, g0, g1 = jnp.zeros(2), jnp.array([1.0, 2.0]), jnp.array([3.0, 5.0])
  fixed = jnp.array([True, False])
  update0, state = tx.update(g0, tx.init(params), params, fixed_mask=fixed)
  state = mask_schedule.zero_fixed_state(tx, state, fixed)
  update1, _ = tx.update(g1, state, params, fixed_mask=jnp.array([False, False]))  # entry 0 released
  np.testing.assert_allclose(update0, [0.0, -0.1 * 2.0])
  np.testing.assert_allclose(update1, [-0.1 * 3.0, -0.1 * (5.0 + 0.9 * 2.0)], rtol=1e-6)


def test_fixed_entries_hold_no_momentum_in_a_scheduled_run(trajectory):
  for mask, trace in zip(trajectory["masks"], trajectory["traces"]):
    for m, v in zip(jax.tree.leaves(mask), jax.tree.leaves(trace)):
      assert m.any() and not np.asarray(v)[np.asarray(m)].any()
  assert any(np.asarray(v).any() for v in jax.tree.leaves(trajectory["traces"][-1]))


def test_one_compiled_epoch_scan_trains_constant_and_scheduled_models_and_constant_is_bit_identical(trajectory):
  model, variables, dataset, tx = (trajectory[k] for k in ("model", "variables", "dataset", "tx"))
  params = variables["params"]
  bernoulli = masks.fixed_mask(params, 0.4, seed=1)
  today = [train.init_train_state(tx, variables, masks.no_mask(params)),
           train.init_train_state(tx, variables, bernoulli)]
  scheduled = mask_schedule.with_releases([(variables, masks.no_mask(params), None), (variables, bernoulli, None),
                                           (variables, trajectory["fixed"], trajectory["release"])])
  assert mask_schedule.with_releases([(variables, bernoulli, None)])[0][2] is None  # no schedule: today's state
  train_epochs = train.make_train_epochs(model, tx, sharding.make_mesh(devices=jax.devices()[:1]), batch_size=64,
                                         mean=dataset.mean, std=dataset.std, num_examples=len(dataset.train_labels))

  def fit(states):
    args = (train.stack(states), jnp.full(len(states), 5, jnp.int32), 0, jnp.asarray(dataset.train_images),
            jnp.asarray(dataset.train_labels))
    compiled = train_epochs.lower(*args).compile()  # one program, whatever the step: the step count is data
    states = args[0]
    for epoch in range(STEPS // 8):
      states, _ = compiled(states, args[1], epoch, *args[3:])
    return states

  together = fit([train.init_train_state(tx, *start) for start in scheduled])
  alone = fit(today)
  for k in range(2):  # vanilla and constant TNA-PFN in the scheduled program train as they do today
    jax.tree.map(_assert_bits_equal, train.unstack(together.params, k), train.unstack(alone.params, k))
  final = train.unstack(together, 2)
  assert int(final.release.step) == STEPS  # the step count ran inside the scan: the last mask is step 23's
  jax.tree.map(np.testing.assert_array_equal, final.fixed, trajectory["masks"][-1])


def test_a_config_without_the_schedule_keys_is_constant_and_gives_today_s_training_start():
  config = loader.apply_preset(loader.defaults("lmc"), "quick")
  assert mask_schedule.Schedule.from_config(config.mask) == mask_schedule.Schedule()
  bare = ml_collections.ConfigDict({k: v for k, v in config.mask.items()
                                    if k not in ("schedule", "final_fraction", "schedule_end")})
  assert mask_schedule.Schedule.from_config(bare) == mask_schedule.Schedule()
  _, variables, _ = _model_and_data()
  spec = masks.MaskSpec.from_config(config.mask)
  for variant in [v for v in masks.TRAINING_VARIANTS if v != "sigma_asym"]:  # sigma_asym needs its FiGLU MLP
    start = mask_schedule.training_start(variant, variables, spec, 0.4, mask_schedule.Schedule(), STEPS)
    today = masks.training_start(variant, variables, spec, 0.4)
    assert start[2] is None
    jax.tree.map(np.testing.assert_array_equal, start[:2], today)


def test_fed_schedules_over_rounds_and_every_client_holds_the_round_s_mask():
  model, variables, _ = _model_and_data()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (128, 8, 8, 1), dtype=np.uint8)
  labels = images.reshape(128, -1)[:, :10].argmax(1).astype(np.int32)
  tx = _tx()
  spec = algorithms.RoundSpec(batch_size=32, local_epochs=1, clients_per_round=2)
  round_fn = algorithms.make_round(model, tx, client.pack([np.arange(64), np.arange(64, 128)]), spec, mean=(0.5,),
                                   std=(0.29,))
  schedule = mask_schedule.Schedule("cosine", final_fraction=0.0, end=0.75)
  states = {name: algorithms.init(algorithms.parse(name), variables, masks.MaskSpec(fixed_fraction=0.5), local_epochs=1,
                                  schedule=schedule, num_rounds=4) for name in ("fedavg", "fedpfn")}
  init = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(variables["params"])])
  flat = lambda tree: np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])
  held = flat(states["fedpfn"].mask)
  assert held.mean() == pytest.approx(0.5, abs=0.01)
  for r in range(4):
    for name in states:
      states[name], _ = round_fn(states[name], jnp.asarray(images), jnp.asarray(labels))
    mask = flat(states["fedpfn"].mask)
    assert not (mask & ~held).any() and abs(mask.mean() - _fraction("cosine", 0.5, 0.0, 3, r)) < 0.01
    np.testing.assert_array_equal(flat(states["fedpfn"].params)[mask], init[mask])  # held this round and before
    held = mask
    assert not flat(states["fedavg"].mask).any()
  assert not held.any() and (flat(states["fedpfn"].params) != init).mean() > 0.9
  assert "cosine to 0 % by 75 % of training" in algorithms.parse("fedpfn").label(masks.MaskSpec(), schedule)


@pytest.mark.parametrize("overrides,message", [
    ({"mask.final_fraction": 0.5}, "mask.final_fraction=0.5 is above mask.fixed_fraction=0.4"),
    ({"mask.schedule": "step", "mask.schedule_end": 1.0}, "nothing would be released"),
])
def test_a_schedule_that_would_fix_entries_again_or_release_none_is_refused(overrides, message):
  config = loader.apply_preset(loader.defaults("lmc"), "quick")
  config.mask.schedule = "linear"
  for key, value in overrides.items():
    config.mask[key.split(".")[1]] = value
  with pytest.raises(ConfigError, match=message):
    schema.validate(config)
  fed_config = loader.apply_preset(loader.defaults("fed"), "quick")
  fed_config.mask.schedule, fed_config.algorithms = "linear", "fedavg,fedpnu@0.3"
  fed_config.mask.final_fraction = 0.35
  with pytest.raises(ConfigError, match="above fedpnu@0.3's mask ratio 0.3"):
    schema.validate(fed_config)


def test_a_sweep_trains_schedules_as_an_axis_in_one_program_and_constant_ignores_schedule_end(tmp_path):
  config = loader.apply_preset(loader.defaults("sweep"), "quick")
  config.num_train, config.num_test, config.model.depth, config.model.width = 512, 200, 1, 16
  config.variants, config.mask.fixed_fraction, config.sweep.seeds, config.lmc.bn_modes = "vanilla,tna", 0.5, 1, "raw"
  config.sweep.grid = "mask.schedule=constant,linear; mask.schedule_end=0.5,1"
  results = sweep.run(config, str(tmp_path))
  # vanilla, constant TNA-PFN (either schedule_end), linear ending at 0.5 and at 1: 4 distinct pairs.
  assert results["programs"] == 1 and results["models"] == 4 * config.num_models
  by = {(r["mask.schedule"], r["mask.schedule_end"], r["variant"]): r for r in results["rows"]}
  assert by[("constant", 0.5, "tna")]["accuracy_a"] == by[("constant", 1.0, "tna")]["accuracy_a"]
  assert by[("linear", 0.5, "tna")]["accuracy_a"] != by[("linear", 1.0, "tna")]["accuracy_a"]
  assert by[("linear", 0.5, "vanilla")]["accuracy_a"] == by[("constant", 1.0, "vanilla")]["accuracy_a"]
  assert by[("linear", 0.5, "tna")]["label"] == "TNA-PFN (50 % fixed, linear to 0 % by 50 % of training)"
  assert by[("constant", 0.5, "tna")]["label"] == "TNA-PFN (50 % fixed)"


def _main(config, workdir, *flags):
  cmd = [sys.executable, "-m", "tna_jax.main", f"--config={config}", f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("config,flags", [
    ("configs/fmnist_mlp.py:quick", ["--config.mask.schedule=linear", "--config.mask.fixed_fraction=0.6",
                                     "--config.num_train=512", "--config.num_test=200", "--config.model.depth=1",
                                     "--config.model.width=32", "--config.lmc.num_alphas=3",
                                     "--config.lmc.bn_modes=raw"]),
    # fed: FedAvg beside a scheduled FedPFN is test_fed_schedules_over_rounds_and_every_client_holds_the_round_s_mask.
    ("configs/default_fed.py:quick", ["--config.mask.schedule=cosine", "--config.algorithms=fedpfn",
                                      "--config.num_test=200", "--config.model.name=mlp", "--config.model.width=32"]),
])
def test_each_experiment_runs_a_schedule_through_main(tmp_path, config, flags):
  result = _main(config, tmp_path / "run", *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  if "fed" in config:
    assert results["summary"][0]["mask_schedule"] == "cosine"
    assert "FedPFN (mask ratio 0.4, cosine to 0 % by 100 % of training" in result.stdout
  else:
    assert {row["variant"] for row in results["summary"]} == {"vanilla", "tna", "pruning"}


def test_a_final_fraction_out_of_range_is_one_line_and_exit_2(tmp_path):
  result = _main("configs/fmnist_mlp.py:quick", tmp_path / "run", "--config.mask.final_fraction=1.5")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: mask.final_fraction=1.5 is out of range; allowed: 0 <= mask.final_fraction < 1."]
  assert not (tmp_path / "run").exists()
