#!/usr/bin/env bash
# The device run, prepared: run ON the GPU machine from the repository root, in one call of the
# device tool (carry [".whl"], made here beforehand by scripts/gpu_wheels.sh):
#
#   scripts/gpu_check.sh        # everything goes into $OUT (or ./gpu-out when OUT is unset)
#
# 1. installs the carried wheels into /tmp/site (the machine is offline), 2. builds the core and
# the CUDA library in place (nvcc required), 3. runs the GPU tests, 4. the GPU load benchmark with
# --check, 5. the offload benchmark on CUDA, 6. a DiffSynth pipeline (Wan 1.3B's DiT and VAE) loaded
# to the GPU by the unchanged from_pretrained, plain vs patched, warm. Each step has its own time limit, so that one that
# hangs still leaves the others' results; the whole run is sized to end inside the tool's 600 s.
# Results: $OUT/summary.txt (each step's exit status and time), a log per step, gpu_load.json,
# offload.json and pipeline_cuda.json (copy them into benchmarks/results/ and run `make bench-report`).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/gpu-out}
py=${PYTHON:-python3}
site=${GPU_CHECK_SITE:-/tmp/site}
mkdir -p "$out" "$site"
export PYTHONUNBUFFERED=1
summary=$out/summary.txt
: >"$summary"

# step NAME LIMIT_S CMD...: runs CMD with a time limit, its output into $out/NAME.log (and here)
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$out/$name.log"
  echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$summary"
  return $rc
}

# 1. wheels, one at a time so that one that does not install leaves the others
for w in .whl/*.whl; do
  [ -e "$w" ] || break
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$w" \
    >>"$out/wheels.log" 2>&1 || echo "wheel $w did not install (see wheels.log)" | tee -a "$summary"
done
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
if ! "$py" -c "import modelscope" 2>/dev/null; then
  # DiffSynth imports modelscope's snapshot_download at import time, for downloads only; offline
  # there is nothing to download, so a stand-in that refuses is enough for the layers and loaders.
  mkdir -p "$site/modelscope"
  cat >"$site/modelscope/__init__.py" <<'EOF'
"""Stand-in written by scripts/gpu_check.sh on an offline machine: DiffSynth imports this name."""


def snapshot_download(*args, **kwargs):
    raise RuntimeError("offline GPU machine: modelscope is a stand-in here, nothing can be downloaded")
EOF
fi
{
  echo "python: $("$py" -c 'import sys; print(sys.version.split()[0])')"
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' 2>&1
  "$py" -c 'import diffsynth.core; print("diffsynth importable")' 2>&1 | tail -1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
} | tee -a "$summary"

# 2. build (the C core without libcurl if its headers are missing: downloads are not tested here)
step build 120 env DIFFSYNTH_C_CUDA=1 "$py" setup.py build_ext --inplace -j "$(nproc)" || {
  echo "the build failed: nothing else can run" | tee -a "$summary"
  exit 1
}
"$py" -c 'import diffsynth_c; from diffsynth_c import _core; print("cuda_available:", diffsynth_c.cuda_available(), _core.build_info())' 2>&1 | tee -a "$summary"

# 3.-5. tests and benchmarks
step gpu-tests 150 "$py" -m pytest -q -ra -p no:cacheprovider tests/gpu tests/test_cuda_cpu.py
step gpu-load 110 "$py" benchmarks/gpu_load.py --check --size-gib 4 --repeat 3 --json "$out/gpu_load.json"
step offload 110 "$py" benchmarks/offload.py --device cuda --repeat 2 --json "$out/offload.json"
step pipeline 90 "$py" benchmarks/pipeline.py --device cuda --without text_encoder --source bf16 --vram none \
  --cache warm --repeat 2 --json "$out/pipeline_cuda.json"
echo "== summary"
cat "$summary"
