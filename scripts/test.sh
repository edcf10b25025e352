#!/usr/bin/env bash
# The README's test command: sets up the environment and runs the whole test suite.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$root/scripts/env.sh")
cd "$root"
exec "$venv/bin/python" -m pytest -q "$@"
