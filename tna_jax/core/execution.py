"""How this run's work is laid out on its devices: every "CPU or accelerator" decision, made once.

The same programs run on a laptop CPU, a GPU host and a TPU pod; only the way stacked work
is executed differs, and always for speed, never for the numbers (beyond float rounding):

- K models (or alphas, or soup ingredients) one after another (`lax.map`) or vmapped. A
  vmapped convolution over stacked weights becomes a grouped convolution, which XLA:CPU
  runs far slower than K plain ones, and batching gains nothing on a compute-bound CPU
  (BENCHMARKS.md); on accelerators, and on a mesh that spreads the models over several
  devices, vmap is the way (`tna_jax.core.stacking`).
- Convolutions inside loops rewritten into the one layout XLA:CPU runs fast there
  (`tna_jax.core.conv_layout`); every layout is already fast on accelerators.
- LMC alphas evaluated at once (`lmc.alpha_chunk` 0): all on accelerators, one at a time on CPU.
- Federated clients trained side by side (`client_batch` 0): all on accelerators, one at a
  time on CPU, where a vmapped client's masked-out steps would still cost their work.
- The linear-assignment solver of `matching.solver='auto'`: scipy on the host on CPU, where
  it is faster, optax's Hungarian algorithm on the device elsewhere.

`policy(mesh)` derives all of it from the mesh's devices, and the policy is passed to the
functions that act on it. No other module asks JAX which backend it runs on for these
choices. The policy is a frozen dataclass, so a compiled function can take it as a static
argument, and a benchmark or test can force one choice with `dataclasses.replace`.
"""

import dataclasses
from typing import Callable

import jax

from tna_jax.core import conv_layout, sharding


@dataclasses.dataclass(frozen=True)
class ExecutionPolicy:
  """The execution choices for one platform and mesh (see the module docstring)."""

  platform: str  # 'cpu', 'gpu' or 'tpu'
  sequential: bool  # stacked models one after another (lax.map) instead of vmapped
  canonical_convolutions: bool  # rewrite convolutions into NHWC x HWIO -> NHWC (conv_layout)
  alpha_chunk: int  # what lmc.alpha_chunk=0 means: 0 = all alphas at once, 1 = one at a time
  client_batch: int  # what client_batch=0 means: 0 = all clients of a round at once, 1 = one at a time
  solver: str  # what matching.solver='auto' means: 'scipy' or 'hungarian'

  def convolutions(self, fn: Callable) -> Callable:
    """`fn` with its convolutions in the layout this platform runs fast inside loops (a scan
    over steps, a round of local training): canonical on CPU, `fn` itself elsewhere."""
    return conv_layout.canonical_convolutions(fn) if self.canonical_convolutions else fn


def for_platform(platform: str, model_devices: int = 1) -> ExecutionPolicy:
  """The policy for devices of `platform` with the models spread over `model_devices` of them.

  Stacked models run one after another only on CPU with every model on one device: once the
  mesh spreads them over several devices, each device holds its own models and vmap splits them.
  """
  cpu = platform == "cpu"
  return ExecutionPolicy(platform=platform, sequential=cpu and model_devices == 1, canonical_convolutions=cpu,
                         alpha_chunk=1 if cpu else 0, client_batch=1 if cpu else 0,
                         solver="scipy" if cpu else "hungarian")


def policy(mesh: jax.sharding.Mesh | None = None) -> ExecutionPolicy:
  """The policy of `mesh` (a `sharding.make_mesh` mesh): its devices' platform and the size of
  its 'models' axis. Without a mesh, that of JAX's default backend with the models on one
  device, which is where work outside any mesh runs."""
  if mesh is None:
    return for_platform(jax.default_backend())
  return for_platform(mesh.devices.flat[0].platform, mesh.shape[sharding.MODELS])
