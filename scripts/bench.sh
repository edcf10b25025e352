#!/usr/bin/env bash
# The benchmarks: load times against DiffSynth and the peers (warm, cold, with dtype conversion),
# then model-hash times, then a torch.save checkpoint (hash and load). Arguments go to benchmarks/load.py (e.g. --size-gib 2 --shards 4
# --repeat 3 --markdown /tmp/load-tables.md). Takes long: every load runs in a fresh process.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$root/scripts/env.sh")
cd "$root"
"$venv/bin/python" benchmarks/load.py "$@"
"$venv/bin/python" benchmarks/hash.py
exec "$venv/bin/python" benchmarks/torch_bin.py
