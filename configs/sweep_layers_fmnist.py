"""Which layers to mask, the authors' layer-wise masks: TNA-PFN (40 % fixed) over all layers,
the first (input) layer, the middle (hidden) layers or the last (classifier) layer, next to
vanilla; a 3 x 200 MLP on the embedded Fashion-MNIST, 3 seeds, all in ONE compiled program.

python -m tna_jax.main --config=configs/sweep_layers_fmnist.py --workdir=workdirs/sweep_layers
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("sweep")
  config.model.depth = 3
  config.num_epochs = 8
  config.variants = "vanilla,tna"
  config.sweep.grid = "mask.include=all,first,middle,last"
  config.checkpoint.every = 4
  return loader.apply_preset(config, arg)
