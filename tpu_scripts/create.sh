#!/usr/bin/env bash
# Create the TPU slice as a queued resource (or a plain TPU VM with --no-queue).
#   TPU_NAME=appo ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 tpu_scripts/create.sh [--spot] [--wait]
# Options:
#   --spot         Spot capacity (cheaper, preemptible at any time; watch.sh recreates the slice)
#   --no-queue     gcloud compute tpus tpu-vm create instead of a queued resource (then also QUEUED=0 or
#                  --no-queue for delete.sh / status.sh / watch.sh)
#   --preemptible  with --no-queue: a legacy preemptible TPU VM (queued resources take --spot)
#   --wait         return once the slice is ACTIVE / READY (polls every POLL seconds, default 60)
#   --dry-run      print the gcloud commands instead of running them (also DRY_RUN=1)
# The runtime version follows ACCELERATOR_TYPE: v4-N tpu-ubuntu2204-base, v5litepod-N v2-alpha-tpuv5-lite,
# v5p-N v2-alpha-tpuv5, v6e-N v2-alpha-tpuv6e; RUNTIME_VERSION overrides it.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

spot=0 preemptible=0 wait=0
while (($#)); do
  if common_flag "$1"; then shift; continue; fi
  case "$1" in
    --spot) spot=1 ;;
    --preemptible) preemptible=1 ;;
    --no-queue) QUEUED=0 ;;
    --wait) wait=1 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
require TPU_NAME ZONE ACCELERATOR_TYPE
version="$(runtime_version)"
((spot + preemptible < 2)) || die "give --spot or --preemptible, not both"

if [[ "$QUEUED" == 1 ]]; then
  ((!preemptible)) || die "--preemptible needs --no-queue; queued resources take --spot"
  flags=()
  ((!spot)) || flags+=(--spot)
  queued create "$QR_NAME" --node-id "$TPU_NAME" --accelerator-type "$ACCELERATOR_TYPE" \
    --runtime-version "$version" "${flags[@]}"
else
  flags=()
  ((!spot)) || flags+=(--spot)
  ((!preemptible)) || flags+=(--preemptible)
  tpu_vm create "$TPU_NAME" --accelerator-type "$ACCELERATOR_TYPE" --version "$version" "${flags[@]}"
fi

if ((wait)); then
  : "${POLL:=60}"
  while :; do
    state="$(tpu_state)"
    case "$state" in
      ACTIVE | READY | DRY_RUN) break ;;
      FAILED | SUSPENDED | SUSPENDING | PREEMPTED | TERMINATED | NOT_FOUND) die "$TPU_NAME is $state" ;;
      *) note "$TPU_NAME is $state; checking again in ${POLL}s" ;;
    esac
    sleep "$POLL"
  done
  note "$TPU_NAME is ready"
fi
