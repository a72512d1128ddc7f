"""The paper's federated setting: ResNet20 on CIFAR-10, 20 clients with Dirichlet 0.5 label
skew, 200 rounds of 1 local epoch, SGD 0.1 (momentum 0.9, weight decay 5e-4, x0.99 per
round), batch 128, FedProx mu 0.01; accuracy = mean of the last 5 rounds. Needs CIFAR-10
prepared by TFDS (see `data.load_dataset`) and an accelerator.

python -m tna_jax.main --config=configs/fed_cifar10_resnet20.py --workdir=workdirs/fed_cifar10_resnet20 \
    --config.data_dir=/path/to/tensorflow_datasets
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("fed")
  config.dataset = "cifar10"
  config.model.name = "resnet20"
  config.model.norm = "batchnorm"
  config.partition.num_clients = 20
  config.partition.alpha = 0.5
  config.num_rounds = 200
  config.local_epochs = 1  # the authors' default; FedPNU then trains with the reversed mask only (int(1/2) = 0)
  config.batch_size = 128
  config.optimizer.update(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4)
  config.lr_decay_per_round = 0.99
  config.prox_mu = 0.01
  return loader.apply_preset(config, arg)
