# shellcheck shell=bash
# Sourced by integration/*/run.sh (which set -euo pipefail first): the venv each integration runs in.
#
#   jaxkv_venv NAME MARKER PYTHON BUILD EXTRAS PACKAGES
#
# NAME: the venv's directory under $JAXKV_VENVS (default ~/.cache/jaxkv-venvs). It lives outside the work tree,
#   so a clean clone (CI's) reuses it; integration/<dir>/.venv links to it.
# MARKER: a file name in the venv that names the pins, made once BUILD has finished: a venv without it (a build
#   that did not finish, or one of other pins) is removed, that directory only, and built again.
# PYTHON: the interpreter that makes the venv.
# BUILD: a function that installs the pins, with "${pip[@]}" (the venv's pip install, quiet).
# EXTRAS: jaxkv's extras, installed editable on every run (the work tree may have changed).
# PACKAGES: an extended regex of package names whose versions the ready line prints.
#
# Sets venv (the venv's directory) and pip, for the caller. Prints one line:
#   integration/<dir>: venv ready in N s (size): versions
jaxkv_venv() {
  local name=$1 marker=$2 python=$3 build=$4 extras=$5 packages=$6
  local here repo venvs start
  case $name in '' | . | .. | */*)
    echo "_venv.sh: the venv name ($name) must be one directory name under \$JAXKV_VENVS" >&2
    return 1
    ;;
  esac
  here=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
  repo=$(cd "$here/../.." && pwd)
  venvs=${JAXKV_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/jaxkv-venvs}
  venv=$venvs/$name
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

  start=$(date +%s)
  if [ ! -f "$venv/$marker" ]; then
    rm -rf "${venv:?}"  # a build this function began and did not finish, or one of other pins
    mkdir -p "$venvs"
    "$python" -m venv "$venv"
    "$build"
    touch "$venv/$marker"
  fi
  ln -sfn "$venv" "$here/.venv"
  "${pip[@]}" -e "${repo}[$extras]"
  echo "integration/$(basename "$here"): venv ready in $(($(date +%s) - start)) s ($(du -sh "$venv" | cut -f1)):" \
    "$("$venv/bin/python" -m pip list 2>/dev/null | grep -E "^($packages) " | tr -s ' ' | paste -sd, -)"
}
