#!/usr/bin/env bash
# The accelerator check of the rollout engine, unattended, in one run (under 8 minutes on one H200, bf16): one JSON
# line per check on stdout, {"check": NAME, "seconds": S, "result": {...}} or {"check": NAME, "error": "..."}:
#
#   sampler_qwen2.5-0.5b / sampler_qwen2.5-1.5b  benchmarks/sampler.py: decode tokens/s and memory_bandwidth_share of a
#                                                random-init Qwen2.5 at batch 64 and 256 (bf16)
#   train_step_mfu                               benchmarks/train_step.py --mfu: MFU of the train step of Qwen2.5-0.5B at
#                                                4096 tokens (1024 prompt + 3072 response) per device
#   branch_fork                                  benchmarks/branch_fork.py: the APPO branch phase with KV forks against
#                                                re-prefilled prefixes (8 prompts x 4 initial x 4 branches, prefixes of
#                                                256-1024 tokens; random-init Qwen2.5-0.5B with the shipped tokenizer)
#   core_pipeline_32k                            benchmarks/core_ops.py at L = 32768
#
# Everything it runs is in the working tree (PYTHONPATH=the checkout): the device machine has no network, so
# nothing is installed; jax with its accelerator plugin must already be there. A check that fails or exceeds its
# time limit prints its error line and the others still run; the exit status is the number of failed checks.
#
#   benchmarks/device_check.sh              # on the accelerator
#   benchmarks/device_check.sh --cpu-smoke  # tiny sizes on CPU (tests/test_device_check.py runs it: it cannot rot)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ "${1:-}" = "--cpu-smoke" ]; then
  export JAX_PLATFORMS=cpu
  LIMIT=120
  CHECKS=(
    "sampler_tiny-qwen2|benchmarks/sampler.py --model tiny-qwen2 --batches 2 --new-tokens 4 --prompt-len 8 --runs 1 --decode-chunk 4 --skip-transformers"
    "train_step_mfu|benchmarks/train_step.py --mfu --mfu-model tiny-qwen2 --mfu-rows 1 --mfu-prompt-len 16 --mfu-response-len 48 --repeats 1"
    "branch_fork|benchmarks/branch_fork.py --model tiny-llama --tokenizer mini-tasks --prompts 2 --n-init 1 --branches 2 --min-prefix 48 --max-prefix 96 --response-len 16 --repeats 1"
    "core_pipeline|benchmarks/core_ops.py --lengths 256 --groups 2 --n-init 2 --budget 2 --repeats 1 --quadratic-repeats 1 --stages-at 0 --per-rollout-rows 0"
  )
elif [ -z "${1:-}" ]; then
  LIMIT=150
  CHECKS=(
    "sampler_qwen2.5-0.5b|benchmarks/sampler.py --model qwen2.5-0.5b --dtype bfloat16 --batches 64,256 --new-tokens 128 --runs 3 --skip-transformers"
    "sampler_qwen2.5-1.5b|benchmarks/sampler.py --model qwen2.5-1.5b --dtype bfloat16 --batches 64,256 --new-tokens 128 --runs 3 --skip-transformers"
    "train_step_mfu|benchmarks/train_step.py --mfu --mfu-model qwen2.5-0.5b --mfu-rows 1 --mfu-prompt-len 1024 --mfu-response-len 3072 --repeats 3"
    "branch_fork|benchmarks/branch_fork.py --model qwen2.5-0.5b --tokenizer mini-tasks --dtype bfloat16 --prompts 8 --n-init 4 --branches 4 --response-len 64 --repeats 3"
    "core_pipeline_32k|benchmarks/core_ops.py --lengths 32768 --repeats 5 --quadratic-repeats 2 --stages-at 0 --per-rollout-rows 0"
  )
else
  echo "usage: benchmarks/device_check.sh [--cpu-smoke]" >&2
  exit 2
fi

failed=0
for check in "${CHECKS[@]}"; do
  name=${check%%|*}
  read -r -a cmd <<< "${check#*|}"
  echo "[device_check] $name: ${cmd[*]}" >&2
  start=$(date +%s%N)
  out=$(timeout "$LIMIT" "$PY" "${cmd[@]}" 2> >(tail -n 20 >&2))
  code=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  seconds=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
  last=$(printf '%s\n' "$out" | tail -n 1)
  if [ $code -eq 0 ] && printf '%s' "$last" | "$PY" -c 'import json, sys; json.loads(sys.stdin.read())' 2>/dev/null; then
    echo "{\"check\": \"$name\", \"seconds\": $seconds, \"result\": $last}"
  else
    failed=$((failed + 1))
    why=$([ $code -eq 124 ] && echo "exceeded ${LIMIT} s" || echo "exit status $code")
    echo "{\"check\": \"$name\", \"seconds\": $seconds, \"error\": \"$why (its stderr tail is above)\"}"
  fi
done
exit $failed
