"""Defaults shared by `soup` and `cold`: models fine-tuned from one base (a small ViT).

Not a runnable config: configs/default_soup.py and configs/default_cold.py build on it.
Meanings and allowed values of every key: docs/config_keys.md (from tna_jax/config/schema.py).
"""

import ml_collections

from tna_jax.config import loader

# The `quick` preset (alias `runlocal`): a tiny run for smoke tests and CI; soup and cold add their own keys.
QUICK = {"num_test": 500, "model.depth": 1, "model.width": 16, "model.num_heads": 2, "model.mlp_dim": 32,
         "pretrain.num_train": 1024, "pretrain.num_epochs": 1}


def get_config():
  config = ml_collections.ConfigDict()
  config.dataset = "fashion_mnist"  # an image dataset of tna_jax.core.data, text_files, or 'glue' (cold only)
  config.data_dir = ""
  config.num_test = 0  # 0 = the whole test split; n = the first n
  config.model = ml_collections.ConfigDict(dict(
      name="vit",  # vit | text_transformer
      patch_size=7,  # vit
      depth=3,  # encoder blocks
      width=48,  # token embedding width
      num_heads=4,
      mlp_dim=96,  # hidden units of each encoder MLP
      pool="tok",  # tok (class token) | gap (mean over tokens)
      vocab_size=256,  # text_transformer: bytes
      lora_rank=0,  # LoRA adapters on every encoder Dense layer; 0 = none
      lora_alpha=16.0,
  ))
  config.init_seed = 0  # the base's initialization, and the one head init every fine-tuned model shares
  config.data_seed = 1  # fine-tuned model i sees data order data_seed + i
  config.base = ml_collections.ConfigDict(dict(
      source="pretrain",  # init | pretrain | orbax | big_vision_npz | hf (a Hugging Face checkpoint)
      path="",  # checkpoint directory (orbax, hf) or .npz file (big_vision_npz)
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
      exclude="", seed=0,
      select="random"))  # random | magnitude_small | magnitude_large (by |w| of the base)
  config.finetune = ml_collections.ConfigDict(dict(
      trainable="",  # regex of parameters that train ('' = all; 'lora|head' = LoRA fine-tuning)
  ))
  # Merging operators (tna_jax.fusion.merging) of soup.methods and cold.merge; defaults: mergekit's lambda and
  # normalize, TIES's top-20 % density, DARE combined as mergekit's dare_ties.
  config.merging = ml_collections.ConfigDict({
      "lambda": 1.0,  # base + lambda * merged task vector
      "normalize": True,  # weights sum to 1: the mean task vector (task arithmetic), the disjoint mean (TIES)
      "density": 0.2,  # TIES: fraction of each task vector's entries kept per leaf, by magnitude
      "drop_rate": 0.5,  # DARE: drop probability p; survivors x 1/(1-p)
      "dare_combine": "ties",  # DARE: task_arithmetic | ties
      "seed": 0,  # DARE: seed of the drop
  })
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3, momentum=0.9, nesterov=False, weight_decay=1e-4, schedule="constant",
      warmup_steps=0, grad_clip=1.0))
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.checkpoint = loader.checkpoint_config()
  config.overwrite = False  # replace an earlier run (kept as WORKDIR.previous-* once the new one is complete)
  return config
