# Shared settings for the Cloud TPU scripts; override any of them in the environment.
: "${TPU_NAME:?set TPU_NAME (the TPU VM / pod slice name)}"
: "${ZONE:=us-east5-a}"
: "${ACCELERATOR_TYPE:=v5p-64}"
: "${RUNTIME_VERSION:=v2-alpha-tpuv5}"
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${REPO_DIR:=appo-jax}"
gcloud_tpu() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE" --project "$PROJECT"; }
on_all_workers() { gcloud_tpu ssh "$TPU_NAME" --worker=all --command "$1"; }
