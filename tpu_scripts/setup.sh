#!/usr/bin/env bash
# Copy this checkout to every worker and install it there with JAX for TPU (in ~/$REPO_DIR/.venv).
#   TPU_NAME=appo ZONE=us-east5-a tpu_scripts/setup.sh [--dry-run]
# The checkout travels as a tarball without .venv, .git and runs/. uv provides the Python the project needs
# (PYTHON_VERSION, default 3.11; the TPU images ship 3.10), then `pip install -e . jax[tpu]` with jax pinned to
# pyproject.toml's range (JAX_TPU overrides the requirement).
# The data ships inside the package. LOCAL_DATA=DIR (with benchmarks/, rl/, search/) copies another data dir to
# ~/$DATA_DIR on every worker; launch.sh then points APPO_DATA_DIR at it.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

parse_common_flags "$@"
require TPU_NAME ZONE
: "${PYTHON_VERSION:=3.11}"
if [[ -z "${JAX_TPU:-}" ]]; then
  range="$(sed -n 's/^ *"jax\([<>=!~][^"]*\)",\{0,1\} *$/\1/p' "$REPO_ROOT/pyproject.toml" | head -n 1)"
  [[ -n "$range" ]] || die "no \"jax...\" requirement in $REPO_ROOT/pyproject.toml; set JAX_TPU='jax[tpu]==VERSION'"
  JAX_TPU="jax[tpu]$range"
fi
[[ -z "${LOCAL_DATA:-}" || -d "$LOCAL_DATA" ]] || die "LOCAL_DATA=$LOCAL_DATA is not a directory"

tgz="${TMPDIR:-/tmp}/appo-jax-$TPU_NAME.tgz"
run tar -C "$REPO_ROOT" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude=__pycache__ -czf "$tgz" .
tpu_vm scp "$tgz" "$TPU_NAME:/tmp/appo-jax.tgz" --worker=all
if [[ -n "${LOCAL_DATA:-}" ]]; then
  data_tgz="${TMPDIR:-/tmp}/appo-data-$TPU_NAME.tgz"
  run tar -C "$LOCAL_DATA" -czf "$data_tgz" .
  tpu_vm scp "$data_tgz" "$TPU_NAME:/tmp/appo-data.tgz" --worker=all
  on_all_workers "mkdir -p ~/$DATA_DIR && tar -C ~/$DATA_DIR -xzf /tmp/appo-data.tgz"
fi
uv_install="python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv"
on_all_workers "set -e; mkdir -p ~/$REPO_DIR; tar -C ~/$REPO_DIR -xzf /tmp/appo-jax.tgz; cd ~/$REPO_DIR; \
{ $uv_install; }; export PATH=\$HOME/.local/bin:\$PATH; \
[ -x .venv/bin/python ] || uv venv -q --python $PYTHON_VERSION .venv; \
uv pip install -q --python .venv/bin/python -e . \"$JAX_TPU\"; \
.venv/bin/python -c \"import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)\""
