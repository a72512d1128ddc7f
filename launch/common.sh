# Sourced by the launch scripts: `run CMD ARGS...` prints the exact command (shell-quoted,
# ready to paste) and runs it, or only prints it when DRY_RUN=1 (set by --dry-run).

DRY_RUN="${DRY_RUN:-0}"

# One word as the shell would need it: bare when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# All arguments quoted and joined by spaces.
quote_all() {
  local sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    quote "$word"
    sep=" "
  done
}

run() {
  quote_all "$@"
  printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

# Like run, but starts the command in the background (the caller waits for it).
run_bg() {
  quote_all "$@"
  printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@" &
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}

# Dies unless every named variable is set; variable CONFIG stands for flag --config.
require() {
  local name
  for name in "$@"; do
    [[ -n "${!name}" ]] || die "--$(tr '[:upper:]' '[:lower:]' <<<"$name") is required (see --help)."
  done
}

# The main command line every launcher runs: python -m tna_jax.main with the config, the
# workdir and any extra flags.
main_command() {
  local config="$1" workdir="$2"
  shift 2
  quote_all python3 -m tna_jax.main "--config=$config" "--workdir=$workdir" "$@"
}
