"""FedAvg vs FedProx vs FedPFN vs FedPNU: the paper's CNN on Fashion-MNIST under Dirichlet
label skew, offline, sized to finish on a 2-core CPU in under 15 minutes.

python -m tna_jax.main --config=configs/fed_fmnist_cnn.py --workdir=workdirs/fed_fmnist_cnn
"""

from tna_jax import config_lib


def get_config(arg=None):
  config = config_lib.fed_config()
  config.model.name = "cnn"
  config.num_train = 6000
  config.num_test = 2000
  config.partition.num_clients = 10
  config.num_rounds = 20
  config.local_epochs = 2  # FedPNU: one epoch with the mask, one with its reverse
  config.batch_size = 32
  config.optimizer.learning_rate = 0.05
  return config_lib.apply_fed_preset(config, arg)
