# Sourced by test.sh and demo.sh: env_for NAME prints a ready virtual environment for .ci/envs/NAME.txt (with
# dependencies) plus .ci/envs/NAME.no-deps.txt (without), cached outside the clone (GRAPE_ENV_CACHE) and keyed
# by a hash of what it installs.
root=${root:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cache=${GRAPE_ENV_CACHE:-$HOME/.cache/grape-plugin-envs}
env_for() {  # prints the path of a ready environment for suite $1
  local req="$root/.ci/envs/$1.txt" nodeps="$root/.ci/envs/$1.no-deps.txt" key dir
  key=$(cat "$req" "$nodeps" <(python3 --version) | sha256sum | cut -c1-12)
  dir="$cache/$1-$key"
  if [ ! -f "$dir/.ready" ]; then
    echo "building the $1 environment in $dir (log: $dir.log)" >&2
    rm -rf "$dir" && python3 -m venv "$dir"
    { "$dir/bin/pip" install -q --upgrade pip && "$dir/bin/pip" install -q -r "$req" \
        && "$dir/bin/pip" install -q --no-deps -r "$nodeps"; } >"$dir.log" 2>&1 \
      || { tail -n 30 "$dir.log" >&2; return 1; }
    touch "$dir/.ready"
  fi
  # this checkout's code, quietly (pip and setuptools chatter goes to the log)
  "$dir/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >>"$dir.log" 2>&1 \
    || { tail -n 30 "$dir.log" >&2; return 1; }
  echo "$dir"
}

