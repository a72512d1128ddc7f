"""Barrier against width, vanilla vs TNA-PFN (40 % fixed): MLPs with 2 hidden layers of 32 to
1024 units on the first 30,000 Fashion-MNIST training images, 3 seeds; one compiled program per width. Every pair
is also weight-matched (Git Re-Basin), so the same run gives the matching cost against width:
the sweeps and seconds matching needs, and the barrier it leaves, for vanilla vs TNA-PFN
pairs. About 20 minutes on a 2-core CPU.

python -m tna_jax.main --config=configs/sweep_width_fmnist.py --workdir=workdirs/sweep_width
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("sweep")
  config.num_train = 30_000
  config.num_epochs = 5
  config.variants = "vanilla,tna"
  config.align = "weight"
  config.sweep.grid = "model.width=32,64,128,256,512,1024"
  config.checkpoint.every = 5
  return loader.apply_preset(config, arg)
