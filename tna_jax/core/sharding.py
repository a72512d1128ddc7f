"""Where arrays live: one mesh for 1 CPU, 1 GPU, 8 fake CPU devices or a multi-host TPU pod.

Every run builds a 2-D mesh with `jax.make_mesh`: axis 'models' spreads the K models that
train together and axis 'data' splits each batch. Model state is sharded on
'models' only (replicated along 'data', `P('models')`), batches and the on-device dataset
on 'data' (`P('data')`), and `jax.jit` inserts the gradient all-reduce. The same program
runs unchanged on one device, where both axes have size 1, which is why there is no second
code path (and no `pmap`).

Multi-host: `initialize_distributed` starts `jax.distributed` when asked, every process
runs the same program, `shard_rows` gives each process only the rows its devices hold,
`fetch` brings any result back to every process, and `is_writer` lets process 0 alone
write logs, JSON and plots.
"""

import os
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from tna_jax.errors import ConfigError, check_choice

PyTree = Any
MODELS, DATA = "models", "data"
DISTRIBUTED_MODES = ("auto", "on", "off")
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def wants_distributed(mode: str = "auto", environ: dict[str, str] | None = None) -> bool:
  """Whether this process is one of several that must join through `jax.distributed`.

  'on'/'off' decide; 'auto' follows $TNA_DISTRIBUTED when set, else starts only where the
  environment describes a multi-process job: $JAX_COORDINATOR_ADDRESS, Slurm with more
  than one task, Open MPI with more than one rank, or a TPU slice with several workers.
  A single process (the default everywhere else) never waits for peers.
  """
  check_choice("distributed", mode, DISTRIBUTED_MODES)
  env = os.environ if environ is None else environ
  if mode != "auto":
    return mode == "on"
  flag = env.get("TNA_DISTRIBUTED", "").strip().lower()
  if flag:
    if flag not in _ON + _OFF:
      raise ConfigError(f"TNA_DISTRIBUTED={flag!r} is not supported; allowed: {', '.join(_ON + _OFF)}.")
    return flag in _ON
  counts = (env.get("SLURM_NTASKS") if "SLURM_JOB_ID" in env else None, env.get("OMPI_COMM_WORLD_SIZE"))
  workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  return bool(env.get("JAX_COORDINATOR_ADDRESS")) or any(int(c or 1) > 1 for c in counts) or len(workers) > 1


def initialize_distributed(mode: str = "auto") -> bool:
  """Joins this process to the others with `jax.distributed.initialize()` if asked to.

  Must run before anything touches a device. JAX finds the coordinator by itself on TPU
  pods, Slurm and Open MPI; elsewhere set $JAX_COORDINATOR_ADDRESS (host:port of process
  0), $JAX_NUM_PROCESSES and $JAX_PROCESS_ID on every process. $TNA_DISTRIBUTED_TIMEOUT
  (seconds, default 300) bounds the wait for the others. Returns whether it joined.
  """
  if not wants_distributed(mode) or jax.distributed.is_initialized():
    return jax.distributed.is_initialized()
  ints = {arg: int(os.environ[var]) for arg, var in (("num_processes", "JAX_NUM_PROCESSES"),
                                                      ("process_id", "JAX_PROCESS_ID")) if var in os.environ}
  timeout = int(os.environ.get("TNA_DISTRIBUTED_TIMEOUT", "300"))
  jax.distributed.initialize(initialization_timeout=timeout, **ints)
  return True


def is_writer() -> bool:
  """True in the one process (index 0) that writes logs, results and plots."""
  return jax.process_index() == 0


def mesh_shape(num_devices: int, num_models: int = 1, batch_size: int | None = None,
               models_axis: int = 0) -> tuple[int, int]:
  """(models, data) axis sizes whose product is `num_devices`.

  models_axis=0 chooses: as many devices along 'models' as divide both `num_models` and
  the device count (models need no gradient exchange), the rest along 'data'; a model
  axis that would leave a data axis not dividing `batch_size` is shrunk.
  """
  if models_axis:
    if num_devices % models_axis or num_models % models_axis:
      raise ConfigError(f"models_axis={models_axis} must divide both the {num_devices} devices and the "
                        f"{num_models} models.")
    candidates = [models_axis]
  else:
    candidates = sorted((m for m in range(1, num_devices + 1) if num_devices % m == 0 and num_models % m == 0),
                        reverse=True)
  for models in candidates:
    data = num_devices // models
    if batch_size is None or batch_size % data == 0:
      return models, data
  raise ConfigError(f"batch_size={batch_size} cannot be split evenly over the {num_devices // candidates[-1]} "
                    f"devices of the data axis; allowed: a multiple of {num_devices // candidates[-1]}.")


def make_mesh(num_models: int = 1, batch_size: int | None = None, models_axis: int = 0,
              devices: list | None = None) -> Mesh:
  """The ('models', 'data') mesh over all devices of all processes (or `devices`).

  Axes are Auto so that jit's partitioner places whatever the explicit shardings leave
  open (a gather from the sharded dataset becomes a local gather and one all-reduce).
  """
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(len(devices), num_models, batch_size, models_axis)
  return jax.make_mesh(shape, (MODELS, DATA), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def named(mesh: Mesh, *spec) -> NamedSharding:
  """NamedSharding(mesh, P(*spec)); `named(mesh)` is replicated on every device."""
  return NamedSharding(mesh, P(*spec))


def constrain(x: PyTree, mesh: Mesh | None, *spec) -> PyTree:
  """with_sharding_constraint inside jit; a no-op without a mesh (plain single-device use)."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, named(mesh, *spec))


def put(tree: PyTree, sharding: NamedSharding | Callable[[Any], NamedSharding]) -> PyTree:
  """Global arrays with `sharding` from values that every process holds identically.

  Works across processes (each builds only its own devices' pieces with
  `make_array_from_callback`); leaves already placed that way are kept as they are.
  `sharding` may be a function of the leaf, for trees whose leaves differ in rank.
  """

  def place(x):
    target = sharding(x) if callable(sharding) else sharding
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

  return jax.tree.map(place, tree)


def shard_rows(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """`array` on the mesh, split by rows along 'data' (replicated along 'models').

  Rows are zero-padded to a multiple of the data axis; callers index only the real rows.
  Each process reads just the rows of its own devices from `array` (a memory map or a
  lazily loaded array is therefore read only in part).
  """
  data = mesh.shape[DATA]
  rows = array.shape[0]
  padded = (-(-rows // data) * data,) + array.shape[1:]

  def piece(index):
    start, stop, _ = index[0].indices(padded[0])
    out = np.zeros((stop - start,) + array.shape[1:], array.dtype)
    real = max(0, min(stop, rows) - start)
    out[:real] = array[start:start + real]
    return out[(slice(None),) + tuple(index[1:])]

  return jax.make_array_from_callback(padded, named(mesh, DATA), piece)


def fetch(tree: PyTree) -> PyTree:
  """Numpy copies of `tree` in every process, whichever devices of whichever process hold it.

  All processes must call it together when a leaf spans devices of several processes.
  """

  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """`tree` copied onto every device of the mesh (one all-gather), readable by any process."""
  return jax.jit(lambda t: t, out_shardings=named(mesh))(tree)


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
