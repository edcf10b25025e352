"""Tensors leave C through DLPack: torch and numpy take them without a copy, the capsule protocol
is followed (legacy and versioned), and memory is freed when the last user dies."""

from __future__ import annotations

import ctypes
import gc
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffsynth_c import _core
from diffsynth_c.dlpack import to_numpy, to_torch

from .conftest import random_tensor, run_python


@pytest.fixture
def one_file(tmp_path):
    p = str(tmp_path / "t.safetensors")
    save_file(
        {
            "bf": random_tensor((4, 8), torch.bfloat16, 1),
            "f": random_tensor((3,), torch.float32, 2),
            "e4": random_tensor((5,), torch.float8_e4m3fn, 3),
            "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
            "b": torch.tensor([True, False, True]),
        },
        p,
    )
    return p


def load_one(path, mode="mmap"):
    return dict(_core.load([path], None, 2, mode)[0])


def test_torch_and_numpy_share_memory(one_file):
    ts = load_one(one_file)
    f = ts["f"]
    x = torch.from_dlpack(f)
    a = np.from_dlpack(f)
    assert x.data_ptr() == f.data_ptr == a.ctypes.data
    x[0] = 42.0
    assert a[0] == 42.0  # same bytes
    assert to_torch(ts["e4"]).dtype == torch.float8_e4m3fn and to_torch(ts["e4"]).data_ptr() == ts["e4"].data_ptr


def test_numpy_dtypes(one_file):
    import ml_dtypes

    ts = load_one(one_file)
    ref = torch.load  # noqa: F841 - torch is the reference for the bits below
    bf = to_numpy(ts["bf"])
    assert bf.dtype == ml_dtypes.bfloat16 and bf.shape == (4, 8)
    assert np.array_equal(bf.view(np.uint16), to_torch(ts["bf"]).view(torch.int16).numpy().view(np.uint16))
    assert to_numpy(ts["e4"]).dtype == ml_dtypes.float8_e4m3fn
    assert np.from_dlpack(ts["bf"].bits()).dtype == np.uint16
    assert np.from_dlpack(ts["b"]).dtype == np.bool_
    assert np.array_equal(to_numpy(ts["i"]), np.arange(6).reshape(2, 3))


def test_capsules_legacy_and_versioned(one_file):
    t = load_one(one_file)["f"]
    region = t.region
    base = sys.getrefcount(region)
    legacy = t.__dlpack__()
    versioned = t.__dlpack__(max_version=(1, 0))
    newer = t.__dlpack__(max_version=(1, 3))
    old = t.__dlpack__(max_version=(0, 8))
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    assert get_name(legacy) == b"dltensor" and get_name(old) == b"dltensor"
    assert get_name(versioned) == b"dltensor_versioned" and get_name(newer) == b"dltensor_versioned"
    assert sys.getrefcount(region) == base + 4  # each capsule owns a reference
    del legacy, versioned, newer, old  # unconsumed capsules release it
    assert sys.getrefcount(region) == base
    x = torch.from_dlpack(t)  # consumed: torch owns it now
    assert sys.getrefcount(region) == base + 1
    del x
    gc.collect()
    assert sys.getrefcount(region) == base


def test_dlpack_arguments(one_file):
    t = load_one(one_file)["f"]
    assert t.__dlpack_device__() == (1, 0)
    with pytest.raises(BufferError):
        t.__dlpack__(dl_device=(2, 0))
    with pytest.raises(ValueError):
        t.__dlpack__(stream=1)
    with pytest.raises(TypeError):
        t.__dlpack__(max_version=3)
    copy = torch.from_dlpack(t.__dlpack__(max_version=(1, 0), copy=True))
    assert copy.data_ptr() != t.data_ptr and torch.equal(copy, torch.from_dlpack(t))


def test_tensors_outlive_everything_but_themselves(one_file):
    x = to_torch(load_one(one_file)["i"])  # the Tensor objects and their list are gone
    gc.collect()
    assert torch.equal(x, torch.arange(6).reshape(2, 3))


def test_memory_returns_after_del(tmp_path):
    """Load 256 MiB, drop it, and the process's resident memory falls back (both modes)."""
    p = str(tmp_path / "big.safetensors")
    small = str(tmp_path / "small.safetensors")
    save_file({f"w{i}": torch.ones(1 << 22, dtype=torch.float32) for i in range(16)}, p)
    save_file({"w": torch.ones(1024, dtype=torch.float32)}, small)
    # A first small load pays the one-time costs (torch's conversion kernels paged in, the
    # conversion probe's caches) so that what is measured is the data alone.
    code = f"""
import gc, torch, diffsynth_c
def rss():
    with open('/proc/self/status') as f:
        return int(next(l for l in f if l.startswith('VmRSS')).split()[1]) // 1024
import os
os.environ['DIFFSYNTH_C_LOAD_MODE'] = '{{mode}}'
diffsynth_c.load_state_dict({small!r}, torch_dtype={{dtype}})
gc.collect()
start = rss()
sd = diffsynth_c.load_state_dict({p!r}, torch_dtype={{dtype}})
loaded = rss()
del sd; gc.collect()
print(start, loaded, rss())
"""
    for mode, dtype in [("mmap", "None"), ("read", "None"), ("mmap", "torch.bfloat16")]:
        r = run_python(code.replace("{mode}", mode).replace("{dtype}", dtype))
        assert r.returncode == 0, r.stderr
        start, loaded, after = map(int, r.stdout.split())
        assert loaded - start >= 120, (mode, dtype, start, loaded, after)  # really resident
        assert after - start <= 16, (mode, dtype, start, loaded, after)


def test_bits_shares_bytes(one_file):
    t = load_one(one_file)["bf"]
    b = t.bits()
    assert b.data_ptr == t.data_ptr and b.region is t.region and b.dtype == "BF16"
    assert torch.from_dlpack(b).dtype == torch.uint16
