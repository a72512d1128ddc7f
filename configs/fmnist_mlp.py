"""Quickstart: vanilla vs TNA-PFN vs pruning LMC of an MLP on Fashion-MNIST (offline).

python -m tna_jax.main --config=configs/fmnist_mlp.py --workdir=workdirs/fmnist_mlp
"""

from tna_jax import config_lib


def get_config(arg=None):
  config = config_lib.defaults("lmc")
  config.model.name = "mlp"
  config.model.depth = 4
  config.model.width = 512
  config.num_epochs = 10
  return config_lib.apply_preset(config, arg)
