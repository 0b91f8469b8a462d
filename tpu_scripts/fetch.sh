#!/usr/bin/env bash
# Copy the run's outputs (checkpoints/, metrics.jsonl, tensorboard/, rollouts/, config.json) to DEST/<last part
# of WORKDIR> (DEST default: runs/tpu): from a gs:// WORKDIR with `gcloud storage cp -r`, from a shared-path
# WORKDIR through worker 0 (gcloud compute tpus tpu-vm scp --recurse; needs TPU_NAME and ZONE).
#   WORKDIR=gs://BUCKET/appo/run1 tpu_scripts/fetch.sh [DEST] [--metrics-only]
# --metrics-only copies metrics.jsonl and config.json only (the checkpoints of a 7B policy take about 100 GB).
# --dry-run prints the commands instead of running them (also DRY_RUN=1).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

dest="" metrics_only=0
while (($#)); do
  if common_flag "$1"; then shift; continue; fi
  case "$1" in
    --metrics-only) metrics_only=1 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$dest" ]] || die "give one destination, got $dest and $1"; dest="$1" ;;
  esac
  shift
done
require WORKDIR
check_workdir
run_dir="${WORKDIR%/}"
: "${dest:=runs/tpu}"
local_dir="${dest%/}/$(basename "$run_dir")"

if [[ "$run_dir" == gs://* ]]; then
  if ((metrics_only)); then
    run mkdir -p "$local_dir"
    run gcloud storage cp "$run_dir/metrics.jsonl" "$run_dir/config.json" "$local_dir/"
  else
    run mkdir -p "$dest"
    run gcloud storage cp -r "$run_dir" "$dest/"
  fi
else
  require TPU_NAME ZONE
  if ((metrics_only)); then
    run mkdir -p "$local_dir"
    tpu_vm scp "$TPU_NAME:$run_dir/metrics.jsonl" "$TPU_NAME:$run_dir/config.json" "$local_dir/" --worker=0
  else
    run mkdir -p "$dest"
    tpu_vm scp --recurse "$TPU_NAME:$run_dir" "$dest/" --worker=0
  fi
fi
note "copied to $local_dir"
