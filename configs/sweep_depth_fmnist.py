"""Barrier against depth, vanilla vs TNA-PFN (40 % fixed): MLPs of 1 to 6 hidden layers of 200
units on the embedded Fashion-MNIST, 3 seeds; one compiled program per depth.

python -m tna_jax.main --config=configs/sweep_depth_fmnist.py --workdir=workdirs/sweep_depth
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("sweep")
  config.num_epochs = 6
  config.variants = "vanilla,tna"
  config.sweep.grid = "model.depth=1,2,3,4,6"
  config.checkpoint.every = 6
  return loader.apply_preset(config, arg)
