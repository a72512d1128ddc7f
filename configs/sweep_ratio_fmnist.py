"""Barrier against mask ratio, TNA-PFN next to pruning at init (the paper's first figure):
a 2 x 200 MLP on the embedded Fashion-MNIST, ratios 0 to 0.9, 3 seeds. Every model has the
same shapes, so all 114 distinct models train as ONE compiled program (vanilla, and each
ratio of 0, once per seed). About 20 minutes on a 2-core CPU.

python -m tna_jax.main --config=configs/sweep_ratio_fmnist.py --workdir=workdirs/sweep_ratio
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("sweep")
  config.num_epochs = 8
  config.sweep.grid = "mask.fixed_fraction+pruning_fraction=0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"
  config.checkpoint.every = 4
  return loader.apply_preset(config, arg)
