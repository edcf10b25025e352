#!/usr/bin/env bash
# Run HERE (a machine with the package index), before a device run: saves into .whl/ the Python 3.12
# wheels that the offline GPU machine lacks for scripts/gpu_check.sh (DiffSynth, the oracle, and the
# GPU peers of benchmarks/gpu_load.py), at the versions requirements/dev.txt pins. .whl/ is ignored
# by git; name it in the device tool's `carry`. Everything else they need (torch, safetensors,
# pytest, typer, transformers, ...) is already on the GPU image (/work/.library/device/KINDS.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
pin() { grep -E "^$1==" "$root/requirements/dev.txt" | head -1; }
wanted=("$(pin diffsynth)" "$(pin fastsafetensors)" "$(pin instanttensor)")
rm -rf "$root/.whl"
mkdir -p "$root/.whl"
platforms=()
for p in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$root/.whl" "${wanted[@]}"
ls -l "$root/.whl" >&2
du -sh "$root/.whl" >&2
