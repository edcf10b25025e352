# The README's two commands are `make demo` and `make test`; the rest are for developers.
.PHONY: demo test bench gpu-test gpu-bench env clean

demo:
	scripts/demo.sh

test:
	scripts/test.sh

bench:
	scripts/bench.sh

# On a machine with a CUDA GPU, after `pip install --no-build-isolation -e .` into an environment
# that has torch and pytest (the GPU machines have no network, so no venv is built here).
PYTHON ?= python3
gpu-test:
	$(PYTHON) -m pytest -q tests/gpu tests/test_cuda_cpu.py

gpu-bench:
	$(PYTHON) benchmarks/gpu_load.py --check

env:
	scripts/env.sh

clean:
	rm -rf build diffsynth_c/*.so *.egg-info
