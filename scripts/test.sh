#!/usr/bin/env bash
# The README's test command: sets up the environment, checks the style (ruff for Python, the
# project's .clang-format for C), and runs the whole test suite: pytest, then the C core's tests
# again against an AddressSanitizer + UBSan build (scripts/sanitize.sh), then each libFuzzer harness
# for DIFFSYNTH_C_FUZZ_SECONDS (default 60; scripts/fuzz.sh).
# Arguments go to the first pytest run; with arguments, only that run happens.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$root/scripts/env.sh")
cd "$root"
if [ $# -gt 0 ]; then
  exec "$venv/bin/python" -m pytest -q "$@"
fi
# STYLE.md rule 9: the Python is ruff-clean and ruff-formatted, the C laid out by .clang-format
# (clang-format comes with env.sh)
echo "== ruff (lint and format)"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
echo "== clang-format --dry-run --Werror"
clang-format --dry-run --Werror csrc/*.c csrc/*.h kernels/* tests/fuzz/*.c tests/cuda_fake/*
# a hang fails the run instead of using up CI's time (pytest prints the hung test's stacks first)
timeout --kill-after=30 "${DIFFSYNTH_C_TEST_TIMEOUT:-1200}" "$venv/bin/python" -m pytest -q
echo "== sanitizers (scripts/sanitize.sh)"
"$root/scripts/sanitize.sh"
echo "== fuzzing (scripts/fuzz.sh)"
"$root/scripts/fuzz.sh" "${DIFFSYNTH_C_FUZZ_SECONDS:-60}"
