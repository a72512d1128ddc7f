"""Loading the family defaults of configs/ and applying presets.

Each experiment family keeps its defaults in a base file, `configs/default_<family>.py` (lmc,
sweep, fed, soup and cold; finetune is the part soup and cold share); every experiment config starts
from `defaults(family)` and shows its own overrides. Presets are the `arg` of
`get_config(arg)`, given as `--config=configs/NAME.py:quick`:
  quick (alias runlocal): a tiny run for smoke tests and CI, the dotted-key overrides
  `QUICK` of the experiment's base file.
"""

import importlib.util
import pathlib
import types
from typing import Any

import ml_collections

import tna_jax
from tna_jax.config import grid
from tna_jax.errors import check_choice

PRESETS = ("quick", "runlocal")
FAMILIES = ("lmc", "sweep", "fed", "finetune", "soup", "cold")


def config_dir() -> pathlib.Path:
  """The directory of the config files: the package's own copy when installed from a wheel
  (tna_jax/configs, see setup.py), else the checkout's configs/ (the one source)."""
  package = pathlib.Path(tna_jax.__file__).resolve().parent
  packaged = package / "configs"
  return packaged if packaged.is_dir() else package.parent / "configs"


def resolve_config_flag(value: str) -> str:
  """`--config`'s value as a path: an existing file stays as given; otherwise a packaged
  config's name (`fmnist_mlp`, `fmnist_mlp.py` or `configs/fmnist_mlp.py`, with an optional
  `:preset`) becomes its path in `config_dir()`, so installed configs run from any directory."""
  path, colon, preset = value.partition(":")
  if not path or pathlib.Path(path).exists():
    return value
  name = pathlib.Path(path).name if path.startswith("configs/") or "/" not in path else ""
  candidate = config_dir() / (name if name.endswith(".py") else f"{name}.py")
  return f"{candidate}{colon}{preset}" if name and candidate.is_file() else value


def config_files() -> list[pathlib.Path]:
  """The runnable config files: configs/*.py but default_finetune.py (the part soup and cold share)."""
  return sorted(path for path in config_dir().glob("*.py") if path.stem != "default_finetune")


def load_module(path: pathlib.Path) -> types.ModuleType:
  """A config file as a module (config files are loaded by path, never imported by name)."""
  spec = importlib.util.spec_from_file_location(f"_tna_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _family_module(family: str) -> types.ModuleType:
  check_choice("config family", family, FAMILIES)
  return load_module(config_dir() / f"default_{family}.py")


def defaults(family: str) -> ml_collections.ConfigDict:
  """The defaults of `family` (configs/default_<family>.py), without presets."""
  return _family_module(family).get_config()


def quick_overrides(family: str) -> dict[str, Any]:
  """The `quick` preset of `family`: {dotted key: value}."""
  return dict(_family_module(family).QUICK)


def checkpoint_config() -> ml_collections.ConfigDict:
  """When a run checkpoints its resumable phases (epochs or rounds); a killed run resumes
  from the last one when the same command runs again. Every family shares these."""
  return ml_collections.ConfigDict(dict(
      every=1,  # steps (epochs or rounds) between checkpoints; the last step is always saved
      every_minutes=0.0,  # also save when this many minutes passed since the last save; 0 = off
      keep=2,  # checkpoints kept per phase (older ones are deleted)
  ))


def apply_preset(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the comma-separated presets in `arg` (see module docstring) to a config of any experiment."""
  for preset in filter(None, (arg or "").split(",")):
    check_choice("config preset", preset, PRESETS)
    for key, value in quick_overrides(config.experiment).items():
      grid.set_value(config, key, value)
  return config
