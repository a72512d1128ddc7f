"""The paper's small CNN (conv32-pool-conv64-pool-conv64-fc64-fc10) on Fashion-MNIST (offline).

python -m tna_jax.main --config=configs/fmnist_cnn.py --workdir=workdirs/fmnist_cnn
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("lmc")
  config.model.name = "cnn"
  config.optimizer.learning_rate = 0.05
  config.num_epochs = 10
  return loader.apply_preset(config, arg)
