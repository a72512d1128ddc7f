"""The experiment registry: `config.experiment` names the function that runs a config.

Each experiment is `run(config, workdir) -> dict` (the results it also writes to the
workdir). Modules are imported lazily so `main --help` stays fast.
"""

import importlib
from typing import Any, Callable

from tna_jax.errors import check_choice

EXPERIMENTS = {
    "lmc": "tna_jax.experiments.lmc",
    "sweep": "tna_jax.experiments.sweep",
    "fed": "tna_jax.experiments.fed",
    "soup": "tna_jax.experiments.soup",
    "cold": "tna_jax.experiments.cold",
}


def get_experiment(name: str) -> Callable[[Any, str], dict]:
  """The `run` function of experiment `name`."""
  check_choice("experiment", name, tuple(EXPERIMENTS))
  return importlib.import_module(EXPERIMENTS[name]).run
