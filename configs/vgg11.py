"""VGG11 without BatchNorm on CIFAR-10 through TFDS, as in the paper; a GPU/TPU-sized run.

python -m tna_jax.main --config=configs/vgg11.py --workdir=workdirs/vgg11 --config.data_dir=DIR
Offline: --config.dataset=fashion_mnist. VGG13/16: --config.model.name=vgg13|vgg16.
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("lmc")
  config.dataset = "cifar10"
  config.model.name = "vgg11"
  config.model.width_multiplier = 1.0
  config.optimizer.learning_rate = 0.02  # VGG without BN diverges at the MLP's 0.1
  config.optimizer.schedule = "cosine"
  config.num_epochs = 100
  config.lmc.alpha_chunk = 7
  return loader.apply_preset(config, arg)
