"""Shared config defaults and presets; each file in configs/ starts from these.

Presets are the `arg` of `get_config(arg)`, given as `--config=configs/NAME.py:quick`:
  quick (alias runlocal): a tiny run for smoke tests and CI (few examples, 1 epoch).
"""

import ml_collections

PRESETS = ("quick", "runlocal")


def lmc_config() -> ml_collections.ConfigDict:
  """Defaults of the `lmc` experiment (an MLP on the embedded Fashion-MNIST)."""
  config = ml_collections.ConfigDict()
  config.experiment = "lmc"
  config.dataset = "fashion_mnist"
  config.data_dir = ""  # '' = the Debian package's directory for fashion_mnist; a TFDS data_dir otherwise
  config.num_train = 0  # 0 = all training examples; n = the first n (quick runs)
  config.num_test = 0

  config.model = ml_collections.ConfigDict(dict(name="mlp", depth=2, width=200, width_multiplier=1, norm="batchnorm"))

  config.init_seed = 0  # one initialization shared by every model
  config.data_seed = 1  # model i of a variant sees data order data_seed + i
  config.num_models = 2  # models per variant; the LMC pair is models 0 and 1
  config.variants = "vanilla,tna,pruning"
  config.mask = ml_collections.ConfigDict(dict(
      fixed_fraction=0.4,  # fraction of entries held at their initial values (the paper's mask ratio)
      granularity="weight",  # weight | neuron
      include="",  # regex on parameter paths ('Dense_0/kernel'); '' = all
      exclude="",
      seed=0,
  ))
  config.pruning_fraction = 0.4  # entries zeroed at init and kept zero by the 'pruning' variant

  config.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant",
      warmup_steps=0, grad_clip=0.0))
  config.num_epochs = 10
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.augment = ml_collections.ConfigDict(dict(flip=False, crop_padding=0))  # the paper used none

  config.lmc = ml_collections.ConfigDict(dict(
      num_alphas=21,  # grid from 0 to 1, endpoints included
      alpha_chunk=0,  # alphas evaluated at once; 0 = all (lower it if memory is tight)
      bn_modes="raw,reset",  # BatchNorm models: interpolate running stats, and/or re-estimate them per alpha
      reset_batches=20,  # training batches used to re-estimate BatchNorm statistics
  ))
  config.overwrite = False  # allow replacing an earlier run's results in the same workdir
  return config


def apply_preset(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the comma-separated presets in `arg` (see module docstring)."""
  from tna_jax.errors import check_choice  # pylint: disable=g-import-not-at-top
  for preset in filter(None, (arg or "").split(",")):
    check_choice("config preset", preset, PRESETS)
    config.num_train, config.num_test = 2048, 1000
    config.num_epochs = 1
    config.lmc.num_alphas = 5
    config.lmc.reset_batches = 2
  return config
