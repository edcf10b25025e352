#!/usr/bin/env bash
# The README's main job: generates a realistic multi-shard model, loads it with diffsynth_c and the
# peers, checks that every loader returns the same tensors, and prints a table of times and ratios.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$root/scripts/env.sh")
cd "$root"
exec "$venv/bin/python" benchmarks/demo.py "$@"
