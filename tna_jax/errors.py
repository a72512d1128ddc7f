"""User-facing errors.

`main` turns these into one clear message on stderr and a non-zero exit code instead of a
traceback, so every check of user input raises one of them with the bad value and what is
allowed.
"""


class TnaError(Exception):
  """Base class of errors caused by the user's input or the run's own course (a diverged
  loss, a corrupt checkpoint) rather than by a bug; `exit_code` is what `main` exits with."""

  exit_code = 2


class ConfigError(TnaError, ValueError):
  """A config value is unknown or out of range."""


class DivergedError(TnaError):
  """Training produced a non-finite loss (or a curve a non-finite point); the last good
  checkpoint is kept and no results are written."""

  exit_code = 3


class DataNotFoundError(TnaError, FileNotFoundError):
  """A dataset is not on this machine; the message says how to provide it."""


def check_choice(name: str, value, allowed) -> None:
  """Raises ConfigError unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ConfigError(f"{name}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}.")
