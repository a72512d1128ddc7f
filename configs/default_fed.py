"""Defaults of the `fed` experiment: the authors' federated setting (20 clients, Dirichlet 0.5
label skew, SGD 0.1 with momentum 0.9 and weight decay 5e-4, lr x0.99 per round). Every fed
config starts from these.

Meanings and allowed values of every key: docs/config_keys.md (from tna_jax/config/schema.py).
"""

import ml_collections

from tna_jax.config import loader

# The `quick` preset (alias `runlocal`): a tiny run for smoke tests and CI.
QUICK = {"num_train": 1000, "num_test": 500, "partition.num_clients": 4, "num_rounds": 2, "batch_size": 32,
         "final_rounds": 2}


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.experiment = "fed"
  config.dataset = "fashion_mnist"
  config.data_dir = ""  # '' = the Debian package's directory for fashion_mnist; a TFDS data_dir otherwise
  config.num_train = 0  # 0 = all training examples; n = the first n
  config.num_test = 0
  config.model = ml_collections.ConfigDict(dict(
      name="cnn",
      init="flax",  # flax | torch (the authors' PyTorch defaults) | he: see docs/config_keys.md
      depth=2,  # mlp: hidden layers
      width=200,  # mlp: units per hidden layer
      width_multiplier=1,  # cnn, resnet20, vgg*: channels times this
      norm="batchnorm",  # resnet20: batchnorm | layernorm | none
  ))
  config.init_seed = 0  # one initialization shared by every algorithm
  config.partition = ml_collections.ConfigDict(dict(
      kind="dirichlet",  # iid | dirichlet (per class, shares from Dir(alpha) over clients) | shards (k classes each)
      num_clients=20,
      alpha=0.5,  # dirichlet: smaller = more skewed
      classes_per_client=2,  # shards: classes each client holds
      min_client_size=10,  # dirichlet redraws until every client has this many examples; others raise
      seed=0,
  ))
  # Comma-separated: fedavg, fedprox, fedpfn, fedpnu, fedavgm, fedadam, fedyogi; '+prox' adds the
  # proximal term, '+m' server momentum (e.g. fedpfn+prox).
  config.algorithms = "fedavg,fedprox,fedpfn,fedpnu"
  config.prox_mu = 0.01  # FedProx (and '+prox') proximal weight
  config.mask = ml_collections.ConfigDict(dict(
      fixed_fraction=0.4,  # FedPFN/FedPNU: fraction of entries clients hold fixed (the paper's mask ratio)
      granularity="weight", include="", exclude="", seed=0,
      redraw="never",  # never: one mask for the run | every_round: the server draws a new one every round
      schedule="constant",  # constant | linear | cosine | step: the fixed fraction over the rounds
      final_fraction=0.0,  # a schedule's fixed fraction at its end (<= the ratio: entries are only released)
      schedule_end=1.0,  # fraction of the rounds at which the schedule reaches final_fraction (step: drops there)
  ))
  config.server = ml_collections.ConfigDict(dict(
      learning_rate=1.0,  # SGD servers: global step = learning_rate * (weighted mean client update, with momentum)
      momentum=0.9,  # server momentum of fedavgm and '+m' algorithms (FedAvgM); 0 elsewhere
      # fedadam, fedyogi as Reddi et al. 2021 ("Adaptive Federated Optimization") run them: b2 0.99,
      # adaptivity eps (their tau) 1e-3, a server learning rate from the low end of their best range.
      adaptive_learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-3,
  ))
  config.num_rounds = 200
  config.client_fraction = 1.0  # clients sampled per round (uniformly, without replacement)
  config.local_epochs = 1  # FedPNU: the first int(local_epochs / 2) with the mask, the rest with its reverse
  config.batch_size = 128
  config.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant",
      warmup_steps=0, grad_clip=0.0))  # clients' local optimizer, fresh every round
  config.lr_decay_per_round = 0.99  # local learning rate x this every round
  config.client_batch = 0  # clients trained side by side; 0 = all on GPU/TPU, one at a time on CPU
  config.data_seed = 0  # client data orders derive from (data_seed, round, client)
  config.sample_seed = 0  # sampled clients derive from (sample_seed, round)
  config.eval_every = 1  # rounds between test evaluations of the global model (and the last round)
  config.eval_batch_size = 1000
  config.client_eval = True  # also the test set reweighted to each client's label mix (local accuracy)
  config.checkpoint = loader.checkpoint_config()
  config.final_rounds = 5  # reported accuracy = mean over the last this many evaluations (as the authors)
  config.overwrite = False  # replace an earlier run (kept as WORKDIR.previous-* once the new one is complete)
  return loader.apply_preset(config, arg)
