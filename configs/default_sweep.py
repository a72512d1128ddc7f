"""Defaults of the `sweep` experiment: a grid of lmc runs over seeds (the paper's figures).
Every key of the lmc experiment (configs/default_lmc.py) is here with its default, plus
the `sweep` section; every sweep config starts from these.

Meanings and allowed values of every key: docs/config_keys.md (from tna_jax/config/schema.py).

python -m tna_jax.main --config=configs/default_sweep.py --workdir=workdirs/sweep
"""

import ml_collections

from tna_jax.config import loader

# The `quick` preset (alias `runlocal`): a tiny run for smoke tests and CI.
QUICK = {"num_train": 1024, "num_test": 500, "num_epochs": 1, "lmc.num_alphas": 3, "lmc.reset_batches": 2,
         "sweep.seeds": 2}


def get_config(arg=None):
  config = loader.defaults("lmc")
  config.experiment = "sweep"
  config.eval_every = 1000  # the sweep reads its models' accuracies from the curves: evaluate the last epoch only
  config.sweep = ml_collections.ConfigDict(dict(
      # Axes 'KEY=V1,V2,...' separated by ';'; 'KEY1+KEY2=...' sets both keys to each value.
      grid="mask.fixed_fraction+pruning_fraction=0.2,0.4",
      seeds=3,  # replicates of every point (init, mask and data seeds moved by the replicate)
  ))
  return loader.apply_preset(config, arg)
