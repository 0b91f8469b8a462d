#!/usr/bin/env bash
# Copy this checkout to every worker and install it with JAX for TPU: TPU_NAME=appo tpu_scripts/setup.sh
# The data ships inside the package (appo_jax/data/raw). LOCAL_DATA=<a data dir with benchmarks/, rl/, search/>
# copies another data dir to $DATA_DIR on every worker (default ~/appo-data; use it with --data-dir).
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
