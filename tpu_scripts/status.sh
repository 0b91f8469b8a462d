#!/usr/bin/env bash
# Where the run stands: the queued resource / TPU VM state, whether the trainer runs on each worker, and the last
# line of WORKDIR/metrics.jsonl (or of worker 0's log when WORKDIR is not set).
#   TPU_NAME=appo ZONE=us-east5-a [WORKDIR=gs://BUCKET/appo/run1] tpu_scripts/status.sh [--no-queue] [--dry-run]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

parse_common_flags --queue-flag "$@"
require TPU_NAME ZONE
[[ -z "${WORKDIR:-}" ]] || check_workdir

if [[ "$QUEUED" == 1 ]]; then
  qr_state="$(describe_value queued describe "$QR_NAME" --format 'value(state.state)')"
  echo "queued resource $QR_NAME: $qr_state"
  [[ "$qr_state" == ACTIVE || "$qr_state" == DRY_RUN ]] || exit 0  # no TPU VM yet / any more
fi
vm_state="$(describe_value tpu_vm describe "$TPU_NAME" --format 'value(state)')"
echo "TPU VM $TPU_NAME: $vm_state"
[[ "$vm_state" == READY || "$vm_state" == DRY_RUN ]] || exit 0  # no workers to ask
on_all_workers "if pgrep -f '$TRAINER_PATTERN' >/dev/null; then echo \"\$(hostname): trainer running\"; \
else echo \"\$(hostname): trainer not running\"; fi" || note "ssh to the workers failed"
if [[ -z "${WORKDIR:-}" ]]; then
  last="$(on_workers 0 "tail -n 1 $TRAIN_LOG" || true)"
  echo "last log line (worker 0): $last"
elif [[ "$WORKDIR" == gs://* ]]; then
  last="$( (run gcloud storage cat "$WORKDIR/metrics.jsonl" | tail -n 1) || true)"
  echo "last metrics: $last"
else
  last="$(on_workers 0 "tail -n 1 $(quote "$WORKDIR/metrics.jsonl")" || true)"
  echo "last metrics: $last"
fi
