#!/usr/bin/env bash
# Copy this checkout to every worker and install it with JAX for TPU: TPU_NAME=appo tpu_scripts/setup.sh
# Data (../shared/data layout: benchmarks/, rl/, search/) goes to $DATA_DIR on every worker (default ~/appo-data).
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${DATA_DIR:=appo-data}"
root="$(cd "$(dirname "$0")/.." && pwd)"
tar -C "$root" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/appo-jax.tgz .
gcloud_tpu scp /tmp/appo-jax.tgz "$TPU_NAME":/tmp/appo-jax.tgz --worker=all
if [ -n "${LOCAL_DATA:-}" ]; then
  tar -C "$LOCAL_DATA" -czf /tmp/appo-data.tgz .
  gcloud_tpu scp /tmp/appo-data.tgz "$TPU_NAME":/tmp/appo-data.tgz --worker=all
  on_all_workers "mkdir -p ~/$DATA_DIR && tar -C ~/$DATA_DIR -xzf /tmp/appo-data.tgz"
fi
on_all_workers "mkdir -p ~/$REPO_DIR && tar -C ~/$REPO_DIR -xzf /tmp/appo-jax.tgz && cd ~/$REPO_DIR && \
  python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && \
  .venv/bin/pip install -q -e . 'jax[tpu]' && .venv/bin/python -c 'import jax; print(jax.device_count(), jax.devices()[0])'"
