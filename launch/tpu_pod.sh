#!/usr/bin/env bash
# Creates a Cloud TPU VM slice and runs one config on every worker of it.
#
#   launch/tpu_pod.sh --name my-v4 --zone us-central2-b --accelerator v4-32 \
#       --config configs/fmnist_mlp.py --workdir /tmp/tna_run [--dry-run]
#
# Steps (each printed before it runs; --dry-run only prints them):
#   1. gcloud compute tpus tpu-vm create   (skipped with --skip-create)
#   2. copy this checkout (git archive HEAD) to every worker and install it with jax[tpu]
#   3. run `python3 -m tna_jax.main` on every worker at once (--worker=all) with
#      TNA_DISTRIBUTED=1: the workers join through jax.distributed (JAX finds the
#      coordinator from the TPU metadata), each reads its own share of the data, and
#      worker 0 alone writes results, plots and checkpoints under --workdir
#   4. with --fetch DIR: copy worker 0's workdir back here
#   5. with --delete: delete the slice
# Extra arguments after `--` go to tna_jax.main (e.g. -- --config.num_epochs=20).
#
# --spot creates a Spot (preemptible) slice. A run that is preempted resumes: run the SAME
# command again (the slice is recreated, or pass --skip-create if it still exists) and every
# experiment continues from its last checkpoint, ending bit-identical to an uninterrupted run
# on the same machine type. Give a --workdir that outlives the VMs, a gs:// bucket
# (e.g. --workdir gs://my-bucket/runs/resnet20); checkpoint more often with
# -- --config.checkpoint.every=N or --config.checkpoint.every_minutes=M.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

NAME="" ZONE="" ACCELERATOR="" CONFIG="" WORKDIR="" PROJECT="" FETCH=""
VERSION="tpu-ubuntu2204-base" SPOT=0 SKIP_CREATE=0 DELETE=0 EXTRA=()
while (($#)); do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --accelerator) ACCELERATOR="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --fetch) FETCH="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --skip-create) SKIP_CREATE=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown argument $1" >&2; usage 2 ;;
  esac
done
require NAME ZONE CONFIG WORKDIR
((SKIP_CREATE)) || [[ -n "$ACCELERATOR" ]] || die "--accelerator is required unless --skip-create (e.g. v4-32)."

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || WHERE+=(--project="$PROJECT")
TARBALL="/tmp/tna_jax-$NAME.tar.gz"

if ((!SKIP_CREATE)); then
  CREATE=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
  ((SPOT)) && CREATE+=(--spot)
  run "${CREATE[@]}"
fi
run git -C "$REPO" archive --format=tar.gz --output="$TARBALL" HEAD
run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:~/tna_jax.tar.gz" "${WHERE[@]}" --worker=all
SETUP="mkdir -p ~/tna_jax && tar -xzf ~/tna_jax.tar.gz -C ~/tna_jax"
SETUP+=" && (sudo apt-get update -q && sudo apt-get install -y dataset-fashion-mnist || true)"
SETUP+=' && pip install -U "jax[tpu]" && pip install -e ~/tna_jax'
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$SETUP"
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
  --command="cd ~/tna_jax && TNA_DISTRIBUTED=1 $(main_command "$CONFIG" "$WORKDIR" "${EXTRA[@]}")"
if [[ -n "$FETCH" ]]; then
  run "${GCLOUD[@]}" scp --recurse "$NAME:$WORKDIR" "$FETCH" "${WHERE[@]}" --worker=0
fi
if ((DELETE)); then
  run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
fi
