#!/usr/bin/env bash
# The README's main job. First a whole DiffSynth pipeline as a new user loads it: Wan2.1-T2V-1.3B's
# DiT and VAE (bf16 random weights at the real shapes, about 3 GiB, hashes equal to DiffSynth's
# MODEL_CONFIGS), WanVideoPipeline.from_pretrained in fresh processes, plain DiffSynth and patched,
# cold and warm, times, peak RSS and a bit-identical check (benchmarks/pipeline.py; the files are
# removed at the end unless DIFFSYNTH_C_BENCH_DIR is set). Then the load table: a multi-shard model
# loaded by diffsynth_c and by the peers (benchmarks/demo.py). Arguments go to benchmarks/demo.py.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$root/scripts/env.sh")
cd "$root"
status=0
"$venv/bin/python" benchmarks/pipeline.py --without text_encoder --source bf16 --vram none --cache cold,warm \
  --repeat 3 --steps 1 || status=$?
echo
"$venv/bin/python" benchmarks/demo.py "$@" || status=$?
exit $status
