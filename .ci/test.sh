#!/usr/bin/env bash
# The whole test suite. Core tests run in one virtual environment and each host's tests in its own (Axolotl's
# and LLaMA-Factory's pins conflict). Environments are cached outside the clone, keyed by a hash of what they
# install, and rebuilt when missing. Nothing is installed system-wide: the report's browser test needs a
# `chromium` command and skips without one.   Usage: bash .ci/test.sh [core] [axolotl] [llamafactory]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/.ci/env.sh"
reports=$(mktemp -d)
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(core axolotl llamafactory)

status=0
for suite in "${suites[@]}"; do
  case $suite in
    core) paths=(tests --ignore=tests/axolotl --ignore=tests/llamafactory) ;;
    axolotl|llamafactory) paths=("tests/$suite") ;;
    *) echo "unknown suite: $suite" >&2; exit 2 ;;
  esac
  env=$(env_for "$suite")
  echo "== $suite tests ($env)"
  rc=0
  (cd "$root" && "$env/bin/python" -m pytest -q -rfEs -p no:cacheprovider --junitxml="$reports/$suite.xml" \
    "${paths[@]}") || rc=$?
  case $rc in
    0) ;;
    1) status=1 ;;  # failures, listed above
    5) echo "== $suite: no tests were collected" >&2; status=1 ;;
    *) echo "== $suite: pytest stopped with exit code $rc" >&2; status=1 ;;
  esac
done
python3 - "$reports" <<'PY'
import glob, sys, xml.etree.ElementTree as ET
n = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for f in glob.glob(sys.argv[1] + "/*.xml"):
    for suite in ET.parse(f).getroot().iter("testsuite"):
        for k in n:
            n[k] += int(suite.get(k, 0))
failed = n["failures"] + n["errors"]
print(f"all suites: {n['tests'] - failed - n['skipped']} passed, {failed} failed, {n['skipped']} skipped")
PY
exit $status
