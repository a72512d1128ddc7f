"""A mask ratio that falls during training against constant ratios: TNA-PFN starting at 60 % or
90 % fixed, released to 0 % linearly or along a cosine by half or all of training, next to
constant 60 % and 90 % and vanilla (0 %); a 2 x 200 MLP on the first 20,000 embedded
Fashion-MNIST images, 6 epochs, 3 seeds, all in ONE compiled program (constant ratios ignore
schedule_end, so each trains once: 66 distinct models).

python -m tna_jax.main --config=configs/sweep_schedule_fmnist.py --workdir=workdirs/sweep_schedule
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("sweep")
  config.num_train = 20_000
  config.num_epochs = 6
  config.variants = "vanilla,tna"
  config.mask.final_fraction = 0.0
  config.sweep.grid = "mask.schedule=constant,linear,cosine; mask.fixed_fraction=0.6,0.9; mask.schedule_end=0.5,1"
  config.checkpoint.every = 3
  return loader.apply_preset(config, arg)
