#!/usr/bin/env bash
# Runs benchmarks/gpu_check.py on the lent GPU machine, from the repository root, with what
# benchmarks/gpu_prepare.sh put in .gpu-stage/ and .gpu/ (the machine has no network; its python3 has torch,
# transformers, accelerate, pyarrow, pluggy and pyyaml). Two device calls, back to back (a call carries at most
# 64 MiB and the SmolLM2 GGUF alone is 94 MiB, so its first part goes ahead while the machine stays warm):
#   bash benchmarks/gpu_check.sh stage    carry .gpu-stage: keeps the GGUF's first part in /tmp (seconds)
#   bash benchmarks/gpu_check.sh [ARGS]   carry .gpu: installs the wheels, joins the GGUF, runs the check (<= 8 min)
# Without the staged part the check still runs and reports exactness as skipped. Output: $OUT (or ./gpu-check-out).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
stage=/tmp/grape-gpu-stage
gguf=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
if [ "${1:-}" = stage ]; then
  mkdir -p "$stage" && cp "$root"/.gpu-stage/smollm2.gguf.a "$stage"/ && ls -l "$stage" && exit 0
  echo "no .gpu-stage/smollm2.gguf.a here: run benchmarks/gpu_prepare.sh and carry .gpu-stage" >&2; exit 1
fi
out=${OUT:-$root/gpu-check-out}
mkdir -p "$out"
[ -d "$root/.gpu/wheels" ] || { echo "no .gpu/wheels here: run benchmarks/gpu_prepare.sh and carry .gpu" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$root"/.gpu/wheels/*.whl || exit 1
# the checkout itself is the package (it travels with every call), the carried wheels beside it
export PYTHONPATH=$root:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
args=(--out "$out" --pool "$root/.gpu/pool.jsonl" --tokenizer "$root/.gpu/smollm2-tokenizer")
if [ -f "$stage/smollm2.gguf.a" ] && [ -f "$root/.gpu/smollm2.gguf.b" ]; then
  cat "$stage/smollm2.gguf.a" "$root/.gpu/smollm2.gguf.b" >"$gguf"
  if (cd /tmp && sha256sum -c "$root/.gpu/smollm2.gguf.sha256"); then args+=(--gguf "$gguf"); fi
else
  echo "the GGUF's first part is not staged on this machine (run 'bash benchmarks/gpu_check.sh stage' carrying" \
       ".gpu-stage just before): exactness will be skipped"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv >"$out/nvidia-smi.csv" 2>&1
python3 "$root/benchmarks/gpu_check.py" "${args[@]}" "$@" 2>&1 | tee "$out/run.log"
