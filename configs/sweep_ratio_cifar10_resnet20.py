"""For a GPU: barrier against mask ratio, TNA-PFN next to pruning at init, for ResNet20 (BatchNorm;
curves with raw and re-estimated BN statistics) on CIFAR-10, 3 seeds, all models of the
grid as one vmapped program. Needs CIFAR-10 prepared in a TFDS data_dir (--config.data_dir).

python -m tna_jax.main --config=configs/sweep_ratio_cifar10_resnet20.py --workdir=workdirs/sweep_ratio_resnet20
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("sweep")
  config.dataset = "cifar10"
  config.model.name = "resnet20"
  config.model.width_multiplier = 2.0
  config.num_epochs = 60
  config.optimizer.schedule = "cosine"
  config.variants = "vanilla,tna,pruning"
  config.sweep.grid = "mask.fixed_fraction+pruning_fraction=0,0.2,0.4,0.6,0.8"
  config.sweep.seeds = 3
  config.eval_every = 10
  return loader.apply_preset(config, arg)
