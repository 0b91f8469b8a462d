#!/usr/bin/env bash
# Start one experiment on every worker of the slice: `appo-jax train --distributed` in the background (nohup),
# logging to ~/appo-train.log on each worker (the previous log moves to ~/appo-train.log.1).
#   TPU_NAME=appo ZONE=us-east5-a WORKDIR=/mnt/gcs/appo/run1 tpu_scripts/launch.sh CONFIG [TRAIN_ARGS...]
#   e.g. tpu_scripts/launch.sh experiments/paper/table1_reasoning.py:qwen2.5-7b,appo --set optimizer.lr=2e-6 --resume
# TRAIN_ARGS (--set KEY=VALUE, --resume, ...) go to `appo-jax train` unchanged. WORKDIR must be shared by all
# workers (an absolute path on a shared mount: Filestore, a gcsfuse-mounted bucket) so that they write one
# checkpoint; a gs:// URL is refused (the trainer writes through the file system).
# --dry-run prints the gcloud command instead of running it (also DRY_RUN=1). Refuses to start a second trainer.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

config="" train_args=()
while (($#)); do
  if common_flag "$1"; then shift; continue; fi
  if [[ -z "$config" ]]; then
    [[ "$1" != -* ]] || die "the first argument must be the experiment config (CONFIG[:ARG]), got $1"
    config="$1"
  else
    train_args+=("$1")
  fi
  shift
done
[[ -n "$config" ]] || die "give the experiment config: launch.sh CONFIG[:ARG] [TRAIN_ARGS...] (see --help)"
require TPU_NAME ZONE WORKDIR
check_trainer_workdir

# env --default-signal=INT: a background job of a non-interactive shell starts with SIGINT ignored, and stop.sh
# stops the trainer with SIGINT (KeyboardInterrupt) first
cmd="\$HOME/$REPO_DIR/.venv/bin/appo-jax $(quote train --config "$config" --workdir "$WORKDIR" --distributed "${train_args[@]}")"
on_all_workers "cd ~/$REPO_DIR || exit 1; \
if pgrep -f '$TRAINER_PATTERN' >/dev/null; then echo \"\$(hostname): a trainer is already running (stop.sh)\" >&2; exit 1; fi; \
if [ -d ~/$DATA_DIR ]; then export APPO_DATA_DIR=~/$DATA_DIR; fi; \
if [ -f $TRAIN_LOG ]; then mv -f $TRAIN_LOG $TRAIN_LOG.1; fi; \
nohup env --default-signal=INT $cmd > $TRAIN_LOG 2>&1 < /dev/null &"
note "launched on every worker of $TPU_NAME; follow it with tpu_scripts/logs.sh, check it with tpu_scripts/status.sh"
