#!/usr/bin/env bash
# The main job: preview a GRAPE selection on a slice of the shared AlpacaEval pool with the embedded SmolLM2.
# Extra arguments go to `grape-plugin preview` (e.g. --limit 20, --model path/to/base-model).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/.ci/env.sh"
env=$(env_for core)
exec "$env/bin/grape-plugin" preview "$root/../shared/data/alpaca_eval_pool.jsonl" --limit 5 "$@"
