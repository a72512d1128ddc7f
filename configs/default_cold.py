"""Defaults of the `cold` experiment: ColD fusion rounds over Fashion-MNIST label tasks; the
fine-tuning keys come from configs/default_finetune.py. Every cold config starts from these.

Meanings and allowed values of every key: docs/config_keys.md (from tna_jax/config/schema.py).
"""

import ml_collections

from tna_jax.config import loader

# The `quick` preset (alias `runlocal`): a tiny run for smoke tests and CI.
QUICK = {**loader.quick_overrides("finetune"), "cold.rounds": 1, "cold.epochs_per_round": 1,
         "cold.examples_per_task": 256, "cold.start": 1024, "cold.max_len": 32}


def get_config(arg=None):
  config = loader.defaults("finetune")
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
      merge="uniform",  # fusion of the contributors: uniform (their mean) | task_arithmetic | ties | dare (merging.*)
  ))
  return loader.apply_preset(config, arg)
