"""The execution policy: every CPU-or-accelerator choice made in one place, from the mesh."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tna_jax.alignment import interpolation, matching
from tna_jax.config import loader
from tna_jax.core import evaluate, execution
from tna_jax.experiments import fed

CPU_CHOICES = dict(sequential=True, canonical_convolutions=True, alpha_chunk=1, client_batch=1, solver="scipy")
ACCELERATOR_CHOICES = dict(sequential=False, canonical_convolutions=False, alpha_chunk=0, client_batch=0,
                           solver="hungarian")


def _choices(policy: execution.ExecutionPolicy) -> dict:
  return {key: getattr(policy, key) for key in CPU_CHOICES}


def test_a_cpu_mesh_runs_stacked_work_one_after_another_in_the_canonical_layout():
  assert jax.default_backend() == "cpu"
  mesh = jax.make_mesh((1, 1), ("models", "data"), devices=jax.devices()[:1])
  for policy in (execution.policy(), execution.policy(mesh), execution.for_platform("cpu")):
    assert policy.platform == "cpu"
    assert _choices(policy) == CPU_CHOICES
  # Models spread over several CPU devices: vmap splits them; the rest stays the CPU's.
  assert _choices(execution.for_platform("cpu", model_devices=2)) == {**CPU_CHOICES, "sequential": False}


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("model_devices", [1, 4])
def test_accelerators_vmap_everything_and_solve_on_the_device(platform, model_devices):
  assert _choices(execution.for_platform(platform, model_devices)) == ACCELERATOR_CHOICES


def test_the_convolution_layout_follows_the_platform():
  conv = lambda a, w: jax.lax.conv_general_dilated(a, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
  assert execution.for_platform("gpu").convolutions(conv) is conv
  a, w = jnp.ones((1, 2, 5, 5)), jnp.ones((3, 2, 3, 3))
  jaxpr = jax.make_jaxpr(execution.for_platform("cpu").convolutions(conv))(a, w)
  (eqn,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert tuple(eqn.params["dimension_numbers"]) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # NHWC x HWIO


def test_the_automatic_settings_take_the_policy_given():
  gpu = execution.for_platform("gpu")
  assert matching.resolve_solver("auto") == "scipy"
  assert matching.resolve_solver("auto", gpu) == "hungarian"
  assert matching.resolve_solver("scipy", gpu) == "scipy"  # an explicit solver stays
  config = loader.defaults("fed")
  assert config.client_batch == 0
  assert fed.round_spec(config, 20, execution.policy()).client_batch == 1
  assert fed.round_spec(config, 20, gpu).client_batch == 0
  config.client_batch = 3
  assert fed.round_spec(config, 20, gpu).client_batch == 3


def test_lmc_alpha_chunk_zero_maps_the_alphas_on_cpu_and_vmaps_them_on_accelerators():

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      del train
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  model = Tiny()
  images, labels = np.zeros((8, 2, 2, 1), np.uint8), np.zeros(8, np.int32)
  batches = evaluate.make_batches(images, labels, 4)
  va, vb = (model.init(jax.random.key(s), jnp.zeros((1, 2, 2, 1)), train=False) for s in (0, 1))
  alphas = jnp.linspace(0, 1, 3)

  def loops(policy):
    jaxpr = jax.make_jaxpr(lambda a, b: interpolation.lmc_curve(model, a, b, alphas, batches, (0.5,), (0.25,), policy=policy))
    return len(re.findall(r"\bscan\[", str(jaxpr(va, vb))))

  # One loop more on CPU: the map over the alphas around the scan over test batches.
  assert loops(execution.policy()) == loops(execution.for_platform("gpu")) + 1


def test_no_other_module_asks_which_backend_it_runs_on():
  # Allowed elsewhere: orbax's background saves (runtime) and the descriptions of the device in
  # benchmark results and FLOP counts, which choose nothing about how the work runs.
  allowed = {"default_backend(": {"core/execution.py", "runs/runtime.py"},
             ".platform": {"core/execution.py", "core/flops.py", "bench/core_figures.py", "bench/fed_round.py",
                           "bench/__main__.py"}}
  package = pathlib.Path(execution.__file__).parent.parent  # all of tna_jax
  for path in sorted(package.rglob("*.py")):
    name, text = path.relative_to(package).as_posix(), path.read_text()
    for needle, files in allowed.items():
      assert needle not in text or name in files, f"{name} uses {needle!r}; ask execution.policy(mesh) instead"
