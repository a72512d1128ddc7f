"""Matching cost against width for the paper's CNN: width multipliers 0.25 to 2 (conv channels
8/16/16 to 64/128/128), vanilla vs TNA-PFN (40 % fixed), every pair weight-matched (Git
Re-Basin): the coordinate-descent sweeps and seconds matching needs and the barrier it leaves.
10,000 training examples and 4 epochs keep it near 15 minutes on a 2-core CPU.

python -m tna_jax.main --config=configs/sweep_matching_cnn_fmnist.py --workdir=workdirs/sweep_matching_cnn
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("sweep")
  config.model.name = "cnn"
  config.num_train = 10_000
  config.num_epochs = 4
  config.optimizer.learning_rate = 0.05
  config.variants = "vanilla,tna"
  config.align = "weight"
  config.sweep.grid = "model.width_multiplier=0.25,0.5,1,2"
  config.sweep.seeds = 2
  return loader.apply_preset(config, arg)
