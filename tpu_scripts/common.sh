# shellcheck shell=bash disable=SC2034  # the settings here are used by the scripts that source this file
# Shared settings and helpers of the Cloud TPU scripts; each script sources this file (it is not run on its own).
#
# Settings (environment):
#   TPU_NAME          TPU VM / pod slice name (required)
#   ZONE              e.g. us-east5-a (v5p), us-central2-b (v4), us-west4-a (v5e), us-east5-b (v6e) (required)
#   PROJECT           default: `gcloud config get-value project` (a placeholder in a dry run)
#   ACCELERATOR_TYPE  v4-N, v5litepod-N (v5e), v5p-N or v6e-N (create.sh, watch.sh)
#   RUNTIME_VERSION   default per family: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
#                     v6e v2-alpha-tpuv6e
#   QR_NAME           queued-resource id (default: TPU_NAME)
#   QUEUED            1 (default): the slice is a queued resource; 0: a plain TPU VM (create.sh --no-queue)
#   WORKDIR           run directory: gs://BUCKET/... or an absolute path on storage every worker mounts
#   REPO_DIR          checkout dir on the workers, relative to ~ (default appo-jax)
#   DATA_DIR          data dir on the workers, relative to ~ (default appo-data; filled from LOCAL_DATA)
#   DRY_RUN=1         same as --dry-run: print every command ("+ ..." on stdout) instead of running it
set -euo pipefail
shopt -s inherit_errexit  # a failing $(...) stops the script as well

SCRIPT_NAME="$(basename "$0")"
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPTS_DIR/.." && pwd)"
: "${DRY_RUN:=0}"
: "${QUEUED:=1}"
: "${REPO_DIR:=appo-jax}"
: "${DATA_DIR:=appo-data}"
export DRY_RUN QUEUED
# pgrep/pkill -f pattern of the trainer that launch.sh starts (python ~/REPO_DIR/.venv/bin/appo-jax train ...);
# anchored at the start so that it never matches the ssh shell whose command line holds it
TRAINER_PATTERN="^[^ ]*python[^ ]* [^ ]*/${REPO_DIR//./\\.}/\\.venv/bin/appo-jax train"
# the log on each worker; the ~ expands there
# shellcheck disable=SC2088
TRAIN_LOG='~/appo-train.log'

exec 3>&1  # dry-run commands go to the script's stdout, also from inside $(...)

die() { echo "$SCRIPT_NAME: error: $*" >&2; exit 2; }
note() { echo "$SCRIPT_NAME: $*" >&2; }
[[ "$REPO_DIR" =~ ^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ ]] || die "REPO_DIR=$REPO_DIR must be a plain path relative to ~"
[[ "$DATA_DIR" =~ ^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ ]] || die "DATA_DIR=$DATA_DIR must be a plain path relative to ~"
is_dry_run() { [[ "$DRY_RUN" == 1 || "$DRY_RUN" == true ]]; }
# The script's header comment (line 2 up to the first line that is not a comment), then the settings above.
usage() {
  sed -n '2,/^[^#]/{/^# shellcheck/d;/^#/{s/^# \{0,1\}//;p;};}' "$0"
  sed -n '/^# Settings (environment):/,/^[^#]/{/^#/{s/^# \{0,1\}//;p;};}' "${BASH_SOURCE[0]}"
}

# Handles the options every script takes (--dry-run, -h/--help); returns 1 for any other argument.
common_flag() {
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) return 1 ;;
  esac
}

# Parses the arguments of a script that takes only the common flags; with --queue-flag first, --no-queue too
# (QUEUED=0). Anything else is an error.
parse_common_flags() {
  local queue_flag=0
  if [[ "${1:-}" == --queue-flag ]]; then queue_flag=1; shift; fi
  while (($#)); do
    if ! common_flag "$1"; then
      [[ "$queue_flag" == 1 && "$1" == --no-queue ]] || die "unknown argument $1 (see --help)"
      QUEUED=0
    fi
    shift
  done
}

# Shell-quotes the arguments into one line (plain words stay as they are).
quote() {
  local out="" a q="'\\''"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/$q}'"; fi
  done
  printf '%s\n' "${out# }"
}

# Runs a command, or in a dry run prints it ("+ cmd args") and outputs nothing.
run() {
  if is_dry_run; then echo "+ $(quote "$@")" >&3; else "$@" 3>&-; fi
}

hint() {
  case "$1" in
    TPU_NAME) echo "the TPU VM / slice name, e.g. TPU_NAME=appo" ;;
    ZONE) echo "e.g. ZONE=us-east5-a" ;;
    ACCELERATOR_TYPE) echo "e.g. ACCELERATOR_TYPE=v5p-64" ;;
    WORKDIR) echo "gs://BUCKET/run or an absolute path on storage every worker mounts" ;;
    *) echo "see --help" ;;
  esac
}

