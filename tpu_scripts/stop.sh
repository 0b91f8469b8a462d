#!/usr/bin/env bash
# Stop the trainer on every worker without deleting the slice: SIGINT, then SIGKILL after GRACE seconds
# (default 60) for a worker whose trainer is still running.
#   TPU_NAME=appo ZONE=us-east5-a tpu_scripts/stop.sh [--dry-run]
# Continue later with launch.sh CONFIG ... --resume (from the last complete checkpoint).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

parse_common_flags "$@"
require TPU_NAME ZONE
: "${GRACE:=60}"
[[ "$GRACE" =~ ^[0-9]+$ ]] || die "GRACE=$GRACE must be a whole number of seconds"

on_all_workers "pkill -INT -f '$TRAINER_PATTERN' || { echo \"\$(hostname): no trainer running\"; exit 0; }; \
for _ in \$(seq $GRACE); do pgrep -f '$TRAINER_PATTERN' >/dev/null || { echo \"\$(hostname): trainer stopped\"; exit 0; }; sleep 1; done; \
pkill -KILL -f '$TRAINER_PATTERN' || true; echo \"\$(hostname): trainer killed after ${GRACE}s\""
