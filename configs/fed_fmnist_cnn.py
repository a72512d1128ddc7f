"""FedAvg vs FedProx vs FedPFN vs FedPNU: the paper's CNN on Fashion-MNIST under Dirichlet
label skew (alpha 0.5, 20 clients), offline, sized to finish within 15 minutes on a
2-core CPU (scale it up with --config.num_train=0 --config.num_rounds=200 on a GPU).

python -m tna_jax.main --config=configs/fed_fmnist_cnn.py --workdir=workdirs/fed_fmnist_cnn
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("fed")
  config.model.name = "cnn"
  config.num_train = 4000  # the first 4000 training examples, split over the 20 clients
  config.num_test = 2000
  config.num_rounds = 15
  config.local_epochs = 2  # FedPNU: one epoch with the mask, one with its reverse
  config.batch_size = 32
  config.optimizer.learning_rate = 0.05
  config.checkpoint.every = 5
  return loader.apply_preset(config, arg)
