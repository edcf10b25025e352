"""Every input a fuzzer crashed on, kept in tests/fuzz/regressions/<harness>/, replayed through the
Python API in a child process: each must give a result or a Python exception, never a signal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REGRESSIONS = os.path.join(HERE, "fuzz", "regressions")

CHILD = r"""
import os, sys, tempfile, zipfile, warnings
warnings.simplefilter("ignore")
from diffsynth_c import _core
harness, path = sys.argv[1], sys.argv[2]
data = open(path, "rb").read()
with tempfile.TemporaryDirectory() as tmp:
    if harness == "fuzz_safetensors":
        target = os.path.join(tmp, "x.safetensors")
        open(target, "wb").write(data)
        call = lambda: _core.read_header(target)
    elif harness == "fuzz_plan":  # the file laid out as the planner's users lay it out
        target = os.path.join(tmp, "x.safetensors")
        open(target, "wb").write(data)
        call = lambda: [
            _core.plan_buffers([target, target], 64, "file", target="F32", convert_from=["BF16", "F16"]),
            _core.plan_buffers([target, target], 256, "tensor"),
            _core.plan_buffers([target, target], 64, "buckets", merge=True, readers=3, bucket_bytes=4096),
        ]
    elif harness == "fuzz_unpickle":  # the stream as the data.pkl of a checkpoint
        target = os.path.join(tmp, "x.bin")
        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", data)
            z.writestr("archive/version", "3\n")
        call = lambda: _core.torch_read(target)
    else:
        target = os.path.join(tmp, "x.bin")
        open(target, "wb").write(data)
        call = lambda: _core.torch_read(target)
    try:
        call()
        print("accepted")
    except Exception as e:
        print("refused:", type(e).__name__)
"""


def cases():
    if not os.path.isdir(REGRESSIONS):
        return []
    return [(h, f) for h in sorted(os.listdir(REGRESSIONS)) for f in sorted(os.listdir(os.path.join(REGRESSIONS, h)))]


@pytest.mark.parametrize("harness,name", cases())
def test_fuzzer_finding_stays_fixed(harness, name):
    r = subprocess.run(
        [sys.executable, "-c", CHILD, harness, os.path.join(REGRESSIONS, harness, name)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, f"{harness}/{name}: exit {r.returncode}\n{r.stderr[-2000:]}"
    assert r.stdout.startswith(("accepted", "refused:"))
