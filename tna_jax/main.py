"""Runs one experiment from a config file.

  python -m tna_jax.main --config=configs/fmnist_mlp.py --workdir=/tmp/run
  python -m tna_jax.main --config=configs/fmnist_mlp.py:quick --config.num_epochs=2
  python -m tna_jax.main --config=configs/resnet20.py --dry_run   # the plan, no training

Errors in the user's input (flags, config keys and values, missing data, a busy or
finished workdir) end the run with one line on stderr and exit code 2, before anything is
written; a run that fails on its own (a diverged loss) exits with 3. Killed or preempted,
the same command resumes the run from its last checkpoint (`tna_jax.runs.runtime`).
"""

import contextlib
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tna_jax import experiments
from tna_jax.config import loader
from tna_jax.core import sharding
from tna_jax.errors import TnaError
from tna_jax.runs import reporting

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, plots and checkpoints.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the resolved config and the planned work and memory; "
                             "train nothing, write nothing.")
_DRY_RUN_DEVICE = flags.DEFINE_string("dry_run_device", None, "With --dry_run, also estimate the time on this "
                                      "accelerator (a name of tna_jax.core.flops.PEAKS, e.g. tpu_v5e, h100_sxm).")
_DRY_RUN_DEVICES = flags.DEFINE_integer("dry_run_devices", 1, "Chips of --dry_run_device (the pod or host size).")
flags.mark_flags_as_required(["config"])
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", sharding.DISTRIBUTED_MODES,
                                 "Join the other processes of a multi-host run (jax.distributed): auto = when the "
                                 "config's `distributed`, $TNA_DISTRIBUTED or a Slurm/TPU-pod/MPI environment asks.")


def fail(message: str, exit_code: int = 2) -> None:
  """Ends the program with `message` as one line on stderr."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(exit_code)


def one_line(error: BaseException) -> str:
  """An exception's message on one line: for a message that embeds a traceback (config
  files that raise while loading), its last line without the module path of the type."""
  text = str(error).strip()
  if "Traceback" in text:
    text = [line for line in text.splitlines() if line.strip()][-1].strip()
    text = re.sub(r"^[\w.]+(Error|Exception): ", "", text)
  return " ".join(text.replace("\\n", " ").split()).strip("'\"")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistake in a flag or the config file as one line, exit 2."""
  try:
    return flags.FLAGS([_resolve_config(arg, previous) for previous, arg in zip([""] + argv, argv)])
  except (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError) as e:
    fail(config_mistake(e))


def _resolve_config(arg: str, previous: str) -> str:
  """`--config=NAME` (or `--config NAME`) resolved to a packaged config's path by name."""
  if arg.startswith("--config="):
    return "--config=" + loader.resolve_config_flag(arg[len("--config="):])
  return loader.resolve_config_flag(arg) if previous == "--config" else arg


def load_config():
  """The config with its --config.KEY=VALUE overrides (some applied lazily by ml_collections)."""
  try:
    config = _CONFIG.value
    config.get("experiment")  # a config file that failed to load raises on first use
    return config
  except (AttributeError, KeyError, OSError, ValueError, TypeError) as e:
    fail(config_mistake(e))


def config_mistake(error: BaseException) -> str:
  """What went wrong with the flags or the config file, in one line."""
  if isinstance(error, (AttributeError, KeyError)):  # an override names a key the config lacks
    return f"unknown config key {one_line(error)}".replace("\\'", "'")
  if isinstance(error, OSError):  # config_flags wraps a missing file in a long report
    missing = re.search(r"No such file or directory: '([^']*)'", str(error))
    if not missing:
      return one_line(error)
    names = ", ".join(path.stem for path in loader.config_files())
    return f"config file {missing.group(1)!r} does not exist; packaged configs (by name): {names}"
  return one_line(error)


def main(argv) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax/absl INFO lines would interleave with the progress bars
    logging.set_verbosity(logging.WARNING)
  config = load_config()
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
    fail(one_line(e), e.exit_code)


def print_plan(config) -> None:
  """The --dry_run output: the config keys that apply to its experiment and model, then the
  plan as a two-column table."""
  # Imported here: both load every experiment's libraries, and `main --help` stays fast.
  from tna_jax.config import schema  # pylint: disable=g-import-not-at-top
  from tna_jax.runs import plan  # pylint: disable=g-import-not-at-top
  experiments.get_experiment(config.experiment)  # an unknown experiment fails here, clearly
  rows = [{"what": k, "value": f"{v:.1f}" if isinstance(v, float) else str(v)} for k, v in
          plan.plan(config, _DRY_RUN_DEVICE.value, _DRY_RUN_DEVICES.value).items()]
  print(schema.applicable(config))
  print(reporting.format_table(rows, (("planned", "what", "s"), ("", "value", "s"))))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
