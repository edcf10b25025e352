"""The GPU load path's host logic on a machine without a GPU.

kernels/upload.cu (planning, the staging ring, piece tables, reader threads, error paths) is
built with g++ against tests/cuda_fake, a stand-in for the CUDA runtime where device memory is host
memory, and the convert kernel is the same kernels/dtype.h arithmetic run on the CPU. The Python
side (diffsynth_c/loader/direct_fill.py) then loads through it exactly as it would onto a GPU, with
torch's CUDA allocator swapped for CPU tensors. Each case runs in a fresh interpreter: the C core
opens one CUDA library per process."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from .conftest import random_tensor, run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.fail("a C++ compiler is needed to build tests/cuda_fake (scripts/env.sh installs g++)")
    out = str(tmp_path_factory.mktemp("fake") / "fake_cuda.so")
    cmd = [
        cxx,
        "-std=c++17",
        "-O1",
        "-g",
        "-shared",
        "-fPIC",
        "-fvisibility=hidden",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-DDSK_FAKE_CUDA",
        "-Itests/cuda_fake",
        "-Ikernels",
        "-x",
        "c++",
        "kernels/upload.cu",
        "tests/cuda_fake/fake_kernels.cpp",
        "-o",
        out,
        "-lpthread",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


PRELUDE = """
import ctypes, os, torch
import diffsynth_c
from diffsynth_c import _core, kernels
from diffsynth_c.dlpack import torch_dtype_of
from diffsynth_c.loader import direct_fill
assert _core.cuda_open({lib!r}) is None
fake = ctypes.CDLL({lib!r})
direct_fill._empty = lambda shape, dtype, dev: torch.full(shape, 7, dtype=torch_dtype_of(dtype)) if dtype not in ('F8_E4M3', 'F8_E5M2') else torch.zeros(shape, dtype=torch_dtype_of(dtype))
direct_fill._stream_of = lambda dev: 0
kernels.cast_rules = lambda s, d, i: (1, 0)
def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and (a.numel() == 0 or torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
"""


def _run(lib, body, env=None):
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        r = run_python(PRELUDE.format(lib=lib) + body, timeout=300)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture
def shards(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    s1 = {
        "a.weight": torch.randn(512, 384, generator=g).to(torch.bfloat16),
        "b.odd": torch.arange(3, dtype=torch.uint8),
        "c.weight": torch.randn(3, 1000, generator=g),
        "d.norm": torch.randn(257, generator=g).to(torch.float16),
        "e.f8": torch.randn(64, 33, generator=g).to(torch.float8_e4m3fn),
        "f.f8": torch.randn(65, generator=g).to(torch.float8_e5m2),
        "ids": torch.arange(17, dtype=torch.int64),
        "scalar": torch.tensor(1.5),
        "empty": torch.empty(0, 8, dtype=torch.bfloat16),
        "g.big": torch.randn(3, 1 << 19, generator=g),
    }
    s2 = {"a.weight": torch.randn(512, 384, generator=g).to(torch.bfloat16), "z": random_tensor((9, 9), torch.int32, 8)}
    p1, p2 = str(tmp_path / "m-1.safetensors"), str(tmp_path / "m-2.safetensors")
    save_file(s1, p1)
    save_file(s2, p2)
    return [p1, p2]


@pytest.mark.parametrize("staging_mib", ["2", "3", "256"])
def test_host_pipeline_gives_the_cpu_load(fake_lib, shards, staging_mib):
    """Every target dtype (None, and conversions on the "GPU" from each float dtype in the files)."""
    out = _run(
        fake_lib,
        f"""
paths = {shards!r}
for dtype in (None, torch.bfloat16, torch.float32, torch.float16, torch.float8_e5m2):
    dicts = direct_fill.load_to_cuda(paths, paths, dtype, "cuda:0")
    ref = [diffsynth_c.load_state_dict(p, torch_dtype=dtype) for p in paths]
    for d, r in zip(dicts, ref):
        assert list(d) == list(r)
        for k in r:
            assert same(d[k], r[k]), (dtype, k, d[k].dtype, r[k].dtype)
    print("ok", dtype, sum(len(d) for d in dicts))
""",
        {"DIFFSYNTH_C_STAGING_MIB": staging_mib, "DIFFSYNTH_C_THREADS": "3"},
    )
    assert out.count(" 12\n") == 5, out


def test_host_pipeline_one_rule_set_per_upload(fake_lib, shards):
    """Pairs under another rule set than the first, or under none, stay in the file's dtype for
    torch's .to(): same tensors as the CPU load, and only the first rule set's pairs are planned as
    GPU conversions."""
    out = _run(
        fake_lib,
        f"""
kernels.cast_rules = lambda s, d, i: {{"BF16": (1, 0), "F16": (0, 1), "F8_E4M3": None}}.get(s, (1, 0))
paths = {shards!r}
plan, rules = direct_fill._plan_cuda(paths, "F32", torch.device("cuda", 0))
converted = sorted({{t.dtype for t in plan.tensors if t.out_dtype != t.dtype}})
dicts = direct_fill.load_to_cuda(paths, paths, torch.float32, "cuda:0")
ref = [diffsynth_c.load_state_dict(p, torch_dtype=torch.float32) for p in paths]
for d, r in zip(dicts, ref):
    assert list(d) == list(r)
    for k in r:
        assert same(d[k], r[k]), (k, d[k].dtype, r[k].dtype)
print("rules", rules, converted)
""",
    )
    assert "rules (0, 1) ['F16']" in out, out


def test_host_pipeline_many_small_tensors(fake_lib, tmp_path):
    """More pieces than one slot's table holds: chunks close on the table, not only on bytes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    p = str(tmp_path / "small.safetensors")
    save_file({f"t{i:05d}": torch.randn(3 + i % 7, generator=g) for i in range(20000)}, p)
    out = _run(
        fake_lib,
        f"""
d = direct_fill.load_to_cuda([{p!r}], [{p!r}], torch.bfloat16, "cuda:0")[0]
r = diffsynth_c.load_state_dict({p!r}, torch_dtype=torch.bfloat16)
assert list(d) == list(r) and all(same(d[k], r[k]) for k in r)
print("ok")
""",
        {"DIFFSYNTH_C_STAGING_MIB": "2"},
    )
    assert out.strip() == "ok"


def test_host_pipeline_truncated_file_names_file_and_tensor(fake_lib, tmp_path):
    from safetensors.torch import save_file

    p = str(tmp_path / "t.safetensors")
    save_file({"a": torch.zeros(10), "w": torch.zeros(1 << 18)}, p)
    out = _run(
        fake_lib,
        f"""
real = direct_fill._plan_cuda
def cut(*args):
    plan = real(*args)
    os.truncate({p!r}, os.path.getsize({p!r}) - 4096)
    return plan
direct_fill._plan_cuda = cut
try:
    direct_fill.load_to_cuda([{p!r}], [{p!r}], None, "cuda:0")
except OSError as e:
    print(e)
""",
    )
    assert "t.safetensors: tensor 'w': the file ends before offset" in out


def test_host_pipeline_copy_failure_raises_with_cuda_message(fake_lib, shards):
    out = _run(
        fake_lib,
        f"""
fake.fake_set_fail_copy_at(3)
try:
    direct_fill.load_to_cuda({shards!r}, {shards!r}, torch.bfloat16, "cuda:0")
except RuntimeError as e:
    print(e)
fake.fake_set_fail_copy_at(-1)
d = direct_fill.load_to_cuda({shards!r}, {shards!r}, None, "cuda:0")  # and the next load works
print(len(d))
""",
        {"DIFFSYNTH_C_STAGING_MIB": "2"},
    )
    assert "to the GPU: load: cudaMemcpyAsync: cudaErrorFake: injected failure" in out
    assert out.strip().endswith("2")
