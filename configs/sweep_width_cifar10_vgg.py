"""For a GPU: barrier against width, vanilla vs TNA-PFN (40 % fixed), for VGG11 (no BatchNorm, as
the authors) on CIFAR-10 at width multipliers 0.25 to 2, 3 seeds; one program per width.
Needs CIFAR-10 prepared in a TFDS data_dir (--config.data_dir).

python -m tna_jax.main --config=configs/sweep_width_cifar10_vgg.py --workdir=workdirs/sweep_width_vgg
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("sweep")
  config.dataset = "cifar10"
  config.model.name = "vgg11"
  config.num_epochs = 60
  config.optimizer.learning_rate = 0.02  # VGG without BN diverges at the MLP's 0.1
  config.optimizer.schedule = "cosine"
  config.variants = "vanilla,tna"
  config.mask.fixed_fraction = 0.4
  config.sweep.grid = "model.width_multiplier=0.25,0.5,1,2"
  config.sweep.seeds = 3
  config.eval_every = 10
  return loader.apply_preset(config, arg)
