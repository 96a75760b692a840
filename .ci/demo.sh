#!/usr/bin/env bash
# The main job: preview a GRAPE selection on the AlpacaEval pool slice in data/ with the embedded SmolLM2.
# Extra arguments go to `grape-plugin preview` (e.g. --limit 20, --model path/to/base-model).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/.ci/env.sh"
env=$(env_for core)
exec "$env/bin/grape-plugin" preview "$root/data/alpaca_eval_pool_slice.jsonl" --limit 5 "$@"
