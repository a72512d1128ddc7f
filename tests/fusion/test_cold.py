"""ColD fusion: one contributor and one round is plain fine-tuning; masks hold across
contributors and rounds; unseen tasks never enter the average; the experiment end to end."""

import json
import os
import subprocess
import sys

import chex
import jax
import ml_collections
import numpy as np
import pytest

from tna_jax.config import loader
from tna_jax.core import data, masks, models, optim, sharding, train
from tna_jax.errors import ConfigError, DataNotFoundError
from tna_jax.experiments import cold as cold_experiment
from tna_jax.fusion import cold_fusion, tasks
from tna_jax.runs import metric_writer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEAN, STD = (0.5,), (0.29,)
EPOCHS, BATCH = 2, 32


def _source(n=2600, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 6, 6, 1), dtype=np.uint8)
  labels = (images.reshape(n, -1)[:, :6].argmax(1)).astype(np.int32)  # 6 learnable classes
  return data.Dataset("synthetic", images[:2400], labels[:2400], images[2400:], labels[2400:], 6, MEAN, STD)


def _setup(specs, contributes, fixed_fraction=0.0, n=128):
  source = _source()
  relabeled = []
  for i, spec in enumerate(specs):
    own = tasks.train_range(source, 600 * i, 600, "test")
    task = tasks.relabel(own, tasks.parse_groups(spec, 6), name=spec)
    relabeled.append(tasks.train_range(task, 0, n, "test"))
  stacked = cold_fusion.stack_tasks(relabeled, contributes, 100)
  model = models.get_model(ml_collections.ConfigDict(dict(name="mlp", depth=1, width=16)), max(stacked.num_classes))
  variables = models.init_variables(model, jax.random.key(0), source.image_shape)
  fixed = masks.fixed_mask(variables["params"], fixed_fraction, seed=1)
  heads = train.stack([cold_fusion.task_head(model, t, source.image_shape, k) for t, k in enumerate(stacked.num_classes)])
  opt = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4))
  tx = optim.make_optimizer(opt, 100)
  return relabeled, stacked, model, variables, fixed, heads, tx


def _fusion(stacked, model, variables, fixed, heads, tx, rounds, num_variants=1, on_round=None, mesh=None):
  return cold_fusion.cold_fusion(model, tx, train.stack([variables] * num_variants), heads,
                          train.stack([fixed] * num_variants), stacked, rounds=rounds, epochs=EPOCHS,
                          batch_size=BATCH, data_seeds=[10 + t for t in range(len(stacked.names))], mesh=mesh,
                          on_round=on_round, progress=False)


def _two_variants_two_tasks(out_path: str, mesh=None) -> dict:
  """One masked fusion round of 2 variants x 2 tasks, saved as accuracy and fused params."""
  _, stacked, model, variables, fixed, heads, tx = _setup(["0/1/2", "3/4/5"], [True, True], fixed_fraction=0.4)
  accuracy, bases = _fusion(stacked, model, variables, fixed, heads, tx, rounds=1, num_variants=2, mesh=mesh)
  flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(bases[1])}
  np.savez(out_path, accuracy=accuracy, devices=jax.device_count(), **flat)
  return dict(np.load(out_path))


def test_one_contributor_and_one_round_is_plain_fine_tuning():
  relabeled, stacked, model, variables, fixed, heads, tx = _setup(["0/1/2"], [True])
  accuracy, bases = _fusion(stacked, model, variables, fixed, heads, tx, rounds=1)
  start = {**variables, "params": {**variables["params"], "head": train.unstack(heads, 0)}}
  plain, history = train.fit(model, tx, train.stack([train.init_train_state(tx, start, fixed)]), [10], relabeled[0],
                             num_epochs=EPOCHS, batch_size=BATCH, eval_batch_size=100, progress=False)
  fused = train.unstack(bases[1], 0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), fused,
               train.unstack(plain.variables, 0))
  assert accuracy[0, 0, 0] == pytest.approx(history[-1]["test_accuracy"][0], abs=1e-6)
  assert accuracy.shape == (2, 1, 1)


def test_masked_contributors_keep_the_base_entries_in_every_round():
  specs = ["0/1/2", "3/4/5", "0+1/2+3/4+5", "0/5"]
  _, stacked, model, variables, fixed, heads, tx = _setup(specs, [True, True, True, False], fixed_fraction=0.4)
  seen = []
  _, bases = _fusion(stacked, model, variables, fixed, heads, tx, rounds=2, num_variants=2,
                     on_round=lambda r, states, metrics, bases: seen.append((r, states.params, metrics["accuracy"])))
  assert [r for r, _, _ in seen] == [0, 1, 2]
  body = lambda tree: {k: v for k, v in tree.items() if k != "head"}
  flat = lambda tree: jax.tree.leaves(body(tree))
  for r, params, acc in seen:
    assert acc.shape == (2, 4) and np.all(acc > 0.2)
    for m in range(2 * len(specs)):  # every variant and contributor
      for p0, p1, f in zip(flat(variables["params"]), flat(train.unstack(params, m)), flat(fixed)):
        p0, p1, f = np.asarray(p0), np.asarray(p1), np.asarray(f)
        np.testing.assert_array_equal(p0[f].view(np.uint32), p1[f].view(np.uint32))
        assert (p0[~f] != p1[~f]).mean() > 0.5
  for base in bases[1:]:  # the fused bases too, bit for bit
    for p0, p1, f in zip(flat(variables["params"]), flat(train.unstack(base, 1)["params"]), flat(fixed)):
      np.testing.assert_array_equal(np.asarray(p0)[np.asarray(f)], np.asarray(p1)[np.asarray(f)])
  # Absent classes of the 2-class task stay switched off: its head's extra bias never moves.
  two_class_bias = np.asarray(train.unstack(seen[-1][1], 3)["head"]["bias"])
  assert np.all(two_class_bias[2:] < -1e8)


