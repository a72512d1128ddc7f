"""A sweep's grid: axes of config values whose combinations are the sweep's points.

`sweep.grid` is text a researcher types on the command line:

    mask.fixed_fraction+pruning_fraction=0,0.2,0.4; model.width=64,256

Axes are separated by ';'. An axis is `KEY=V1,V2,...`; `KEY1+KEY2=...` ties keys so that each
value sets all of them (TNA-PFN's and pruning's ratio move together on the paper's x-axis).
The points are every combination of the axes' values, in order, the first axis varying
slowest. Values are cast by the keys' declarations (`tna_jax.config.schema`), so a point is
checked exactly as a config with those values would be.
"""

import itertools
from typing import Any, NamedTuple

import ml_collections

from tna_jax.errors import ConfigError

# Keys a grid may not set: what the whole sweep shares (data, variants, the replicates'
# seeds, how curves are measured) and the sweep's own keys.
FIXED_KEYS = ("experiment", "dataset", "data_dir", "num_train", "num_test", "variants", "init_seed",
              "data_seed", "mask.seed", "eval_batch_size", "overwrite", "distributed", "align", "repair")
FIXED_SECTIONS = ("sweep.", "checkpoint.", "lmc.", "matching.")


class Axis(NamedTuple):
  """One axis of a grid: the keys it sets and the values it takes, in order."""

  keys: tuple[str, ...]
  values: tuple[Any, ...]

  @property
  def name(self) -> str:
    """The axis as written in the grid ('mask.fixed_fraction+pruning_fraction')."""
    return "+".join(self.keys)


def parse(text: str, declared: dict) -> list[Axis]:
  """The axes of grid `text`; `declared` maps the experiment's keys to their `schema.Key`.

  Raises ConfigError naming the bad part: the syntax, a key that is not declared or may not
  be swept, a key on two axes, tied keys of different types, or a value of the wrong type
  (values are checked against bounds and choices by the schema afterwards).
  """
  axes, seen = [], set()
  for part in (p.strip() for p in text.split(";")):
    if not part:
      continue
    names, equals, listed = part.partition("=")
    keys = tuple(k.strip() for k in names.split("+"))
    values = [v.strip() for v in listed.split(",") if v.strip()]
    if not equals or not all(keys) or not values:
      raise ConfigError(f"sweep.grid axis {part!r} is not KEY=V1,V2,... (or KEY1+KEY2=V1,V2,...).")
    for key in keys:
      _check_sweepable(key, declared)
      if key in seen:
        raise ConfigError(f"sweep.grid sets {key!r} on two axes; each key may be on one axis only.")
      seen.add(key)
    kinds = {declared[key].kind for key in keys}
    if len(kinds) > 1:
      raise ConfigError(f"sweep.grid ties keys of different types ({', '.join(keys)}); tied keys take the same values.")
    cast = [_cast(keys[0], declared[keys[0]].kind, v) for v in values]
    repeated = [v for i, v in enumerate(cast) if v in cast[:i]]
    if repeated:
      raise ConfigError(f"sweep.grid axis {part!r} lists {repeated[0]!r} twice.")
    axes.append(Axis(keys, tuple(cast)))
  return axes


def _check_sweepable(key: str, declared: dict) -> None:
  if key not in declared:
    raise ConfigError(f"sweep.grid key {key!r} is not a key of the sweep experiment; its keys are in "
                      "docs/config_keys.md.")
  if key in FIXED_KEYS or key.startswith(FIXED_SECTIONS):
    raise ConfigError(f"sweep.grid key {key!r} may not be swept: every point shares it (keys that may not be "
                      f"swept: {', '.join(FIXED_KEYS)} and the sections {', '.join(FIXED_SECTIONS)}); seeds are "
                      "sweep.seeds.")


def _cast(key: str, kind: type, text: str) -> Any:
  """A grid value as the key's declared type."""
  if kind is bool:
    if text.lower() not in ("true", "false"):
      raise ConfigError(f"sweep.grid value {text!r} of {key!r} is not a bool; allowed: true, false.")
    return text.lower() == "true"
  try:
    return kind(text)
  except ValueError:
    raise ConfigError(f"sweep.grid value {text!r} of {key!r} is not a {kind.__name__}.") from None


def points(axes: list[Axis]) -> list[dict[str, Any]]:
  """Every combination of the axes' values as {key: value} (one empty point for no axes)."""
  return [{key: value for axis, value in zip(axes, combination) for key in axis.keys}
          for combination in itertools.product(*(axis.values for axis in axes))]


def apply(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with the dotted keys of `overrides` set."""
  point = config.copy_and_resolve_references()
  for path, value in overrides.items():
    set_value(point, path, value)
  return point


def get_value(config, path: str) -> Any:
  """The value of the dotted key `path` of `config` (a ConfigDict or nested mapping)."""
  for part in path.split("."):
    config = config[part]
  return config


def set_value(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  """Sets the dotted key `path` of `config` in place."""
  *parents, leaf = path.split(".")
  for parent in parents:
    config = config[parent]
  config[leaf] = value
