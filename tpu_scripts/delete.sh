#!/usr/bin/env bash
# Delete the slice: the queued resource and its TPU VM (or, with --no-queue / QUEUED=0, the plain TPU VM).
#   TPU_NAME=appo ZONE=us-east5-a tpu_scripts/delete.sh [--no-queue] [--dry-run]
# Checkpoints and metrics on a gs:// WORKDIR stay; fetch.sh what lives only on the workers first.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

parse_common_flags --queue-flag "$@"
require TPU_NAME ZONE

if [[ "$QUEUED" == 1 ]]; then
  queued delete "$QR_NAME" --force --quiet  # --force deletes the TPU VM with it
else
  tpu_vm delete "$TPU_NAME" --quiet
fi
