"""Runs one experiment from a config file.

  python -m tna_jax.main --config=configs/fmnist_mlp.py --workdir=/tmp/run
  python -m tna_jax.main --config=configs/fmnist_mlp.py:quick --config.num_epochs=2

Errors in the user's input (config values, missing data) end the run with one message and
exit code 2, before anything is written.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tna_jax import experiments
from tna_jax.errors import TnaError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, plots and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  logging.info("Config:\n%s", config)
  try:
    experiments.get_experiment(config.experiment)(config, _WORKDIR.value)
  except TnaError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
