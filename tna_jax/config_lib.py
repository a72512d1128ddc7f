"""Shared config defaults and presets; each file in configs/ starts from these.

Presets are the `arg` of `get_config(arg)`, given as `--config=configs/NAME.py:quick`:
  quick (alias runlocal): a tiny run for smoke tests and CI (few examples, 1 epoch).
"""

import ml_collections

PRESETS = ("quick", "runlocal")


def lmc_config() -> ml_collections.ConfigDict:
  """Defaults of the `lmc` experiment (an MLP on the embedded Fashion-MNIST)."""
  config = ml_collections.ConfigDict()
  config.experiment = "lmc"
  config.dataset = "fashion_mnist"
  config.data_dir = ""  # '' = the Debian package's directory for fashion_mnist; a TFDS data_dir otherwise
  config.num_train = 0  # 0 = all training examples; n = the first n (quick runs)
  config.num_test = 0

  config.model = ml_collections.ConfigDict(dict(name="mlp", depth=2, width=200, width_multiplier=1.0, norm="batchnorm"))

  config.init_seed = 0  # one initialization shared by every model
  config.data_seed = 1  # model i of a variant sees data order data_seed + i
  config.num_models = 2  # models per variant; the LMC pair is models 0 and 1
  config.variants = "vanilla,tna,pruning"
  config.mask = ml_collections.ConfigDict(dict(
      fixed_fraction=0.4,  # fraction of entries held at their initial values (the paper's mask ratio)
      granularity="weight",  # weight | neuron
      include="",  # regex on parameter paths ('Dense_0/kernel'); '' = all
      exclude="",
      seed=0,
  ))
  config.pruning_fraction = 0.4  # entries zeroed at init and kept zero by the 'pruning' variant

  config.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant",
      warmup_steps=0, grad_clip=0.0))
  config.num_epochs = 10
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.eval_every = 1  # epochs between test evaluations during training (the last epoch is always evaluated)
  config.augment = ml_collections.ConfigDict(dict(flip=False, crop_padding=0))  # the paper used none

  config.lmc = ml_collections.ConfigDict(dict(
      num_alphas=21,  # grid from 0 to 1, endpoints included
      alpha_chunk=0,  # alphas evaluated at once; 0 = all on GPU/TPU, one at a time on CPU
      bn_modes="raw,reset",  # BatchNorm models: interpolate running stats, and/or re-estimate them per alpha
      reset_batches=20,  # training batches used to re-estimate BatchNorm statistics (and by REPAIR)
  ))
  # Post-hoc alignment: model 1 of each pair permuted onto model 0, every curve measured again.
  config.align = "none"  # none | weight (Git Re-Basin weight matching) | activation (correlation matching)
  config.repair = False  # also measure every curve with REPAIR (channel statistics rescaled at each alpha)
  config.matching = ml_collections.ConfigDict(dict(
      solver="auto",  # auto | hungarian (optax, on device) | scipy (host); auto = scipy on CPU, hungarian elsewhere
      max_iterations=100,  # weight matching: at most this many coordinate-descent sweeps
      seed=0,  # weight matching: order in which each sweep visits the permutations
      batches=20,  # activation matching: training batches whose activations are correlated
  ))
  config.checkpoint = checkpoint_config()
  config.overwrite = False  # replace an earlier run (kept as WORKDIR.previous-* once the new one is complete)
  return config


def checkpoint_config() -> ml_collections.ConfigDict:
  """When a run checkpoints its resumable phases (epochs or rounds); a killed run resumes
  from the last one when the same command runs again."""
  return ml_collections.ConfigDict(dict(
      every=1,  # steps (epochs or rounds) between checkpoints; the last step is always saved
      every_minutes=0.0,  # also save when this many minutes passed since the last save; 0 = off
      keep=2,  # checkpoints kept per phase (older ones are deleted)
  ))


