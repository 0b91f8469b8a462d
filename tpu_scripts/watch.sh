#!/usr/bin/env bash
# Keep a run going on Spot capacity: every INTERVAL seconds (default 300) look at the slice and the trainer.
#   TPU_NAME=appo ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 WORKDIR=/mnt/gcs/appo/run1 \
#     tpu_scripts/watch.sh [--spot] [--no-queue] [--preemptible] CONFIG [TRAIN_ARGS...]
# CONFIG and TRAIN_ARGS are launch.sh's; --spot / --no-queue / --preemptible are create.sh's (used to recreate).
#   - the final checkpoint WORKDIR/checkpoints/FINAL_STEP exists: the run is complete, exit 0 (FINAL_STEP
#     defaults to train.steps of WORKDIR/config.json, which the trainer writes when it starts)
#   - slice PREEMPTED / SUSPENDED / FAILED / TERMINATED / not found: delete.sh, create.sh --wait, setup.sh,
#     launch.sh CONFIG TRAIN_ARGS --resume
#   - slice ready but the trainer not running on every worker: stop.sh, launch.sh CONFIG TRAIN_ARGS --resume
#   - slice still queued / provisioning: wait
# Gives up (exit 1) after MAX_RESTARTS recoveries (default 10). --dry-run (also DRY_RUN=1) runs one round and
# prints the commands of the checks and of the recovery of a preempted slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

create_opts=() launch_args=()
while (($#)); do
  if common_flag "$1"; then shift; continue; fi
  case "$1" in
    --spot | --preemptible) create_opts+=("$1") ;;
    --no-queue) QUEUED=0; create_opts+=("$1") ;;
    --resume) ;;  # every (re)launch resumes
    *) launch_args+=("$1") ;;
  esac
  shift
done
((${#launch_args[@]})) || die "give the experiment config: watch.sh [CREATE_OPTIONS] CONFIG[:ARG] [TRAIN_ARGS...]"
require TPU_NAME ZONE ACCELERATOR_TYPE WORKDIR
check_trainer_workdir
runtime_version >/dev/null  # an unknown accelerator family fails now, not at the first preemption
: "${INTERVAL:=300}" "${MAX_RESTARTS:=10}"
[[ "$INTERVAL" =~ ^[0-9]+$ && "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "INTERVAL and MAX_RESTARTS must be whole numbers"
run_dir="${WORKDIR%/}"

# train.steps of the run (FINAL_STEP overrides it); empty while WORKDIR/config.json cannot be read.
final_step() {
  local json
  if [[ -n "${FINAL_STEP:-}" ]]; then echo "$FINAL_STEP"; return; fi
  json="$(on_workers 0 "cat $(quote "$run_dir/config.json")" 2>/dev/null || true)"
  if is_dry_run; then echo TRAIN_STEPS; return; fi
  [[ -n "$json" ]] || return 0
  printf '%s' "$json" | python3 -c 'import json, sys; print(int(json.load(sys.stdin)["train"]["steps"]))' \
    2>/dev/null || true
}

# Whether the final checkpoint is complete (Orbax renames a checkpoint into place only once it is complete).
finished() {
  local step
  step="$(final_step)"
  [[ -n "$step" ]] || return 1
  on_workers 0 "test -d $(quote "$run_dir/checkpoints/$step")" >/dev/null 2>&1 || return 1
  ! is_dry_run
}

# Prints "RUNNING STOPPED": on how many workers the trainer runs / does not; nothing when ssh fails.
trainer_counts() {
  local out
  out="$(on_all_workers "if pgrep -f '$TRAINER_PATTERN' >/dev/null; then echo trainer-running; \
else echo trainer-stopped; fi" 2>/dev/null)" || return 0
  echo "$(grep -c trainer-running <<<"$out" || true) $(grep -c trainer-stopped <<<"$out" || true)"
}

restarts=0
count_restart() {
  ((restarts < MAX_RESTARTS)) || { note "gave up after $MAX_RESTARTS restarts"; exit 1; }
  restarts=$((restarts + 1))
  note "restart $restarts of at most $MAX_RESTARTS: $*"
}

relaunch() { "$SCRIPTS_DIR/launch.sh" "${launch_args[@]}" --resume; }

recreate() {  # $1: the slice's state
  count_restart "$TPU_NAME is $1; recreating it"
  "$SCRIPTS_DIR/delete.sh" || [[ "$1" == NOT_FOUND ]] || return 1
  "$SCRIPTS_DIR/create.sh" --wait "${create_opts[@]}" && "$SCRIPTS_DIR/setup.sh" && relaunch
}

while :; do
  if finished; then note "the final checkpoint exists: the run is complete"; exit 0; fi
  state="$(tpu_state)"
  case "$state" in
    ACTIVE | READY)
      read -r running stopped <<<"$(trainer_counts)" || true
      if [[ -z "${running:-}" ]]; then
        note "cannot reach the workers; trying again in ${INTERVAL}s"
      elif ((stopped > 0)); then
        count_restart "the trainer runs on $running of $((running + stopped)) workers; relaunching it"
        { "$SCRIPTS_DIR/stop.sh" && relaunch; } || note "relaunch failed; trying again in ${INTERVAL}s"
      else
        note "$TPU_NAME is $state; the trainer runs on all $running workers"
      fi
      ;;
    DRY_RUN)
      trainer_counts >/dev/null
      note "dry run: showing the recovery of a preempted slice"
      recreate PREEMPTED
      exit 0
      ;;
    PREEMPTED | SUSPENDING | SUSPENDED | FAILED | TERMINATED | STOPPED | NOT_FOUND)
      recreate "$state" || note "recovery failed; trying again in ${INTERVAL}s"
      ;;
    *) note "$TPU_NAME is $state; checking again in ${INTERVAL}s" ;;
  esac
  sleep "$INTERVAL"
done
