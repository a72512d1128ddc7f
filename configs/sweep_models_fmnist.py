"""Fusion of more than two models: the barriers over all pairs of K models and the accuracy
of their K-way weight average, for K = 2, 4 and 8, vanilla vs TNA-PFN (40 % fixed); a 2 x 200
MLP on the embedded Fashion-MNIST, 3 seeds; one compiled program per K.

python -m tna_jax.main --config=configs/sweep_models_fmnist.py --workdir=workdirs/sweep_models
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("sweep")
  config.num_epochs = 8
  config.variants = "vanilla,tna"
  config.sweep.grid = "num_models=2,4,8"
  config.lmc.num_alphas = 11
  config.checkpoint.every = 4
  return loader.apply_preset(config, arg)
