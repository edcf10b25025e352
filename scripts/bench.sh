#!/usr/bin/env bash
# Every benchmark, then the report: each script prints its tables and writes its figures with
# --json into benchmarks/results/, and benchmarks/report.py turns those files into the generated
# section of docs/benchmarks.md and the plots in docs/img/. Takes long: every load runs in a fresh
# process. The defaults suit a 2-core, 24 GiB VM; arguments given to this script go to the main
# benchmarks/load.py run (e.g. --size-gib 2 --shards 4 --repeat 3 --markdown /tmp/load-tables.md).
#
# Environment:
#   BENCH_PYTHON     the interpreter (default: the project's virtual environment, scripts/env.sh)
#   BENCH_SIZE_GIB   size of the main model: every load scenario, torch_bin, model_load, save (1)
#   BENCH_SWEEP_GIB  more model sizes, warm loads only, for GB/s per file size ("0.25 2")
#   BENCH_REPEAT     runs per figure (3)
#   BENCH_ONLY       run only these of: load sweep hash torch_bin model_load save offload distributed
#                    download pipeline gpu_load (default: all); the others' results files are kept
#   BENCH_RESULTS    where the results files go (benchmarks/results)
#   BENCH_REPORT     0 skips the report
#   DIFFSYNTH_C_BENCH_DIR  where the generated model files go, kept for the next run; unset, they go
#                    in a fresh folder under /tmp that is removed at the end (they take GBs)
# A benchmark that fails is reported at the end (exit status 1) and left out of the page as "not
# measured"; a GPU results file (gpu_load.json, from `make gpu-bench`) is kept unless this run
# measured a GPU itself.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${BENCH_PYTHON:-}
if [ -z "$py" ]; then
  venv=$("$root/scripts/env.sh") || exit 1
  py=$venv/bin/python
fi
size=${BENCH_SIZE_GIB:-1}
sweep=${BENCH_SWEEP_GIB:-0.25 2}
repeat=${BENCH_REPEAT:-3}
results=${BENCH_RESULTS:-$root/benchmarks/results}
if [ -n "${DIFFSYNTH_C_BENCH_DIR:-}" ]; then
  bench_dir=$DIFFSYNTH_C_BENCH_DIR
  mkdir -p "$bench_dir"
else
  bench_dir=$(mktemp -d /tmp/diffsynth_c_bench.XXXXXX)
  trap 'rm -rf "$bench_dir"' EXIT
  export DIFFSYNTH_C_BENCH_DIR=$bench_dir
fi
mkdir -p "$results"
new=$(mktemp -d "$bench_dir/results.XXXXXX")
failed=()
ran=()

want() { [ -z "${BENCH_ONLY:-}" ] || [[ " $BENCH_ONLY " == *" $1 "* ]]; }

# run NAME OUTPUT SCRIPT ARGS...: one benchmark, its figures into $new/OUTPUT.json
run() {
  local name=$1 out=$2
  shift 2
  echo "== $name: $py $* --json $out.json"
  if ! "$py" "$@" --json "$new/$out.json"; then
    failed+=("$name")
  fi
}

if want load; then
  ran+=(load)
  run load load benchmarks/load.py --size-gib "$size" --shards 4 --repeat "$repeat" "$@"
fi
if want sweep; then
  ran+=(sweep)
  for s in $sweep; do
    run "sweep $s GiB" "load-sweep-${s}GiB" benchmarks/load.py --size-gib "$s" --shards 4 --repeat "$repeat" \
      --scenarios warm
  done
fi
want hash && { ran+=(hash); run hash hash benchmarks/hash.py --repeat 20; }
want torch_bin && { ran+=(torch_bin); run torch_bin torch_bin benchmarks/torch_bin.py --size-gib "$size" --repeat "$repeat"; }
want model_load && { ran+=(model_load); run model_load model_load benchmarks/model_load.py --size-gib "$size" --repeat "$repeat"; }
want save && { ran+=(save); run save save benchmarks/save.py --size-gib "$size" --repeat "$repeat" --shard-size 512MB; }
want offload && { ran+=(offload); run offload offload benchmarks/offload.py --device cpu --gib 0.5 --tokens 4 --repeat "$repeat"; }
want distributed && { ran+=(distributed); run distributed distributed benchmarks/distributed.py --size-gib 0.25 --ranks 1 2; }
want download && { ran+=(download); run download download benchmarks/download.py --size-mib 192 --files 3; }
# the whole Wan2.1-T2V-1.3B pipeline (16.3 GiB of files, plain DiffSynth peaks near 17 GB): cold only, since
# its files and a loaded copy do not both fit a 24 GiB page cache; then disk offload in a cgroup of half the weights
want pipeline && { ran+=(pipeline); run pipeline pipeline benchmarks/pipeline.py --vram none,disk --cache cold --repeat "$repeat" --limited; }
want gpu_load && { ran+=(gpu_load); run gpu_load gpu_load benchmarks/gpu_load.py --size-gib "$size" --repeat "$repeat"; }

# Replace the results of what ran (a failed benchmark's old figures go too: they are not this run's).
for name in "${ran[@]}"; do
  case $name in
    sweep) rm -f "$results"/load-sweep-*.json ;;
    gpu_load) [ -f "$new/gpu_load.json" ] && rm -f "$results/gpu_load.json" ;;
    *) rm -f "$results/$name.json" ;;
  esac
done
mv "$new"/*.json "$results"/ 2>/dev/null
rmdir "$new" 2>/dev/null

status=0
if [ "${BENCH_REPORT:-1}" != 0 ]; then
  "$py" benchmarks/report.py --results "$results" || status=1
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "bench.sh: failed: ${failed[*]}" >&2
  status=1
fi
exit $status
