#!/usr/bin/env bash
# The A/B arms as datasets: GRAPE best, GRAPE worst, and one random draw per seed, each one response per instruction.
#   bash examples/ab/make_arms.sh POOL MODEL [OUT]       # OUT: ./arms by default
# Score with the model you will fine-tune, rendered as your training renders it (--template chat for a chat
# template) and at its sequence length (--max-length = sequence_len / cutoff_len below). The score cache makes
# every run after the first cost only the selection.
set -euo pipefail
pool=$1 model=$2 out=${3:-arms}
common=(--model "$model" --template chat --max-length 1024 --over-length truncate)
grape-plugin select "$pool" -o "$out/best" --strategy best "${common[@]}"
grape-plugin select "$pool" -o "$out/worst" --strategy worst "${common[@]}"
for seed in 0 1 2; do
  grape-plugin select "$pool" -o "$out/random-$seed" --strategy random --seed "$seed" "${common[@]}"
done
# one more arm, GRAPE under another fit metric:
#   grape-plugin select "$pool" -o "$out/best-min_k" --metric min_k "${common[@]}"
cp "$(dirname "$0")/dataset_info.json" "$out/"   # the arms as LLaMA-Factory datasets (dataset_dir: arms)
