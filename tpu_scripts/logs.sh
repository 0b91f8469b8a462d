#!/usr/bin/env bash
# Follow the trainer's log (~/appo-train.log) on worker 0, or search every worker's log.
#   TPU_NAME=appo ZONE=us-east5-a tpu_scripts/logs.sh [--worker N] [--lines N]   # tail -f (Ctrl-C ends it)
#   TPU_NAME=appo ZONE=us-east5-a tpu_scripts/logs.sh --grep PATTERN             # lines matching on all workers
# --dry-run prints the gcloud command instead of running it (also DRY_RUN=1).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

worker=0 lines=100 pattern=""
while (($#)); do
  if common_flag "$1"; then shift; continue; fi
  case "$1" in
    --worker) worker="${2:?--worker needs a worker number}"; shift ;;
    --lines) lines="${2:?--lines needs a number}"; shift ;;
    --grep) pattern="${2:?--grep needs a pattern}"; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
require TPU_NAME ZONE
[[ "$worker" =~ ^[0-9]+$ ]] || die "--worker takes a worker number, got $worker"
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines takes a number, got $lines"

if [[ -n "$pattern" ]]; then
  on_all_workers "grep -n -e $(quote "$pattern") $TRAIN_LOG | sed \"s/^/\$(hostname):/\" || true"
else
  on_workers "$worker" "tail -n $lines -F $TRAIN_LOG"
fi
