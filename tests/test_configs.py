"""Every config file loads, with and without the quick preset, and passes its experiment's checks."""

import importlib
import importlib.util
import pathlib

import pytest

from tna_jax import config_lib, experiments
from tna_jax.errors import ConfigError

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_configs_the_readme_names_exist():
  names = {p.stem for p in CONFIG_FILES}
  assert {"fmnist_mlp", "fmnist_cnn", "resnet20", "vgg11"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "quick"])
def test_config_loads_and_validates(path, arg):
  config = load(path).get_config(arg)
  assert config.experiment in experiments.EXPERIMENTS
  module = importlib.import_module(experiments.EXPERIMENTS[config.experiment])
  module.validate(config)


def test_quick_preset_shrinks_and_unknown_preset_is_an_error():
  full, quick = config_lib.lmc_config(), config_lib.apply_preset(config_lib.lmc_config(), "quick")
  assert quick.num_train and quick.num_train < 10_000 and quick.num_epochs <= full.num_epochs
  with pytest.raises(ConfigError, match="preset='fast'.*quick"):
    config_lib.apply_preset(config_lib.lmc_config(), "fast")
