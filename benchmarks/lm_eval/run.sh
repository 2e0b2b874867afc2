#!/usr/bin/env bash
# lm-evaluation-harness (local-completions) against a running moleserve, --batch_size 1 and then 8 on
# the same items: the scores must be identical (batch 8 sends 8 prompts per /v1/completions request).
#
#   benchmarks/lm_eval/run.sh URL LIMIT [LM_EVAL]     e.g. run.sh http://127.0.0.1:8000 100 /tmp/lmeval/bin/lm_eval
#
# lm-eval is not a project dependency (it pulls pandas, pyarrow, datasets...): install lm-eval[api]
# anywhere, e.g. a venv that sees this project's torch. The task reads ARC-Easy from ../shared/data (no hub).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
url="${1:-http://127.0.0.1:8000}"; limit="${2:-100}"; lm_eval="${3:-lm_eval}"
shared="${MOLESERVE_SHARED:-$(cd "$here/../../.." && pwd)/shared}"  # ../shared beside the checkout
data="$shared/data/commonsense/ARC-Easy/test.json"
model_dir="${MOLESERVE_CACHE:-$HOME/.cache/moleserve}/models/SmolLM2-135M-Instruct"
tasks="$(mktemp -d)"
sed "s|ARC_EASY_JSON.*|$data|" "$here/arc_easy_local.yaml" > "$tasks/arc_easy_local.yaml"
cp "$here/utils.py" "$tasks/"
for bs in 1 8; do
  start=$(date +%s)
  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$lm_eval" --model local-completions --tasks arc_easy_local \
    --include_path "$tasks" --limit "$limit" --batch_size "$bs" --output_path "$tasks/out-bs$bs" \
    --model_args "model=SmolLM2-135M-Instruct,base_url=$url/v1/completions,tokenizer_backend=huggingface,tokenizer=$model_dir,num_concurrent=1,max_retries=1" \
    2>&1 | grep -E "^\||Error" || true
  echo "batch_size $bs: $(( $(date +%s) - start )) s"
done
