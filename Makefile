# The README's two commands are `make demo` and `make test`; the rest are for developers.
.PHONY: demo test bench env clean

demo:
	scripts/demo.sh

test:
	scripts/test.sh

bench:
	scripts/bench.sh

env:
	scripts/env.sh

clean:
	rm -rf build diffsynth_c/*.so *.egg-info
