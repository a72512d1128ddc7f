"""What the SPMD partitioner puts between devices, read from the compiled HLO.

The training epoch (`train.make_train_epochs`) and the LMC curve (`lmc._curve`, what
`lmc.lmc_curve` runs) of a tiny MLP are compiled for 8 fake CPU devices on the meshes
(models=2, data=4) and (models=1, data=8); their collectives come from `tna_jax.core.hlo`.
Per training step there must be one gradient all-reduce over 'data' of exactly one model's
gradient plus the batch's two metric scalars, no parameter all-gather anywhere, and
per-device memory must fall when the models axis grows. Two programs broken on purpose
show that the checks catch what they are for.

The device count is fixed when JAX starts, so one subprocess (this file run as a script)
compiles every program and writes its HLO text and memory statistics; the checks run here.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tna_jax.core import hlo

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICES, NUM_MODELS, BATCH, NUM_TRAIN = 8, 2, 32, 256
IMAGE, WIDTH, CLASSES = (6, 6, 1), 24, 10  # MLP 36-24-24-10
NUM_ALPHAS, EVAL_BATCH = 4, 32
# Programs compiled by `compile_programs`: name -> (models axis, what).
PROGRAMS = {
    "train_m2": (2, "train"),  # the models vmapped and spread over 'models' (the accelerator layout)
    "train_m1": (1, "train"),  # one models device: the CPU default, models one after another
    "train_m1_vmapped": (1, "train_vmapped"),  # one models device, vmapped (the accelerator default)
    "lmc_m2": (2, "lmc"),
    "lmc_m1": (1, "lmc"),
    # Broken on purpose: models one after another although 'models' spreads them, which
    # gathers every model's parameters onto every device before the loop.
    "bad_gather_models": (2, "train_sequential"),
    # Broken on purpose: each update sharded over 'data' (an FSDP-like layout the step was not
    # written for), which all-gathers the parameters over 'data' inside every step.
    "bad_gather_in_step": (2, "train_sharded_updates"),
}
METRIC_BYTES = 2 * 4  # the batch's loss and accuracy sums (f32 each) ride in the gradient all-reduce
# The batch comes from the dataset split by rows over 'data' (`sharding.shard_rows`): the
# partitioner fetches it with an all-reduce of the whole global batch (each device fills in
# the rows it holds) plus all-gathers of the indices and, when 'models' is split, permutes
# between model rows. All of it is integer data of the size of one batch, whatever the
# model; allowed up to this multiple of (images + labels + indices) of one global batch.
BATCH_TRAFFIC_ALLOWANCE = 2.0


def compile_programs(out_dir: str) -> None:
  """Compiles every program of PROGRAMS on 8 fake devices; writes NAME.hlo and info.json."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from tna_jax.alignment import interpolation
  from tna_jax.core import evaluate, execution, masks, models, optim, sharding, train

  assert jax.device_count() == DEVICES, jax.devices()
  model = models.get_model(ml_collections.ConfigDict(dict(name="mlp", depth=2, width=WIDTH)), CLASSES)
  variables = models.init_variables(model, jax.random.key(0), IMAGE)
  base_tx = optim.make_optimizer(ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.05, momentum=0.9,
                                                                weight_decay=5e-4)), 100)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (NUM_TRAIN,) + IMAGE, dtype=np.uint8)
  labels = rng.integers(0, CLASSES, NUM_TRAIN).astype(np.int32)
  info = {"params": {"/".join(str(k.key) for k in path): list(leaf.shape)
                     for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}}
  for name, (models_axis, what) in PROGRAMS.items():
    mesh = sharding.make_mesh(num_models=NUM_MODELS, batch_size=BATCH, models_axis=models_axis)
    if what == "lmc":
      replicated = sharding.named(mesh)
      va, vb = (sharding.put(models.init_variables(model, jax.random.key(s), IMAGE), replicated) for s in (0, 1))
      alphas = sharding.put(np.linspace(0, 1, NUM_ALPHAS, dtype=np.float32), sharding.named(mesh, sharding.MODELS))
      batches = sharding.put(evaluate.make_batches(images[:3 * EVAL_BATCH], labels[:3 * EVAL_BATCH], EVAL_BATCH),
                             sharding.named(mesh, None, sharding.DATA))
      lowered = interpolation._curve.lower(model, "raw", False, 0, va, vb, alphas, batches, (0.5,), (0.25,), None)  # pylint: disable=protected-access
    else:
      tx = base_tx
      if what == "train_sharded_updates":
        tx = optax.chain(base_tx, _shard_updates_over_data(mesh))
      policy = execution.policy(mesh)
      if what in ("train_vmapped", "train_sequential"):  # the way the mesh would not choose
        policy = dataclasses.replace(policy, sequential=what == "train_sequential")
      epochs = train.make_train_epochs(model, tx, mesh, batch_size=BATCH, mean=(0.5,), std=(0.25,),
                                       num_examples=NUM_TRAIN, policy=policy)

      def init(tx=tx):
        mask = masks.fixed_mask(variables["params"], 0.4, seed=1)
        return train.stack([train.init_train_state(tx, variables, mask)] * NUM_MODELS)

      states = train.create_states(init, mesh)
      seeds = sharding.put(np.arange(NUM_MODELS, dtype=np.int32), sharding.named(mesh, sharding.MODELS))
      lowered = epochs.lower(states, seeds, 0, sharding.shard_rows(images, mesh), sharding.shard_rows(labels, mesh))
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    info[name] = {"mesh": dict(mesh.shape), "data_groups": np.arange(DEVICES).reshape(mesh.devices.shape).tolist(),
                  "bytes_per_device": memory.argument_size_in_bytes + memory.output_size_in_bytes
                                      - memory.alias_size_in_bytes + memory.temp_size_in_bytes}
    with open(os.path.join(out_dir, f"{name}.hlo"), "w") as f:
      f.write(compiled.as_text())
  with open(os.path.join(out_dir, "info.json"), "w") as f:
    json.dump(info, f)


