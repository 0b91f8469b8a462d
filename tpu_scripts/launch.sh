#!/usr/bin/env bash
# Run one experiment on every worker of the slice (multi-host: jax.distributed is initialised by the trainer).
#   TPU_NAME=appo tpu_scripts/launch.sh experiments/paper/table1_reasoning.py:qwen2.5-7b,appo [--set key=value ...] [--resume]
# The workdir should be on shared storage (a gs:// bucket works with Orbax) so every host writes one checkpoint.
set -euo pipefail
source "$(dirname "$0")/common.sh"
config="${1:?usage: launch.sh CONFIG [appo-jax train args...]}"; shift
: "${WORKDIR:=gs://YOUR_BUCKET/appo-jax/$(basename "$config" .py)}"
: "${DATA_DIR:=appo-data}"
args="$(printf ' %q' "$@")"
on_all_workers "cd ~/$REPO_DIR && APPO_DATA_DIR=~/$DATA_DIR nohup .venv/bin/appo-jax train --config $config \
  --workdir $WORKDIR --distributed $args > ~/appo-train.log 2>&1 &"
echo "launched; logs: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=0 --command 'tail -f ~/appo-train.log'"
