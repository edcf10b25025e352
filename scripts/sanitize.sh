#!/usr/bin/env bash
# The C core built with AddressSanitizer and UndefinedBehaviorSanitizer (gcc, -O1 -g) into
# build/asan, and the tests of the C core run against that build: any report fails the run.
# The in-place build the other tests use is left alone.
#   scripts/sanitize.sh [PYTEST ARGS...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$root/scripts/env.sh")
out=$root/build/asan
rm -rf "$out/pkg" && mkdir -p "$out/pkg"
cp -r "$root/diffsynth_c" "$out/pkg/"
rm -f "$out/pkg/diffsynth_c/"*.so
(cd "$root" && DIFFSYNTH_C_CUDA=0 DIFFSYNTH_C_WERROR=1 DIFFSYNTH_C_SANITIZE=address,undefined \
  "$venv/bin/python" setup.py -q build_ext --build-lib "$out/pkg" --build-temp "$out/tmp" >&2)
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
default_tests=""
for t in safetensors_format errors load_state_dict dlpack hash convert torch_checkpoint folders fuzz_regressions \
         fuzz_parsers reliability torch_fidelity torch_serialization_ported safetensors_ported parser_cost safe_open \
         disk_map plan; do
  default_tests="$default_tests $root/tests/test_$t.py"
done
tests=${*:-$default_tests}
# run from the sanitized tree (python -m puts the working directory first on sys.path) and let
# pytest append the checkout (--import-mode=append), so the sanitized package is the one imported
cd "$out/pkg"
timeout --kill-after=30 "${DIFFSYNTH_C_TEST_TIMEOUT:-1200}" env PYTHONPATH="$out/pkg" LD_PRELOAD="$asan $ubsan" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allow_user_segv_handler=1:allocator_may_return_null=1 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 DIFFSYNTH_C_EXPECT_SANITIZED=1 \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider --import-mode=append --rootdir "$root" -c "$root/pyproject.toml" $tests
