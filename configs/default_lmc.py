"""Defaults of the `lmc` experiment: vanilla vs TNA-PFN vs pruning-at-init, measured by LMC
barriers (an MLP on the embedded Fashion-MNIST). Every lmc config starts from these.

Meanings and allowed values of every key: docs/config_keys.md (from tna_jax/config/schema.py).

python -m tna_jax.main --config=configs/default_lmc.py --workdir=workdirs/lmc
"""

import ml_collections

from tna_jax.config import loader

# The `quick` preset (alias `runlocal`): a tiny run for smoke tests and CI.
QUICK = {"num_train": 2048, "num_test": 1000, "num_epochs": 1, "lmc.num_alphas": 5, "lmc.reset_batches": 2}


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.experiment = "lmc"
  config.dataset = "fashion_mnist"
  config.data_dir = ""  # '' = the Debian package's directory for fashion_mnist; a TFDS data_dir otherwise
  config.num_train = 0  # 0 = all training examples; n = the first n (quick runs)
  config.num_test = 0
  config.max_len = 128  # text_files: tokens per example

  config.model = ml_collections.ConfigDict(dict(
      name="mlp",
      init="flax",  # flax | torch (the authors' PyTorch defaults) | he: see docs/config_keys.md
      depth=2,  # mlp: hidden layers
      width=200,  # mlp: units per hidden layer
      width_multiplier=1.0,  # cnn, resnet20, vgg*: channels times this
      norm="batchnorm",  # resnet20: batchnorm | layernorm | none
  ))

  # Where every model starts: init (the seeded initialization) or hf (a Hugging Face checkpoint in base.path,
  # fine-tuned num_models times: the LMC of pretrained models).
  config.base = ml_collections.ConfigDict(dict(source="init", path=""))
  config.init_seed = 0  # one initialization shared by every model
  config.data_seed = 1  # model i of a variant sees data order data_seed + i
  config.num_models = 2  # models per variant; the LMC pair is models 0 and 1 (all K: barrier matrix, fusion)
  config.variants = "vanilla,tna,pruning"  # also: wasym, sigma_asym (Lim et al.'s symmetry-breaking nets)
  config.mask = ml_collections.ConfigDict(dict(
      fixed_fraction=0.4,  # fraction of entries held at their initial values (the paper's mask ratio)
      granularity="weight",  # weight | neuron
      include="",  # regex on parameter paths ('Dense_0/kernel'); '' = all
      exclude="",
      seed=0,
      select="random",  # random | magnitude_small | magnitude_large (by |w| of a pretrained base: base.source=hf)
      schedule="constant",  # constant | linear | cosine | step: the fixed fraction over training (tna only)
      final_fraction=0.0,  # a schedule's fixed fraction at its end (<= fixed_fraction: entries are only released)
      schedule_end=1.0,  # fraction of training at which the schedule reaches final_fraction (step: drops there)
  ))
  config.pruning_fraction = 0.4  # entries zeroed at init and kept zero by the 'pruning' variant
  # W-Asymmetric nets (variant 'wasym', Lim et al. 2024): per unit, this many fan-in entries fixed at scale * N(0, 1).
  # 64 and 1 are the authors' MLP choices (with LayerNorm); see tna_jax/core/asymmetric.py.
  config.wasym = ml_collections.ConfigDict(dict(fixed_per_unit=64, scale=1.0, seed=0))
  # σ-Asymmetric nets (variant 'sigma_asym', MLP only): relu -> FiGLU sigmoid(x F) * x, F = scale * N(0, 1) fixed.
  config.sigma_asym = ml_collections.ConfigDict(dict(scale=1.0))

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
  config.checkpoint = loader.checkpoint_config()
  config.overwrite = False  # replace an earlier run (kept as WORKDIR.previous-* once the new one is complete)
  return loader.apply_preset(config, arg)
