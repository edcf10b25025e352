#!/usr/bin/env bash
# Builds the libFuzzer harnesses of tests/fuzz/ (clang, AddressSanitizer + UBSan) into build/fuzz
# and runs each for SECONDS (default 60) from seed corpora made by the real writers. A crash
# leaves its input in build/fuzz/crashes/<harness>/ and makes this script fail; keep the input in
# tests/fuzz/regressions/<harness>/ once fixed (tests/test_fuzz_regressions.py replays them).
#   scripts/fuzz.sh [SECONDS] [HARNESS...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
shift || true
venv=$("$root/scripts/env.sh")
cc=$(command -v clang-14 || command -v clang || true)
if [ -z "$cc" ] || ! "$cc" -fsanitize=fuzzer -x c /dev/null -o /dev/null -Wl,--unresolved-symbols=ignore-all 2>/dev/null; then
  echo "fuzz.sh: installing clang and its fuzzer runtime" >&2
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo
  $sudo_cmd apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq clang-14 libclang-rt-14-dev >&2
  cc=$(command -v clang-14)
fi
out=$root/build/fuzz
mkdir -p "$out/bin"
sources=$(for f in safetensors json arena lastwins torchzip unpickle torchfile io error guard lease plan keyhash convert; do echo "$root/csrc/$f.c"; done)
harnesses=${*:-fuzz_safetensors fuzz_torchzip fuzz_unpickle fuzz_torchfile fuzz_plan}
for h in $harnesses; do
  "$cc" -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -std=c11 \
    -I"$root/csrc" -I"$root/kernels" -DDS_VERSION='"fuzz"' -DCV_NO_F16C "$root/tests/fuzz/$h.c" $sources -lpthread -ldl -lm \
    -o "$out/bin/$h"
done
rm -rf "$out/corpus" && "$venv/bin/python" "$root/tests/fuzz/make_corpus.py" "$out/corpus" 2>/dev/null
status=0
for h in $harnesses; do
  mkdir -p "$out/crashes/$h" "$out/work/$h"
  log=$out/$h.log
  # Cost is a finding too: every parser is linear in its input, so no input of at most 64 KiB may
  # take two seconds or allocate more than 64 MiB at once; a bomb (shared pickle references, a huge
  # memo index, a lying zip directory) trips -timeout or -malloc_limit_mb. The process-wide RSS
  # limit leaves room for ASan (its shadow and a quarantine kept at 64 MiB) and libFuzzer's corpus,
  # which grow over a run whatever the inputs: at 384 MiB a 30 s run of fuzz_torchzip tripped it
  # inside libFuzzer's own allocations.
  if ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=64} \
     "$out/bin/$h" -max_total_time="$seconds" -rss_limit_mb=1024 -malloc_limit_mb=64 -max_len=65536 -timeout=2 \
       -artifact_prefix="$out/crashes/$h/" -print_final_stats=1 "$out/work/$h" "$out/corpus/$h" >"$log" 2>&1; then
    echo "fuzz.sh: $h: $(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}') runs in ${seconds}s," \
         "$(grep -oE 'cov: [0-9]+' "$log" | tail -1) edges, no crash"
  else
    echo "fuzz.sh: $h FAILED; see $log and $out/crashes/$h/" >&2
    tail -30 "$log" >&2
    status=1
  fi
done
exit $status
