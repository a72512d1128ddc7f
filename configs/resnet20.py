"""CIFAR ResNet20 (BatchNorm by default) on CIFAR-10 through TFDS; a GPU/TPU-sized run.

python -m tna_jax.main --config=configs/resnet20.py --workdir=workdirs/resnet20 --config.data_dir=DIR
Offline on this machine: --config.dataset=fashion_mnist. Other norms: --config.model.norm=layernorm|none.
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("lmc")
  config.dataset = "cifar10"
  config.model.name = "resnet20"
  config.model.norm = "batchnorm"
  config.model.width_multiplier = 1.0  # 16/32/64 channels times this
  config.optimizer.learning_rate = 0.1
  config.optimizer.schedule = "cosine"
  config.num_epochs = 100
  config.lmc.alpha_chunk = 7  # bounds memory: 7 interpolated ResNets evaluated at once
  return loader.apply_preset(config, arg)
