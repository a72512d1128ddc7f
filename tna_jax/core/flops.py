"""Compute cost and hardware peaks: how close a compiled program runs to the machine's limit.

- `flops(compiled)`: floating-point operations of one call of a compiled function, from
  XLA's cost analysis. XLA counts a while loop's body ONCE whatever its trip count (a
  `lax.scan` over 100 steps counts as one step), so the body of every loop with a known
  trip count is analysed on its own and counted as often as it runs (`tna_jax.core.hlo`).
- `PEAKS` / `peak_for(device_kind)`: published dense peaks per chip of the accelerators
  this library targets; `cpu_matmul_peak()`: a measured one for CPUs, which publish none
  that a program can reach.
- `achieved(flops, seconds)` and `mfu(flops, seconds, peak)`: FLOP/s and the fraction of
  the peak (model FLOPs utilization when `flops` counts the model's work).
"""

import dataclasses
import functools
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax.core import hlo

TERA = 1e12


@dataclasses.dataclass(frozen=True)
class Peak:
  """Dense peak FLOP/s of one chip (None where the vendor publishes none)."""
  name: str
  bf16: float | None
  fp32: float | None
  source: str

  def for_dtype(self, dtype: str) -> float | None:
    return {"bf16": self.bf16, "bfloat16": self.bf16, "fp32": self.fp32, "float32": self.fp32}[dtype]


# Per chip, dense (no structured sparsity), at the boost clock the vendor quotes.
# TPUs: fp32 matmuls run through the bf16 MXU in several passes; Google publishes no fp32 peak.
# NVIDIA fp32 is the non-tensor-core (CUDA core) FP32 figure; TF32 tensor-core peaks are
# higher (A100 156, H100 SXM 495 TFLOP/s dense) but are not IEEE fp32.
PEAKS = {
    # cloud.google.com/tpu/docs/v4: "Peak compute per chip (bf16) 275 TFLOPs".
    "tpu_v4": Peak("TPU v4", 275 * TERA, None, "cloud.google.com/tpu/docs/v4"),
    # cloud.google.com/tpu/docs/v5e: "Peak compute per chip (bf16) 197 TFLOPs".
    "tpu_v5e": Peak("TPU v5e", 197 * TERA, None, "cloud.google.com/tpu/docs/v5e"),
    # cloud.google.com/tpu/docs/v5p: "Peak compute per chip (bf16) 459 TFLOPs".
    "tpu_v5p": Peak("TPU v5p", 459 * TERA, None, "cloud.google.com/tpu/docs/v5p"),
    # cloud.google.com/tpu/docs/v6e: "Peak compute per chip (bf16) 918 TFLOPs".
    "tpu_v6e": Peak("TPU v6e", 918 * TERA, None, "cloud.google.com/tpu/docs/v6e"),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM and PCIe alike): BF16 tensor core 312 TFLOPS
    # (624 with sparsity), FP32 19.5 TFLOPS.
    "a100": Peak("A100", 312 * TERA, 19.5 * TERA, "NVIDIA A100 datasheet"),
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 1,979 TFLOPS with sparsity (989.5
    # dense), FP32 67 TFLOPS. H100 PCIe: 1,513 (756 dense), 51. H100 NVL: 1,671 (835 dense), 60.
    "h100_sxm": Peak("H100 SXM", 989.5 * TERA, 67 * TERA, "NVIDIA H100 datasheet"),
    "h100_pcie": Peak("H100 PCIe", 756 * TERA, 51 * TERA, "NVIDIA H100 datasheet"),
    "h100_nvl": Peak("H100 NVL", 835 * TERA, 60 * TERA, "NVIDIA H100 datasheet"),
    # NVIDIA H200 Tensor Core GPU datasheet: H200 SXM the same compute as H100 SXM (BF16 1,979
    # TFLOPS with sparsity, FP32 67 TFLOPS); H200 NVL 1,671 (835 dense), 60.
    "h200": Peak("H200 SXM", 989.5 * TERA, 67 * TERA, "NVIDIA H200 datasheet"),
    "h200_nvl": Peak("H200 NVL", 835 * TERA, 60 * TERA, "NVIDIA H200 datasheet"),
}

# `jax.devices()[0].device_kind`, lower-cased, to a PEAKS key; first match wins, so the
# specific names come before the general ones. TPU kinds: 'TPU v4', 'TPU v5 lite' (v5e),
# 'TPU v5' / 'TPU v5p', 'TPU v6 lite' (v6e). GPU kinds: 'NVIDIA A100-SXM4-80GB',
# 'NVIDIA H100 80GB HBM3' (SXM), 'NVIDIA H100 PCIe', 'NVIDIA H200', 'NVIDIA H200 NVL', ...
_KINDS = (
    (r"^tpu v4$", "tpu_v4"),
    (r"^tpu v5 ?(lite|e)$", "tpu_v5e"),
    (r"^tpu v5p?$", "tpu_v5p"),
    (r"^tpu v6 ?(lite|e)$", "tpu_v6e"),
    (r"\bh200\b.*\bnvl\b", "h200_nvl"),
    (r"\bh200\b", "h200"),
    (r"\bh100\b.*\bpcie\b", "h100_pcie"),
    (r"\bh100\b.*\bnvl\b", "h100_nvl"),
    (r"\bh100\b", "h100_sxm"),
    (r"\ba100\b", "a100"),
)


