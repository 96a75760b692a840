#!/usr/bin/env bash
# The whole test suite. Core tests run in one virtual environment and each host's tests in its own (Axolotl's
# and LLaMA-Factory's pins conflict). Environments are cached outside the clone, keyed by a hash of what they
# install, and rebuilt when missing.   Usage: bash .ci/test.sh [core] [axolotl] [llamafactory]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/.ci/env.sh"
reports=$(mktemp -d)
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(core axolotl llamafactory)
# The HTML report test drives Debian's chromium (it skips without one); root installs it once.
if [[ " ${suites[*]} " == *" core "* ]] && ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing chromium for the report test" >&2
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >&2 \
    || echo "could not install chromium: the report test will skip" >&2
fi

status=0
for suite in "${suites[@]}"; do
  case $suite in
    core) paths=(tests --ignore=tests/axolotl --ignore=tests/llamafactory) ;;
    axolotl|llamafactory) paths=("tests/$suite") ;;
    *) echo "unknown suite: $suite" >&2; exit 2 ;;
  esac
  [ -e "$root/${paths[0]}" ] || { echo "no tests for $suite yet"; continue; }
  env=$(env_for "$suite")
  echo "== $suite tests ($env)"
  (cd "$root" && "$env/bin/python" -m pytest -q -p no:cacheprovider --junitxml="$reports/$suite.xml" "${paths[@]}") || status=1
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
