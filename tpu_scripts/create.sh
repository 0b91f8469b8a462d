#!/usr/bin/env bash
# Create a TPU VM or pod slice: TPU_NAME=appo ACCELERATOR_TYPE=v5p-64 ZONE=us-east5-a tpu_scripts/create.sh [--spot]
set -euo pipefail
source "$(dirname "$0")/common.sh"
gcloud_tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" "$@"
