#!/usr/bin/env bash
# Prints the path of the project's virtual environment, creating it first when needed, and builds
# the C extension in place. The environment lives outside the checkout, keyed by a hash of
# requirements/dev.txt and the Python version, so a clean clone reuses it; on a fresh machine it is
# built from nothing (system packages with apt-get when the compiler or Python headers are missing).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v c++ >/dev/null 2>&1 || need_apt+=(g++)  # tests/cuda_fake builds the GPU load's host logic
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v clang-format >/dev/null 2>&1 || need_apt+=(clang-format)  # scripts/test.sh checks the C layout
[ -f /usr/include/curl/curl.h ] || [ -f /usr/include/x86_64-linux-gnu/curl/curl.h ] || need_apt+=(libcurl4-openssl-dev)  # csrc/download.c
"$py" -c 'import sysconfig, os, sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)' \
  || need_apt+=(python3-dev)
"$py" -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "env.sh: installing system packages: ${need_apt[*]}" >&2
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo
  $sudo_cmd apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >&2
fi

key=$( (cat "$root/requirements/dev.txt"; "$py" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)
home=${DIFFSYNTH_C_VENV_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/diffsynth_c}
venv=$home/venv-$key
if [ ! -f "$venv/.complete" ]; then
  mkdir -p "$home"
  # One creator at a time: two commands started together on a fresh machine (make test and make
  # demo, or two checkouts) would otherwise each remove the other's half-built environment.
  exec 9>"$home/.venv-$key.lock"
  flock 9
  if [ ! -f "$venv/.complete" ]; then
    echo "env.sh: creating $venv (first run on this machine: a few minutes)" >&2
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q -r "$root/requirements/dev.txt" >&2
    touch "$venv/.complete"
  fi
  exec 9>&-
fi
# Build the extension in place (incremental: only changed sources recompile), warnings as errors,
# libcurl required (the build would otherwise quietly leave downloads out).
(cd "$root" && DIFFSYNTH_C_WERROR=1 DIFFSYNTH_C_CURL=1 "$venv/bin/python" setup.py -q build_ext --inplace >&2)
echo "$venv"
