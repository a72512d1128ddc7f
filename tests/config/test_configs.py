"""Every config file loads, with and without the quick preset, and passes the checks of its
declared keys (tna_jax.config.schema); bad keys and values are named with what is allowed."""

import importlib

import ml_collections
import pytest

from tna_jax import experiments
from tna_jax.config import grid, loader, schema
from tna_jax.errors import ConfigError
from tna_jax.runs import workdir

CONFIG_FILES = loader.config_files()


def test_the_configs_the_readme_names_exist():
  names = {p.stem for p in CONFIG_FILES}
  assert {"fmnist_mlp", "fmnist_cnn", "resnet20", "vgg11", "default_lmc", "default_fed", "default_soup",
          "default_cold"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "quick"])
def test_config_loads_and_validates(path, arg):
  config = loader.load_module(path).get_config(arg)
  assert config.experiment in experiments.EXPERIMENTS
  module = importlib.import_module(experiments.EXPERIMENTS[config.experiment])
  module.validate(config)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_key_of_every_config_is_declared_for_its_experiment(path):
  config = loader.load_module(path).get_config()
  declared = schema.declared(config.experiment)
  assert set(workdir.flat(config)) <= set(declared), set(workdir.flat(config)) - set(declared)


def test_quick_preset_shrinks_and_unknown_preset_is_an_error():
  full, quick = loader.defaults("lmc"), loader.apply_preset(loader.defaults("lmc"), "quick")
  assert quick.num_train and quick.num_train < 10_000 and quick.num_epochs <= full.num_epochs
  with pytest.raises(ConfigError, match="preset='fast'.*quick"):
    loader.apply_preset(loader.defaults("lmc"), "fast")


@pytest.mark.parametrize("family", ["lmc", "sweep", "fed", "soup", "cold"])
def test_runlocal_is_quick_and_the_quick_keys_exist(family):
  quick, runlocal = (loader.apply_preset(loader.defaults(family), arg) for arg in ("quick", "runlocal"))
  assert quick.to_dict() == runlocal.to_dict() != loader.defaults(family).to_dict()
  flat = workdir.flat(quick)
  assert all(flat[key] == value for key, value in loader.quick_overrides(family).items())


def test_an_undeclared_key_is_rejected_by_name():
  config = loader.defaults("lmc")
  config.mask.fixed_fractio = 0.3
  with pytest.raises(ConfigError, match="config key 'mask.fixed_fractio' is not a key of the lmc experiment"):
    schema.validate(config)
  config = loader.defaults("soup")
  config.num_epochs = 3  # an lmc key: soup draws epochs per model (soup.epochs)
  with pytest.raises(ConfigError, match="'num_epochs' is not a key of the soup experiment"):
    schema.validate(config)


@pytest.mark.parametrize("family,key,value,match", [
    # type
    ("lmc", "num_epochs", 2.5, r"num_epochs=2.5 is a float; allowed: int >= 1"),
    ("fed", "client_eval", "yes", r"client_eval='yes' is a str; allowed: bool"),
    # bounds
    ("lmc", "num_models", 1, r"num_models=1 must be >= 2"),
    ("fed", "client_fraction", 0.0, r"client_fraction=0.0 is out of range; allowed: 0 < client_fraction <= 1"),
    ("soup", "mask.fixed_fraction", 1.0, r"mask.fixed_fraction=1.0 is out of range; allowed: 0 <= "
     r"mask.fixed_fraction < 1"),
    ("lmc", "checkpoint.keep", 0, r"checkpoint.keep=0 must be >= 1"),
    ("soup", "soup.epochs", "2,0", r"soup.epochs=0 must be >= 1"),
    # choices
    ("lmc", "optimizer.name", "lion", r"optimizer.name='lion' is not supported; allowed: sgd, adam, adamw"),
    ("cold", "pretrain.optimizer.schedule", "step", r"pretrain.optimizer.schedule='step' is not supported; "
     r"allowed: constant, cosine"),
    ("lmc", "lmc.bn_modes", "raw,raw", r"lmc.bn_modes='raw,raw' names 'raw' twice; allowed: comma-separated, each "
     r"at most once: raw, reset"),
    ("fed", "algorithms", "", r"algorithms='' names nothing"),
    ("lmc", "mask.include", "fc(", r"mask.include='fc\(' is not a regular expression"),
])
def test_a_bad_value_is_rejected_naming_key_and_what_is_allowed(family, key, value, match):
  values = loader.defaults(family).to_dict()  # a plain dict: no ConfigDict type check stands in the way
  *parents, leaf = key.split(".")
  node = values
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  with pytest.raises(ConfigError, match=match):
    schema.validate(ml_collections.ConfigDict(values))


def test_the_keys_that_apply_follow_the_model_and_the_other_keys():
  shown = workdir.flat(schema.applicable(loader.defaults("lmc")))
  assert {"model.depth", "model.width", "mask.fixed_fraction"} <= set(shown)
  assert not {"model.norm", "model.width_multiplier", "lmc.bn_modes", "matching.solver"} & set(shown)
  config = loader.defaults("lmc")
  config.model.name, config.align, config.variants = "resnet20", "weight", "vanilla"
  shown = workdir.flat(schema.applicable(config))
  assert {"model.norm", "model.width_multiplier", "lmc.bn_modes", "matching.solver", "matching.seed"} <= set(shown)
  assert not {"model.depth", "model.width", "matching.batches", "mask.fixed_fraction", "pruning_fraction"} & set(shown)


@pytest.mark.parametrize("overrides,match", [
    # the symmetry-breaking variants build their fixed entries into the library's own from-scratch models
    ({"variants": "vanilla,wasym", "base.source": "hf", "base.path": "/ckpt"},
     r"variants wasym build their fixed entries .* base.source='hf' is not supported"),
    # a schedule releases entries in its own random order, which a magnitude rule would contradict
    ({"mask.select": "magnitude_small", "mask.schedule": "linear", "base.source": "hf", "base.path": "/ckpt"},
     r"mask.select='magnitude_small' with mask.schedule='linear'"),
])
def test_features_that_do_not_combine_are_refused_by_name(overrides, match):
  config = loader.defaults("lmc")
  for key, value in overrides.items():
    grid.set_value(config, key, value)
  with pytest.raises(ConfigError, match=match):
    schema.validate(config)
