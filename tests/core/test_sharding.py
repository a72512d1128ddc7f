"""One code path on any mesh: 8 fake CPU devices and two processes joined by jax.distributed
train the same models as one device.

The device count is fixed when JAX starts, so each mesh trains in a subprocess that runs
this file as a script (`python tests/test_sharding.py OUT_DIR MODELS_AXIS`).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tna_jax.core import sharding
from tna_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPOCHS, BATCH, NUM_TRAIN = 2, 32, 250  # 250 rows: the dataset is padded on 4 and 8 devices


def train_tiny(out_dir: str, models_axis: int) -> None:
  """Trains a vanilla and a TNA-PFN MLP together and saves them (run in a subprocess)."""
  sharding.initialize_distributed()  # joins the other process when the environment says so
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from tna_jax.core import train  # pylint: disable=g-import-not-at-top
  from tna_jax.core import data, masks, models, optim
  from tna_jax.runs import checkpoints, reporting

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (NUM_TRAIN, 6, 6, 1), dtype=np.uint8)
  labels = images.reshape(NUM_TRAIN, -1)[:, :4].argmax(1).astype(np.int32)
  dataset = data.Dataset(name="synthetic", train_images=images, train_labels=labels, test_images=images[:90],
                         test_labels=labels[:90], num_classes=4, mean=(0.5,), std=(0.29,))
  model = models.get_model(ml_collections.ConfigDict(dict(name="mlp", depth=2, width=24)), 4)
  opt = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4))
  tx = optim.make_optimizer(opt, EPOCHS * (NUM_TRAIN // BATCH))
  mesh = sharding.make_mesh(num_models=2, batch_size=BATCH, models_axis=models_axis)

  def init():
    variables = models.init_variables(model, jax.random.key(0), dataset.image_shape)
    mask = masks.fixed_mask(variables["params"], 0.4, seed=1)
    return train.stack([train.init_train_state(tx, variables, masks.no_mask(variables["params"])),
                        train.init_train_state(tx, variables, mask)])

  states = train.create_states(init, mesh)
  states, history = train.fit(model, tx, states, [3, 4], dataset, num_epochs=EPOCHS, batch_size=BATCH,
                              eval_batch_size=50, progress=False, mesh=mesh)
  checkpoints.save(os.path.join(out_dir, "models"), states.variables)
  reporting.write_json(os.path.join(out_dir, f"run_{jax.process_index()}.json"), {
      "mesh": dict(mesh.shape), "devices": jax.device_count(), "processes": jax.process_count(),
      "history": history})


def _launch(command, devices=1, processes=1):
  """Runs `command` in `processes` fresh processes with `devices` CPU devices each, joined by
  jax.distributed on a free loopback port when there are several; returns their outputs."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  if processes > 1:
    with socket.socket() as s:  # a free loopback port for the coordinator
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
               TNA_DISTRIBUTED_TIMEOUT="60")
  procs = [subprocess.Popen(command, cwd=REPO, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(processes)]
  try:
    outputs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (stdout, stderr) in zip(procs, outputs):
    assert p.returncode == 0, (stdout + stderr)[-3000:]
  return outputs


def _run(out_dir, models_axis=1, devices=1, processes=1):
  """Runs `train_tiny` in `processes` fresh processes with `devices` CPU devices each."""
  _launch([sys.executable, os.path.abspath(__file__), str(out_dir), str(models_axis)], devices, processes)
  from tna_jax.runs import checkpoints  # pylint: disable=g-import-not-at-top
  with open(os.path.join(out_dir, "run_0.json")) as f:
    return json.load(f), checkpoints.restore(os.path.join(out_dir, "models"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  return _run(tmp_path_factory.mktemp("one_device"))


def _assert_same_training(run, reference):
  (info, variables), (ref_info, ref_variables) = run, reference
  flat, ref_flat = (sorted(_leaves(v)) for v in (variables, ref_variables))
  assert [k for k, _ in flat] == [k for k, _ in ref_flat]
  for (path, a), (_, b) in zip(flat, ref_flat):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=path)
  for record, ref_record in zip(info["history"], ref_info["history"]):
    for key in ("train_loss", "test_loss", "test_accuracy"):
      np.testing.assert_allclose(record[key], ref_record[key], rtol=1e-4, atol=1e-5, err_msg=key)


def _leaves(tree, prefix=""):
  if isinstance(tree, dict):
    return [leaf for k, v in tree.items() for leaf in _leaves(v, f"{prefix}/{k}")]
  return [(prefix, np.asarray(tree))]


def test_reference_run_trains_two_distinct_models(single):
  info, variables = single
  assert info["devices"] == 1 and info["mesh"] == {"models": 1, "data": 1}
  kernel = variables["params"]["fc1"]["kernel"]
  assert kernel.shape[0] == 2 and not np.allclose(kernel[0], kernel[1])
  assert info["history"][-1]["train_loss"][0] < info["history"][0]["train_loss"][0]


@pytest.mark.parametrize("models_axis, mesh", [(1, {"models": 1, "data": 8}), (2, {"models": 2, "data": 4})])
def test_eight_fake_devices_train_like_one(tmp_path, single, models_axis, mesh):
  run = _run(tmp_path, models_axis=models_axis, devices=8)
  assert run[0]["devices"] == 8 and run[0]["mesh"] == mesh
  _assert_same_training(run, single)


def test_two_processes_on_loopback_train_like_one(tmp_path, single):
  run = _run(tmp_path, models_axis=2, devices=2, processes=2)
  assert run[0]["processes"] == 2 and run[0]["devices"] == 4 and run[0]["mesh"] == {"models": 2, "data": 2}
  assert not (tmp_path / "run_1.json").exists(), "only process 0 writes"
  _assert_same_training(run, single)


def test_main_on_two_processes_prints_the_table_and_writes_the_results_once(tmp_path):
  workdir = tmp_path / "run"
  outputs = _launch([sys.executable, "-m", "tna_jax.main", "--config=configs/fmnist_mlp.py:quick",
                     f"--workdir={workdir}", "--config.num_train=512", "--config.num_test=200",
                     "--config.model.depth=1", "--config.model.width=32", "--config.lmc.num_alphas=3",
                     "--config.variants=vanilla,tna"], processes=2)
  (stdout_0, stderr_0), (stdout_1, stderr_1) = outputs
  assert "loss barrier" in stdout_0 and "train:" in stderr_0  # the table and the progress bar
  # Process 1 prints nothing of its own (native libraries such as Gloo may still log).
  assert "loss barrier" not in stdout_1 and "Results" not in stdout_1 and "train:" not in stderr_1
  results = json.loads((workdir / "results.json").read_text())
  assert results["models"] == ["vanilla_0", "vanilla_1", "tna_0", "tna_1"]
  assert (workdir / "lmc_curves.png").exists() and (workdir / "checkpoints" / "tna_1").exists()


def test_mesh_shape_prefers_models_then_fits_the_batch():
  assert sharding.mesh_shape(1, 6) == (1, 1)
  assert sharding.mesh_shape(8, 6) == (2, 4)
  assert sharding.mesh_shape(8, 8) == (8, 1)
  assert sharding.mesh_shape(8, 3, batch_size=64) == (1, 8)
  assert sharding.mesh_shape(8, 4, batch_size=10) == (4, 2)  # the batch fits 2 data devices, not 8
  assert sharding.mesh_shape(8, 2, models_axis=1) == (1, 8)
  with pytest.raises(ConfigError, match="batch_size=10 .* multiple of 8"):
    sharding.mesh_shape(8, 3, batch_size=10)
  with pytest.raises(ConfigError, match="models_axis=3"):
    sharding.mesh_shape(8, 6, models_axis=3)


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"TNA_DISTRIBUTED": "1"}, True),
    ({"TNA_DISTRIBUTED": "off", "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, False),
])
def test_distributed_starts_only_when_asked(env, expected):
  assert sharding.wants_distributed("auto", env) is expected
  assert sharding.wants_distributed("on", env) and not sharding.wants_distributed("off", env)


def test_bad_distributed_values_are_config_errors():
  with pytest.raises(ConfigError, match="distributed='maybe'.*auto, on, off"):
    sharding.wants_distributed("maybe", {})
  with pytest.raises(ConfigError, match="TNA_DISTRIBUTED='2'"):
    sharding.wants_distributed("auto", {"TNA_DISTRIBUTED": "2"})


if __name__ == "__main__":
  train_tiny(sys.argv[1], int(sys.argv[2]))
