"""Runs one experiment from a config file.

  python -m tna_jax.main --config=configs/fmnist_mlp.py --workdir=/tmp/run
  python -m tna_jax.main --config=configs/fmnist_mlp.py:quick --config.num_epochs=2
  python -m tna_jax.main --config=configs/resnet20.py --dry_run   # the plan, no training

Errors in the user's input (config values, missing data) end the run with one message and
exit code 2, before anything is written.
"""

import contextlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tna_jax import experiments, reporting, sharding
from tna_jax.errors import TnaError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, plots and checkpoints.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the resolved config and the planned work and memory; "
                             "train nothing, write nothing.")
flags.mark_flags_as_required(["config"])
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", sharding.DISTRIBUTED_MODES,
                                 "Join the other processes of a multi-host run (jax.distributed): auto = when the "
                                 "config's `distributed`, $TNA_DISTRIBUTED or a Slurm/TPU-pod/MPI environment asks.")


def main(argv) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax/absl INFO lines would interleave with the progress bars
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  logging.info("Config:\n%s", config)
  try:
    if _DRY_RUN.value:
      print_plan(config)
      return
    if not _WORKDIR.value:
      raise app.UsageError("--workdir is required (except with --dry_run).")
    sharding.initialize_distributed(config.get("distributed", "auto") if _DISTRIBUTED.value == "auto"
                                    else _DISTRIBUTED.value)
    with contextlib.ExitStack() as stack:
      if not sharding.is_writer():  # tables and summaries come once, from process 0
        stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
      experiments.get_experiment(config.experiment)(config, _WORKDIR.value)
  except TnaError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def print_plan(config) -> None:
  """The --dry_run output: the config, then the plan as a two-column table."""
  from tna_jax import plan  # pylint: disable=g-import-not-at-top
  experiments.get_experiment(config.experiment)  # an unknown experiment fails here, clearly
  rows = [{"what": k, "value": f"{v:.1f}" if isinstance(v, float) else str(v)} for k, v in plan.plan(config).items()]
  print(config)
  print(reporting.format_table(rows, (("planned", "what", "s"), ("", "value", "s"))))


if __name__ == "__main__":
  app.run(main)
