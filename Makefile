# The README's two commands are `make demo` and `make test`; the rest are for developers.
.PHONY: demo test bench bench-report fuzz sanitize gpu-test gpu-bench env clean

demo:
	scripts/demo.sh

test:
	scripts/test.sh

# every benchmark, then docs/benchmarks.md's generated section and docs/img/ (BENCH_* settings: scripts/bench.sh)
bench:
	scripts/bench.sh

# the report alone, from the results files already in benchmarks/results/
bench-report:
	"$$(scripts/env.sh)"/bin/python benchmarks/report.py

# each libFuzzer harness of tests/fuzz for FUZZ_SECONDS (the test command runs them for 60 s)
FUZZ_SECONDS ?= 300
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

# the C core's tests against an AddressSanitizer + UBSan build (part of the test command)
sanitize:
	scripts/sanitize.sh

# On a machine with a CUDA GPU, after `pip install --no-build-isolation -e .` into an environment
# that has torch and pytest (the GPU machines have no network, so no venv is built here).
PYTHON ?= python3
gpu-test:
	$(PYTHON) -m pytest -q tests/gpu tests/test_cuda_cpu.py

# records benchmarks/results/gpu_load.json, which `make bench-report` puts into docs/benchmarks.md
gpu-bench:
	$(PYTHON) benchmarks/gpu_load.py --check --json benchmarks/results/gpu_load.json

env:
	scripts/env.sh

clean:
	rm -rf build diffsynth_c/*.so *.egg-info
