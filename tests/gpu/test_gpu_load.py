"""load_state_dict(device="cuda") and pin_memory=True against the CPU load, bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

import diffsynth_c
from diffsynth_c.loader import direct_fill

from ..conftest import random_tensor
from .conftest import write_safetensors


def same(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.cpu().reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8))


@pytest.fixture
def shards(tmp_path):
    s1 = {
        "a.weight": random_tensor((512, 384), torch.bfloat16, 1),
        "odd": torch.arange(3, dtype=torch.uint8),  # the next tensor starts unaligned
        "b.weight": random_tensor((3, 1000), torch.float32, 2),
        "c.norm": random_tensor((257,), torch.float16, 3),
        "d.f8": random_tensor((64, 33), torch.float8_e4m3fn, 4),
        "e.f8": random_tensor((65,), torch.float8_e5m2, 5),
        "ids": torch.arange(17, dtype=torch.int64),
        "scalar": torch.tensor(1.5),
        "empty": torch.empty(0, 8, dtype=torch.bfloat16),
        "big": random_tensor((3, 1 << 20), torch.float32, 6),  # crosses staging slots
    }
    s2 = {"a.weight": random_tensor((512, 384), torch.bfloat16, 7), "z": random_tensor((9, 9), torch.float16, 8)}
    return [write_safetensors(tmp_path / "m-1.safetensors", s1), write_safetensors(tmp_path / "m-2.safetensors", s2)]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32, torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("staging_mib", [None, "2"])
def test_cuda_load_equals_cpu_load_moved(shards, dtype, staging_mib, monkeypatch):
    if staging_mib:
        monkeypatch.setenv("DIFFSYNTH_C_STAGING_MIB", staging_mib)
    ref = diffsynth_c.load_state_dict(shards, torch_dtype=None, device="cpu")
    ref = {k: (v.to("cuda").to(dtype) if dtype is not None else v.to("cuda")) for k, v in ref.items()}
    got = diffsynth_c.load_state_dict(shards, torch_dtype=dtype, device="cuda")
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].device.type == "cuda"
        assert same(got[k], ref[k]), k


def test_cuda_load_matches_diffsynth(shards):
    diffsynth = pytest.importorskip("diffsynth.core.loader.file")
    ref = diffsynth.load_state_dict(shards, torch_dtype=torch.bfloat16, device="cuda")
    got = diffsynth_c.load_state_dict(shards, torch_dtype=torch.bfloat16, device="cuda")
    assert list(got) == list(ref) and all(same(got[k], ref[k]) for k in ref)


def test_cuda_load_on_explicit_device_index(shards):
    got = diffsynth_c.load_state_dict(shards, device="cuda:0")
    assert all(t.device == torch.device("cuda", 0) for t in got.values())


def test_pin_memory_reads_straight_into_pinned_memory(shards):
    ref = diffsynth_c.load_state_dict(shards, torch_dtype=torch.bfloat16)
    got = diffsynth_c.load_state_dict(shards, torch_dtype=torch.bfloat16, pin_memory=True)
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].device.type == "cpu" and same(got[k], ref[k]), k
        if got[k].numel():
            assert got[k].is_pinned(), k


def test_truncated_file_names_file_and_tensor(tmp_path):
    p = write_safetensors(tmp_path / "t.safetensors", {"w": random_tensor((1 << 18,), torch.float32, 1)})
    size = os.path.getsize(p)
    header_ok = diffsynth_c.load_state_dict(p)  # noqa: F841 (the header is valid)
    real_plan = direct_fill._plan_cuda

    def plan_then_truncate(*args):
        out = real_plan(*args)
        os.truncate(p, size - 4096)
        return out

    direct_fill._plan_cuda = plan_then_truncate
    try:
        with pytest.raises(OSError, match=r"t\.safetensors: tensor 'w': the file ends before"):
            diffsynth_c.load_state_dict(p, device="cuda")
    finally:
        direct_fill._plan_cuda = real_plan


def test_out_of_memory_frees_what_was_allocated(tmp_path):
    p = write_safetensors(tmp_path / "m.safetensors", {f"w{i}": torch.zeros(1 << 20) for i in range(8)})
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # blocks cached by earlier tests would serve the load: mem_get_info does not count them
    before = torch.cuda.memory_allocated()
    free, _total = torch.cuda.mem_get_info()
    hog = torch.empty(free - (12 << 20), dtype=torch.uint8, device="cuda")  # leave room for ~3 of the 8 tensors
    try:
        with pytest.raises(torch.OutOfMemoryError):
            diffsynth_c.load_state_dict(p, device="cuda")
    finally:
        del hog
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
