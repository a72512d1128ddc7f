"""Quickstart: vanilla vs TNA-PFN vs pruning LMC of an MLP on Fashion-MNIST (offline).

python -m tna_jax.main --config=configs/fmnist_mlp.py --workdir=workdirs/fmnist_mlp
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("lmc")
  config.model.name = "mlp"
  config.model.depth = 4
  config.model.width = 512
  config.num_epochs = 10
  return loader.apply_preset(config, arg)