def apply_preset(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the comma-separated presets in `arg` (see module docstring)."""
  from tna_jax.errors import check_choice  # pylint: disable=g-import-not-at-top
  for preset in filter(None, (arg or "").split(",")):
    check_choice("config preset", preset, PRESETS)
    config.num_train, config.num_test = 2048, 1000
    config.num_epochs = 1
    config.lmc.num_alphas = 5
    config.lmc.reset_batches = 2
  return config


def finetune_config() -> ml_collections.ConfigDict:
  """Defaults shared by `soup` and `cold`: models fine-tuned from one base (a small ViT)."""
  config = ml_collections.ConfigDict()
  config.dataset = "fashion_mnist"  # an image dataset of tna_jax.data, or 'glue' (cold only)
  config.data_dir = ""
  config.num_test = 0  # 0 = the whole test split; n = the first n
  config.model = ml_collections.ConfigDict(dict(
      name="vit", patch_size=7, depth=3, width=48, num_heads=4, mlp_dim=96, pool="tok", vocab_size=256,
      lora_rank=0, lora_alpha=16.0))
  config.init_seed = 0  # the base's initialization, and the one head init every fine-tuned model shares
  config.data_seed = 1  # fine-tuned model i sees data order data_seed + i
  config.base = ml_collections.ConfigDict(dict(
      source="pretrain",  # init | pretrain | orbax | big_vision_npz
      path="",  # checkpoint directory (orbax) or .npz file (big_vision_npz)
      reinit="^head/",  # regex of parameter paths that keep their fresh initialization
  ))
  config.pretrain = ml_collections.ConfigDict(dict(
      start=0, num_train=10000,  # training examples [start, start + num_train) of the dataset ...
      classes="0/1/2/3/4",  # ... relabeled: '/'-separated groups of '+'-joined classes; '' = all classes
      num_epochs=8, batch_size=128, data_seed=100,
      optimizer=ml_collections.ConfigDict(dict(
          name="adamw", learning_rate=1e-3, momentum=0.9, nesterov=False, weight_decay=1e-4, schedule="cosine",
          warmup_steps=100, grad_clip=1.0)),
  ))
  config.variants = "vanilla,tna"  # fine-tune without and with one shared TNA-PFN mask
  config.mask = ml_collections.ConfigDict(dict(
      fixed_fraction=0.4, granularity="weight",
      include="",  # regex on parameter paths; 'lora' = anchors among the LoRA adapters only
      exclude="", seed=0))
  config.finetune = ml_collections.ConfigDict(dict(
      trainable="",  # regex of parameters that train ('' = all; 'lora|head' = LoRA fine-tuning)
  ))
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3, momentum=0.9, nesterov=False, weight_decay=1e-4, schedule="constant",
      warmup_steps=0, grad_clip=1.0))
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.checkpoint = checkpoint_config()
  config.overwrite = False  # replace an earlier run (kept as WORKDIR.previous-* once the new one is complete)
  return config


def soup_config() -> ml_collections.ConfigDict:
  """Defaults of the `soup` experiment: K fine-tuned ViTs, uniform and greedy soups."""
  config = finetune_config()
  config.experiment = "soup"
  config.split = ml_collections.ConfigDict(dict(
      start=10000,  # fine-tuning data: training examples [start, start + num_train) ...
      num_train=4000,
      num_heldout=2000,  # ... and the next num_heldout, the held-out split that ranks models and greedy soups
  ))
  config.soup = ml_collections.ConfigDict(dict(
      num_models=8,
      # Each model draws one value of each list (seeded by hparam_seed); data order data_seed + k.
      lr_factors="0.3,1,3",  # multiplies optimizer.learning_rate
      epochs="2,4",
      augment="none,flip",  # none | flip | crop | flip+crop
      crop_padding=2,
      hparam_seed=0,
  ))
  return config


def cold_config() -> ml_collections.ConfigDict:
  """Defaults of the `cold` experiment: ColD fusion rounds over Fashion-MNIST label tasks."""
  config = finetune_config()
  config.experiment = "cold"
  config.cold = ml_collections.ConfigDict(dict(
      # Contributors' tasks, ','-separated. Image datasets: a relabeling each ('/'-separated
      # groups of '+'-joined classes); glue: task names (sst2, qnli, ...).
      tasks="0/1/2/3/4,5/6/7/8/9,0+2+4+6/1+3/5+7+9/8,0/2/4/6",
      unseen_tasks="0/1/2/3/4/5/6/7/8/9",  # fine-tuned from every round's base, never fused
      rounds=4,  # fusions; every task is fine-tuned rounds + 1 times (round 0 = from the original base)
      epochs_per_round=2,
      examples_per_task=2000,  # each task's own training examples
      start=10000,  # image datasets: task i draws from training examples [start + i * pool, ...)
      max_len=128,  # glue: bytes per example
  ))
  return config


FUSION_PRESETS = ("quick", "runlocal")


def apply_fusion_preset(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """The presets of `soup` and `cold` configs (`quick`: a tiny run for smoke tests and CI)."""
  from tna_jax.errors import check_choice  # pylint: disable=g-import-not-at-top
  for preset in filter(None, (arg or "").split(",")):
    check_choice("config preset", preset, FUSION_PRESETS)
    config.num_test = 500
    config.model.update(depth=1, width=16, num_heads=2, mlp_dim=32)
    config.pretrain.update(num_train=1024, num_epochs=1)
    if "soup" in config:
      config.split.update(start=1024, num_train=512, num_heldout=256)
      config.soup.update(num_models=3, epochs="1")
    if "cold" in config:
      config.cold.update(rounds=1, epochs_per_round=1, examples_per_task=256, start=1024, max_len=32)
  return config


def fed_config() -> ml_collections.ConfigDict:
  """Defaults of the `fed` experiment: the authors' federated setting (20 clients, Dirichlet
  0.5 label skew, SGD 0.1 with momentum 0.9 and weight decay 5e-4, lr x0.99 per round)."""
  config = ml_collections.ConfigDict()
  config.experiment = "fed"
  config.dataset = "fashion_mnist"
  config.data_dir = ""  # '' = the Debian package's directory for fashion_mnist; a TFDS data_dir otherwise
  config.num_train = 0  # 0 = all training examples; n = the first n
  config.num_test = 0
  config.model = ml_collections.ConfigDict(dict(name="cnn", depth=2, width=200, width_multiplier=1, norm="batchnorm"))
  config.init_seed = 0  # one initialization shared by every algorithm
  config.partition = ml_collections.ConfigDict(dict(
      kind="dirichlet",  # iid | dirichlet (per class, shares from Dir(alpha) over clients) | shards (k classes each)
      num_clients=20,
      alpha=0.5,  # dirichlet: smaller = more skewed
      classes_per_client=2,  # shards: classes each client holds
      min_client_size=10,  # dirichlet redraws until every client has this many examples; others raise
      seed=0,
  ))
  # Comma-separated: fedavg, fedprox, fedpfn, fedpnu, fedavgm; '+prox' adds the proximal
  # term, '+m' server momentum (e.g. fedpfn+prox).
  config.algorithms = "fedavg,fedprox,fedpfn,fedpnu"
  config.prox_mu = 0.01  # FedProx (and '+prox') proximal weight
  config.mask = ml_collections.ConfigDict(dict(
      fixed_fraction=0.4,  # FedPFN/FedPNU: fraction of entries clients hold fixed (the paper's mask ratio)
      granularity="weight", include="", exclude="", seed=0,
      redraw="fixed",  # fixed: one mask for the run | per_round: the server draws a new one every round
  ))
  config.server = ml_collections.ConfigDict(dict(
      learning_rate=1.0,  # global step = learning_rate * (weighted mean client update, with momentum)
      momentum=0.9,  # server momentum of fedavgm and '+m' algorithms (FedAvgM); 0 elsewhere
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
  config.checkpoint = checkpoint_config()
  config.final_rounds = 5  # reported accuracy = mean over the last this many evaluations (as the authors)
  config.overwrite = False  # replace an earlier run (kept as WORKDIR.previous-* once the new one is complete)
  return config


def apply_fed_preset(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """The presets of `fed` configs (`quick`: a tiny run for smoke tests and CI)."""
  from tna_jax.errors import check_choice  # pylint: disable=g-import-not-at-top
  for preset in filter(None, (arg or "").split(",")):
    check_choice("config preset", preset, PRESETS)
    config.num_train, config.num_test = 1000, 500
    config.partition.num_clients = 4
    config.num_rounds = 2
    config.batch_size = 32
    config.final_rounds = 2
  return config
