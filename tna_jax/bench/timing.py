"""One way to time compiled JAX work, shared by every benchmark figure."""

import time
from typing import Any, Callable

import jax
import numpy as np


def seconds_per_call(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of `fn()` after `warmup` calls (compilation), waiting for the device."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))
