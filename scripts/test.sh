#!/usr/bin/env bash
# The README's test command: sets up the environment and runs the whole test suite: ruff, pytest, then
# the C core's tests again against an AddressSanitizer + UBSan build (scripts/sanitize.sh), then
# each libFuzzer harness for DIFFSYNTH_C_FUZZ_SECONDS (default 60; scripts/fuzz.sh).
# Arguments go to the first pytest run; with arguments, only that run happens.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$root/scripts/env.sh")
cd "$root"
if [ $# -gt 0 ]; then
  exec "$venv/bin/python" -m pytest -q "$@"
fi
echo "== ruff (lint and format, STYLE rule 9)"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
# a hang fails the run instead of using up CI's time (pytest prints the hung test's stacks first)
timeout --kill-after=30 "${DIFFSYNTH_C_TEST_TIMEOUT:-1200}" "$venv/bin/python" -m pytest -q
echo "== sanitizers (scripts/sanitize.sh)"
"$root/scripts/sanitize.sh"
echo "== fuzzing (scripts/fuzz.sh)"
"$root/scripts/fuzz.sh" "${DIFFSYNTH_C_FUZZ_SECONDS:-60}"
