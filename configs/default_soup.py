"""Defaults of the `soup` experiment: K fine-tuned ViTs, uniform and greedy soups (with
`align`, of post-hoc matched models too); the fine-tuning keys come from
configs/default_finetune.py. Every soup config starts from these.

Meanings and allowed values of every key: docs/config_keys.md (from tna_jax/config/schema.py).
"""

import ml_collections

from tna_jax.config import loader

# The `quick` preset (alias `runlocal`): a tiny run for smoke tests and CI.
QUICK = {**loader.quick_overrides("finetune"), "split.start": 1024, "split.num_train": 512,
         "split.num_heldout": 256, "soup.num_models": 3, "soup.epochs": "1"}


def get_config(arg=None):
  config = loader.defaults("finetune")
  config.experiment = "soup"
  config.max_len = 128  # text_files: tokens per example
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
      # Soups reported: uniform | greedy | task_arithmetic | ties | dare | greedy:<operator> (merging.* keys).
      methods="uniform,greedy",
  ))
  # Post-hoc alignment: each model permuted onto model 0 of its variant, souped again (<variant>+<align>).
  config.align = "none"  # none | weight (Git Re-Basin weight matching) | activation (correlation matching)
  config.matching = ml_collections.ConfigDict(dict(
      solver="auto",  # auto | hungarian (optax, on device) | scipy (host); auto = scipy on CPU, hungarian elsewhere
      max_iterations=100,  # weight matching: at most this many coordinate-descent sweeps
      seed=0,  # weight matching: order in which each sweep visits the permutations
      batches=20,  # activation matching: fine-tuning batches whose activations are correlated
  ))
  return loader.apply_preset(config, arg)
