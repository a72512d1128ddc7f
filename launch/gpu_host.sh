#!/usr/bin/env bash
# Runs one config on a single multi-GPU host.
#
#   launch/gpu_host.sh --config configs/resnet20.py --workdir /tmp/tna_run [--gpus 0,1,2,3] [--dry-run]
#
# By default ONE process drives every visible GPU: the mesh spans them all, batches are
# split over the 'data' axis and the vmapped models over 'models' (see tna_jax.core.sharding).
# --processes N starts N processes instead, one per GPU, joined by jax.distributed on
# 127.0.0.1 (the multi-host code path, handy to test it on one machine); process 0 writes.
# --install first installs jax[cuda12] and this checkout. Each command is printed before it
# runs; --dry-run only prints them. Extra arguments after `--` go to tna_jax.main.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

CONFIG="" WORKDIR="" GPUS="" PROCESSES=1 PORT=12355 INSTALL=0 EXTRA=()
while (($#)); do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --processes) PROCESSES="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown argument $1" >&2; usage 2 ;;
  esac
done
require CONFIG WORKDIR
[[ "$PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "--processes=$PROCESSES must be a positive integer."

cd "$REPO"
if ((INSTALL)); then
  run python3 -m pip install -U "jax[cuda12]"
  run python3 -m pip install -e "$REPO"
fi
if ((PROCESSES == 1)); then
  ENV=()
  [[ -z "$GPUS" ]] || ENV=(env CUDA_VISIBLE_DEVICES="$GPUS")  # default: every GPU of the host
  run "${ENV[@]}" python3 -m tna_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" --distributed=off "${EXTRA[@]}"
  exit 0
fi
if [[ -z "$GPUS" ]]; then  # one process per GPU: 0..PROCESSES-1
  GPUS="$(seq -s, 0 $((PROCESSES - 1)))"
fi
IFS=, read -r -a GPU_LIST <<<"$GPUS"
((PROCESSES == ${#GPU_LIST[@]})) || die "--processes=$PROCESSES needs as many GPUs, got --gpus=$GPUS."
for ((i = 0; i < PROCESSES; i++)); do
  run_bg env CUDA_VISIBLE_DEVICES="${GPU_LIST[i]}" JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" \
    JAX_NUM_PROCESSES="$PROCESSES" JAX_PROCESS_ID="$i" python3 -m tna_jax.main "--config=$CONFIG" \
    "--workdir=$WORKDIR" --distributed=on "${EXTRA[@]}"
done
STATUS=0
while ((PROCESSES > 0)) && [[ "$DRY_RUN" != 1 ]]; do
  wait -n || STATUS=$?
  PROCESSES=$((PROCESSES - 1))
done
exit "$STATUS"