def _shard_updates_over_data(mesh):
  """An optax stage that shards every update's last axis over 'data' (the bad program)."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from tna_jax.core import sharding  # pylint: disable=g-import-not-at-top

  def update(updates, state, params=None, **extra):
    del params, extra
    spec = lambda u: [None] * (u.ndim - 1) + [sharding.DATA]
    return jax.tree.map(lambda u: sharding.constrain(u, mesh, *spec(u)), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
  out = tmp_path_factory.mktemp("hlo")
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  result = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  info = json.loads((out / "info.json").read_text())
  programs = {name: hlo.Program((out / f"{name}.hlo").read_text()) for name in PROGRAMS}
  return info, programs


# ---------------------------------------------------------------------------------------
# The checker.


def data_groups(info: dict) -> tuple[tuple[int, ...], ...]:
  """Device groups along 'data' (rows of the mesh, in the program's device numbering)."""
  return tuple(sorted(tuple(row) for row in info["data_groups"]))


def is_float(shape: str) -> bool:
  return any(dtype[0] in "fbc" for dtype, _ in hlo.shape_dims(shape))


def gathered_parameters(collective: hlo.Collective, param_shapes: dict[str, list[int]]) -> set[str]:
  """The parameters an all-gather may assemble: those whose shape its float result ends with
  (unit dims dropped, a leading models axis allowed; either order for matrices; each dim
  possibly padded up to a multiple of the group size). Of several, the highest rank wins
  (a [2, 24, 10] result is the head's kernel, not its bias); equal shapes all count."""
  if collective.kind != "all-gather" or not is_float(collective.result_shape):
    return set()
  group = max((len(g) for g in collective.groups), default=DEVICES)
  matches = set()
  for dims in collective.result_dims:
    dims = [d for d in dims if d != 1]
    for path, shape in param_shapes.items():
      for candidate in {tuple(shape), tuple(reversed(shape))}:
        tail = dims[len(dims) - len(candidate):] if len(dims) >= len(candidate) else []
        if tail and all(p <= d < p + group for d, p in zip(tail, candidate)):
          matches.add((len(shape), path))
  rank = max((r for r, _ in matches), default=0)
  return {path for r, path in matches if r == rank}


def all_gathered_parameters(collectives: list[hlo.Collective], param_shapes) -> set[str]:
  return set().union(*(gathered_parameters(c, param_shapes) for c in collectives))


def step_collectives(program: hlo.Program) -> list[hlo.Collective]:
  """Collectives of the innermost loop that holds any (the training step, the batch loop)."""
  collectives = program.collectives()
  depth = max(c.loop_depth for c in collectives)
  assert depth > 0, "no collective inside a loop"
  return [c for c in collectives if c.loop_depth == depth]


def problems(program: hlo.Program, info: dict, step_float_bytes: int, batches_per_step: int = 1) -> list[str]:
  """What is wrong with a program's communication; [] for a good one.

  Anywhere: no all-gather of a parameter. Per step: every float collective is an all-reduce
  over 'data', together `step_float_bytes` (the gradient and the metrics); integer traffic
  (the batch) stays within BATCH_TRAFFIC_ALLOWANCE of the step's `batches_per_step` global
  batches (one per model the step trains at once).
  """
  found = []
  for c in program.collectives():
    paths = gathered_parameters(c, info["params"])
    if paths:
      found.append(f"all-gather of parameter {' or '.join(sorted(paths))}: {c.name} {c.result_shape} over {c.groups}")
  step = step_collectives(program)
  floats = [c for c in step if is_float(c.result_shape)]
  for c in floats:
    if c.kind != "all-reduce" or c.groups != data_groups(info):
      found.append(f"float {c.kind} {c.name} over {c.groups} inside the step (only all-reduces over 'data')")
  float_bytes = sum(c.operand_bytes for c in floats if c.kind == "all-reduce")
  if float_bytes != step_float_bytes:
    found.append(f"step all-reduces {float_bytes} float bytes, expected {step_float_bytes}")
  batch_bytes = batches_per_step * BATCH * (math.prod(IMAGE) + 4 + 4)  # uint8 images, int32 labels and indices
  integer_bytes = sum(c.result_bytes for c in step if not is_float(c.result_shape))
  if integer_bytes > BATCH_TRAFFIC_ALLOWANCE * batch_bytes:
    found.append(f"step moves {integer_bytes} bytes of integer (batch) data, over "
                 f"{BATCH_TRAFFIC_ALLOWANCE} x {batch_bytes}")
  return found


def gradient_bytes(info: dict) -> int:
  return 4 * sum(math.prod(shape) for shape in info["params"].values())


# ---------------------------------------------------------------------------------------
# The tests.


@pytest.mark.parametrize("name, models_per_step", [("train_m2", 1), ("train_m1", 1), ("train_m1_vmapped", 2)])
def test_training_step_all_reduces_one_gradient_over_data_and_gathers_no_parameter(compiled, name, models_per_step):
  # models_per_step: the models of a device that one step trains at once (1 where they run
  # one after another or where 'models' gives each device one model; 2 when both are vmapped).
  info, programs = compiled
  expected = models_per_step * (gradient_bytes(info) + METRIC_BYTES)
  assert problems(programs[name], info[name] | info, expected, models_per_step) == []
  step = step_collectives(programs[name])
  gradient = [c for c in step if is_float(c.result_shape)]
  assert len(gradient) == 1 and gradient[0].kind == "all-reduce"  # one combined all-reduce per step
  local_models = NUM_MODELS // info[name]["mesh"]["models"]
  assert gradient[0].runs == NUM_TRAIN // BATCH * local_models // models_per_step


@pytest.mark.parametrize("name", ["lmc_m2", "lmc_m1"])
def test_lmc_curve_reduces_only_the_metric_sums_over_data(compiled, name):
  info, programs = compiled
  local_alphas = NUM_ALPHAS // info[name]["mesh"]["models"]  # the alphas are vmapped and split over 'models'
  assert problems(programs[name], info[name] | info, METRIC_BYTES * local_alphas) == []
  assert not [c for c in programs[name].collectives() if c.kind != "all-reduce"]


def test_per_device_memory_falls_as_the_models_axis_grows(compiled):
  info, _ = compiled
  for spread, whole in (("train_m2", "train_m1"), ("train_m2", "train_m1_vmapped"), ("lmc_m2", "lmc_m1")):
    assert info[spread]["bytes_per_device"] < info[whole]["bytes_per_device"], (spread, whole)
  # Gathering the models onto every device (the first bad program) costs the memory back.
  assert info["bad_gather_models"]["bytes_per_device"] > info["train_m2"]["bytes_per_device"]


def test_the_checker_flags_a_parameter_all_gather_across_models(compiled):
  info, programs = compiled
  program = programs["bad_gather_models"]
  found = problems(program, info["bad_gather_models"] | info, gradient_bytes(info) + METRIC_BYTES)
  assert any(line.startswith("all-gather of parameter") for line in found), found
  assert all_gathered_parameters(program.collectives(), info["params"]) == set(info["params"]), found  # every parameter, stacked over the models


def test_the_checker_flags_a_parameter_all_gather_inside_the_step(compiled):
  info, programs = compiled
  program = programs["bad_gather_in_step"]
  found = problems(program, info["bad_gather_in_step"] | info, gradient_bytes(info) + METRIC_BYTES)
  assert any("inside the step" in line for line in found), found
  assert all_gathered_parameters(step_collectives(program), info["params"]) == set(info["params"]), found  # the head's padded [24, 12] and [12] included


def test_hlo_reads_every_replica_group_format():
  explicit = "replica_groups={{0,2},{1,3}}, to_apply=%add"
  iota = "replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}"
  mesh = "replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, use_global_device_ids=true"
  with_ids = "replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, to_apply=%add"
  sub_axis = "replica_groups=mesh['a'=8] {'a':(2)2}"
  assert hlo.replica_groups(explicit) == hlo.replica_groups(iota) == hlo.replica_groups(mesh) == ((0, 2), (1, 3))
  assert hlo.replica_groups(with_ids) == ((0, 1, 2, 3), (4, 5, 6, 7))
  assert hlo.replica_groups(sub_axis) == ((0, 2), (1, 3), (4, 6), (5, 7))
  assert hlo.shape_bytes("(f32[24,36]{1,0}, u8[2,3], pred[], bf16[4])") == 24 * 36 * 4 + 6 + 1 + 8


if __name__ == "__main__":
  compile_programs(sys.argv[1])
