"""Barrier against width, vanilla vs TNA-PFN (40 % fixed): MLPs with 2 hidden layers of 32 to
1024 units on the embedded Fashion-MNIST, 3 seeds; one compiled program per width. About 20
minutes on a 2-core CPU.

python -m tna_jax.main --config=configs/sweep_width_fmnist.py --workdir=workdirs/sweep_width
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("sweep")
  config.model.name = "mlp"
  config.model.depth = 2
  config.num_epochs = 5
  config.variants = "vanilla,tna"
  config.mask.fixed_fraction = 0.4
  config.sweep.grid = "model.width=32,64,128,256,512,1024"
  config.sweep.seeds = 3
  config.checkpoint.every = 5
  return loader.apply_preset(config, arg)