def test_unseen_tasks_do_not_enter_the_fused_base():
  specs = ["0/1/2", "3/4/5"]
  _, with_unseen, model, variables, fixed, heads, tx = _setup(specs + ["0+1/2+3/4+5"], [True, True, False])
  _, without, _, _, _, heads_without, _ = _setup(specs, [True, True])
  _, bases_a = _fusion(with_unseen, model, variables, fixed, heads, tx, rounds=1)
  _, bases_b = _fusion(without, model, variables, fixed, heads_without, tx, rounds=1)
  body = lambda b: {k: v for k, v in train.unstack(b, 0)["params"].items() if k != "head"}
  chex.assert_trees_all_close(body(bases_a[1]), body(bases_b[1]), rtol=1e-5, atol=1e-6)
  assert not np.allclose(body(bases_a[1])["fc1"]["kernel"], variables["params"]["fc1"]["kernel"])


def test_two_fake_devices_fuse_like_one(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  out = str(tmp_path / "two_devices.npz")
  done = subprocess.run([sys.executable, os.path.abspath(__file__), out], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
  two = dict(np.load(out))
  one = _two_variants_two_tasks(str(tmp_path / "one_device.npz"), sharding.make_mesh(devices=jax.devices()[:1]))
  assert two.pop("devices") == 2 and one.pop("devices") >= 1
  assert sorted(two) == sorted(one) and two["accuracy"].shape == (2, 2, 2)
  for key in one:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_image_tasks_use_disjoint_examples_of_their_classes():
  config = loader.defaults("cold")
  config.cold.update(tasks="0/1,2+3/4", unseen_tasks="5/6/7", examples_per_task=50, start=100)
  source = data.load_dataset("fashion_mnist", num_train=2000, num_test=100)
  made = cold_experiment.image_tasks(config, source)
  assert [t.num_classes for t in made] == [2, 2, 3]
  rows = [{r.tobytes() for r in t.train_images} for t in made]
  assert all(len(r) == 50 for r in rows) and not (rows[0] & rows[1]) and not (rows[1] & rows[2])
  assert set(made[1].test_labels.tolist()) == {0, 1} and len(made[1].test_labels) > 0
  config.cold.examples_per_task = 1900
  with pytest.raises(ConfigError, match="only .* training examples of its classes"):
    cold_experiment.image_tasks(config, source)


def test_cold_experiment_writes_results(tmp_path, capsys):
  config = loader.apply_preset(loader.defaults("cold"), "quick")
  config.model = ml_collections.ConfigDict(dict(name="mlp", depth=1, width=16))  # compiles fast
  config.base.source = "init"
  config.cold.update(tasks="0/1/2,3/4/5", unseen_tasks="6/7", examples_per_task=128, rounds=1)
  config.num_test, config.batch_size, config.eval_batch_size = 200, 64, 200
  cold_experiment.run(config, str(tmp_path))
  out = capsys.readouterr().out
  for text in ("r0", "r1", "gain r1-r0", "mean (contributor)", "unseen", "vanilla", "tna"):
    assert text in out
  saved = json.loads((tmp_path / "results.json").read_text())
  assert set(saved["accuracy"]) == {"vanilla", "tna"}
  assert all(len(per_round) == 2 for per_round in saved["accuracy"]["tna"].values())
  assert [t["role"] for t in saved["tasks"]] == ["contributor", "contributor", "unseen"]
  assert (tmp_path / "cold.png").stat().st_size > 10_000
  assert (tmp_path / "checkpoints" / "tna_round1").is_dir()
  records = metric_writer.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["phase"], r["step"], r["round"]) for r in records] == [("fusion", 1, 0), ("fusion", 2, 1)]
  assert len(records[1]["models"]) == 3
  np.testing.assert_allclose(records[1]["accuracy_tna"], [saved["accuracy"]["tna"][n][1] for n in records[1]["models"]])
  assert any((tmp_path / "tensorboard").iterdir()), "TensorBoard event file missing"


@pytest.mark.parametrize("overrides,match", [
    ({"dataset": "glue"}, "glue needs model.name='text_transformer'"),
    ({"cold.tasks": "0/1,0+x"}, "not '\\+'-separated class numbers"),
    ({"cold.examples_per_task": 10}, "smaller than batch_size"),
    ({"cold.rounds": -1}, "cold.rounds=-1 must be >= 0"),
])
def test_bad_cold_configs_are_named(overrides, match):
  config = loader.defaults("cold")
  for key, value in overrides.items():
    parent, _, leaf = key.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
  with pytest.raises(ConfigError, match=match):
    cold_experiment.validate(config)


def test_glue_with_data_missing_is_a_clear_error(tmp_path):
  config = loader.defaults("cold")
  config.dataset, config.data_dir, config.base.source = "glue", str(tmp_path), "init"
  config.model.name = "text_transformer"
  config.cold.update(tasks="sst2", unseen_tasks="")
  with pytest.raises(DataNotFoundError, match="GLUE task sst2 .*not prepared.*tfds build glue/sst2"):
    cold_experiment.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


if __name__ == "__main__":  # the 2-device side of test_two_fake_devices_fuse_like_one
  _two_variants_two_tasks(sys.argv[1])