def peak_for(device_kind: str) -> Peak | None:
  """The published peak of a `device_kind` (None for CPUs and unknown chips)."""
  kind = device_kind.strip().lower()
  for pattern, key in _KINDS:
    if re.search(pattern, kind):
      return PEAKS[key]
  return None


def device_peak(device: jax.Device | None = None, dtype: str = "bf16") -> float | None:
  """Peak FLOP/s of `device` (default the first): the table for accelerators, a measured
  float32 matmul for CPUs (whatever `dtype`), None for an unknown accelerator or a dtype
  without a published figure."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return cpu_matmul_peak()
  peak = peak_for(device.device_kind)
  return peak.for_dtype(dtype) if peak else None


@functools.cache
def cpu_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
  """Measured FLOP/s of a jitted size x size float32 matmul on the CPU (best of `repeats`).

  What this machine's XLA reaches on the most favourable dense work, so a fraction of it
  says how much of the reachable speed a program gets. Measured once per process (about a
  second at 2048 on two cores); a busy machine lowers it.
  """
  cpu = jax.devices("cpu")[0]
  a, b = (jax.device_put(np.random.default_rng(i).standard_normal((size, size), np.float32), cpu) for i in (0, 1))
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def achieved(flops: float, seconds: float) -> float:
  """FLOP/s."""
  return flops / seconds


def mfu(flops: float, seconds: float, peak: float) -> float:
  """Fraction of `peak` FLOP/s that `flops` in `seconds` reach."""
  return achieved(flops, seconds) / peak


def cost_analysis(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled function as one dict (older jax returns a list of
  dicts, one per program; they are summed)."""
  return _merge(compiled.cost_analysis())


def _merge(cost) -> dict[str, float]:
  if cost is None:
    return {}
  if isinstance(cost, dict):
    return dict(cost)
  merged: dict[str, float] = {}
  for part in cost:
    for key, value in (part or {}).items():
      merged[key] = merged.get(key, 0.0) + value
  return merged


@dataclasses.dataclass(frozen=True)
class Count:
  """FLOPs of one call; `loops` lists (while instruction, trip count) as counted, and
  `unknown_trip_counts` the loops whose body was counted once for want of a trip count."""
  flops: float
  xla_flops: float  # XLA's own figure: each loop body once
  loops: tuple[tuple[str, int | None], ...]
  unknown_trip_counts: tuple[str, ...]


def count(compiled, client=None) -> Count:
  """FLOPs of one call of `compiled` (a `jax.stages.Compiled`) on one device, loops unrolled.

  Every loop body (and condition) is analysed as its own program; its own work (without
  the loops nested in it) counts once per run: the product of the trip counts around it.
  A loop without a known trip count counts once and is named in `unknown_trip_counts`
  (all of them, should jaxlib's HLO bindings be missing).
  """
  xla_flops = cost_analysis(compiled).get("flops", 0.0)
  program = hlo.Program(compiled.as_text())
  if not program.loops:
    return Count(xla_flops, xla_flops, (), ())
  try:  # jaxlib's private bindings (jax 0.10): parse HLO text, run XLA's cost analysis on it
    from jaxlib import _hlo  # pylint: disable=g-import-not-at-top
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  except ImportError:  # they moved: XLA's own figure, every loop reported as not unrolled
    loops = tuple((loop.instruction, loop.trip_count) for loop in program.loops)
    return Count(xla_flops, xla_flops, loops, tuple(name for name, _ in loops))
  client = client or jax.devices()[0].client

  @functools.cache
  def once(computation: str) -> float:  # XLA's figure with `computation` as entry (nested loops once)
    if computation == program.entry:
      return xla_flops
    module = _hlo.hlo_module_from_text(program.with_entry(computation))
    return float(_jax.hlo_module_cost_analysis(client, module).get("flops", 0.0))

  scopes = [program.entry] + [name for loop in program.loops for name in (loop.body, loop.condition)]
  nested = {scope: [] for scope in scopes}
  for loop in program.loops:
    nested[program.scope(loop.computation)] += [loop.body, loop.condition]
  total = 0.0
  for scope in scopes:
    own = once(scope) - sum(once(inner) for inner in nested[scope])
    total += (program.runs(scope) or 1) * own
  return Count(total, xla_flops, tuple((loop.instruction, loop.trip_count) for loop in program.loops),
               tuple(loop.instruction for loop in program.loops if loop.trip_count is None))


def flops(compiled) -> float:
  """FLOPs of one call of `compiled` on one device (see `count`)."""
  return count(compiled).flops


def flops_of(fn: Callable, *args: Any, **kwargs: Any) -> float:
  """FLOPs of one call of `jax.jit(fn)(*args, **kwargs)` (compiles it)."""
  return flops(jax.jit(fn).lower(*args, **kwargs).compile())
