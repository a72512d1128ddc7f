"""A finished run, loaded back for analysis: `load_run(workdir)`.

A workdir holds everything needed to look at a run again without re-training it: the
config it ran (config.json), its results (results.json: curves, summary tables) and orbax
checkpoints of its outputs (initialization, mask, every trained model, soups, bases). This
module turns those files back into Python objects, the config as an ml_collections
ConfigDict and each checkpoint restored (and verified against its checksums) on demand,
so a notebook can re-plot curves, evaluate the models on new data or align them.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import ml_collections

from tna_jax.core import data, models
from tna_jax.errors import TnaError
from tna_jax.runs import checkpoints, files, workdir as workdir_lib

PyTree = Any


class RunNotFoundError(TnaError):
  """The directory holds no finished run."""


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """A finished run: its config, results and (restored on first use) checkpoints."""

  workdir: str
  config: ml_collections.ConfigDict
  results: dict

  @property
  def curves(self) -> dict:
    """Each curve's loss and accuracy per alpha (lmc), as results.json stores them."""
    return self.results.get("curves", {})

  @property
  def summary(self) -> list[dict]:
    """The run's table (barriers per variant for lmc; accuracies for the others)."""
    return self.results.get("summary", [])

  @property
  def checkpoint_names(self) -> list[str]:
    """The output checkpoints (`checkpoints/<name>`), without the phases' numbered ones."""
    root = files.path(self.workdir) / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not _is_phase(p)) if root.exists() else []

  def restore(self, name: str) -> PyTree:
    """Output checkpoint `name`, verified against the checksums stored with it."""
    if name not in self.checkpoint_names:
      raise RunNotFoundError(f"{self.workdir} has no checkpoint {name!r}; it has: {', '.join(self.checkpoint_names)}.")
    return checkpoints.restore(files.path(self.workdir) / "checkpoints" / name)

  @functools.cached_property
  def models(self) -> dict[str, dict]:
    """The trained models' variables by name ('tna_0', ...), as listed in results.json."""
    return {name: self.restore(name) for name in self.results.get("models", [])}

  @functools.cached_property
  def masks(self) -> dict[str, PyTree]:
    """Every saved mask (bool pytrees, True = held at the initial value) by checkpoint name."""
    return {name: self.restore(name) for name in self.checkpoint_names if "mask" in name}

  @functools.cached_property
  def model(self) -> nn.Module:
    """The flax module the models were trained as (classes counted from the saved head)."""
    any_model = next(iter(self.models.values()), None) or self.restore("init")
    return models.get_model(self.config.model, any_model["params"]["head"]["kernel"].shape[-1])

  def dataset(self) -> data.Dataset:
    """The dataset as the run used it (same name, directory and example counts)."""
    return data.load_dataset(self.config.dataset, self.config.data_dir, self.config.get("num_train") or None,
                             self.config.get("num_test") or None)


def _is_phase(directory) -> bool:
  """A resumable phase's directory holds numbered step checkpoints (`train/3`), nothing else."""
  children = [c.name for c in directory.iterdir()]
  return bool(children) and all(c.isdigit() or c.startswith(".") for c in children)


def load_run(workdir: files.PathLike) -> SavedRun:
  """The finished run in `workdir` (local or a bucket URL).

  Raises RunNotFoundError when `workdir` holds no results.json: an unfinished or empty
  directory has no results to show, and a half run would be mistaken for a finished one.
  """
  root = files.path(workdir)
  if not (root / workdir_lib.RESULTS).exists():
    raise RunNotFoundError(f"{workdir} holds no finished run (no {workdir_lib.RESULTS}); an unfinished run resumes "
                           "when its command runs again.")
  config = ml_collections.ConfigDict(files.read_json(root / "config.json"))
  return SavedRun(workdir=str(root), config=config, results=files.read_json(root / workdir_lib.RESULTS))