# Checks the named settings, then resolves PROJECT; call after the options are parsed.
require() {
  local v
  for v in "$@"; do [[ -n "${!v:-}" ]] || die "set $v ($(hint "$v"))"; done
  : "${QR_NAME:=${TPU_NAME:-}}"
  if [[ -z "${PROJECT:-}" ]]; then
    if is_dry_run; then PROJECT=YOUR_PROJECT; else PROJECT="$(gcloud config get-value project 2>/dev/null || true)"; fi
    [[ -n "$PROJECT" ]] || die "set PROJECT (or run: gcloud config set project PROJECT_ID)"
  fi
  export PROJECT QR_NAME
}

check_workdir() {
  case "$WORKDIR" in
    gs://?* | /?*) ;;
    *) die "WORKDIR=$WORKDIR must be gs://BUCKET/... or an absolute path on storage every worker mounts" ;;
  esac
}

# The trainer writes its workdir through the file system: launching needs a mounted path, not a URL.
check_trainer_workdir() {
  check_workdir
  [[ "$WORKDIR" != gs://* ]] || die "WORKDIR=$WORKDIR: appo-jax train writes the workdir through the file system; \
mount the bucket on every worker (gcsfuse, or use Filestore) and set WORKDIR to that absolute path"
}

# The runtime version of $ACCELERATOR_TYPE's family, unless RUNTIME_VERSION is set.
runtime_version() {
  if [[ -n "${RUNTIME_VERSION:-}" ]]; then echo "$RUNTIME_VERSION"; return; fi
  case "$ACCELERATOR_TYPE" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "unknown accelerator family in ACCELERATOR_TYPE=$ACCELERATOR_TYPE (known: v4-N, v5litepod-N, v5p-N, v6e-N; or set RUNTIME_VERSION)" ;;
  esac
}

tpu_vm() { local sub="$1"; shift; run gcloud compute tpus tpu-vm "$sub" "$@" --zone "$ZONE" --project "$PROJECT"; }
queued() { local sub="$1"; shift; run gcloud compute tpus queued-resources "$sub" "$@" --zone "$ZONE" --project "$PROJECT"; }
# on_workers WORKERS COMMAND: run a shell command on worker(s) WORKERS (all, 0, 0,1, ...) over ssh.
on_workers() { tpu_vm ssh "$TPU_NAME" --worker="$1" --command "$2"; }
on_all_workers() { on_workers all "$1"; }

# Prints the value of a `describe` query; NOT_FOUND when the resource does not exist; DRY_RUN in a dry run.
describe_value() {
  local err out
  if is_dry_run; then "$@"; echo DRY_RUN; return; fi
  err="$(mktemp)"
  if out="$("$@" 2>"$err")"; then rm -f "$err"; echo "${out:-UNKNOWN}"; return; fi
  if grep -qi 'not.\{0,1\}found' "$err"; then rm -f "$err"; echo NOT_FOUND; return; fi
  cat "$err" >&2; rm -f "$err"
  die "cannot read the state of $TPU_NAME"
}

# The slice's state: with QUEUED=1 the queued resource's (ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE,
# SUSPENDING, SUSPENDED, FAILED, ...), and once it is ACTIVE the node's (READY, PREEMPTED, ...); with QUEUED=0 the
# TPU VM's. NOT_FOUND when it does not exist; DRY_RUN in a dry run.
tpu_state() {
  local s
  if [[ "$QUEUED" == 1 ]]; then
    s="$(describe_value queued describe "$QR_NAME" --format 'value(state.state)')"
    [[ "$s" == ACTIVE ]] || { echo "$s"; return; }
  fi
  describe_value tpu_vm describe "$TPU_NAME" --format 'value(state)'
}
