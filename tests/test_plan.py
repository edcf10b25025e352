"""The buffer layout (csrc/plan.c, plan_layout_build) through _core.plan_buffers: named results,
aligned and non-overlapping offsets, conversions sized by the dtypes, bad input named."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffsynth_c import _core


@pytest.fixture()
def two_files(tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file({"w": torch.randn(3, 5), "h": torch.randn(7).bfloat16(), "e": torch.empty(0), "i": torch.arange(3)}, a)
    save_file({"h": torch.randn(9), "z": torch.randn(2).half()}, b)
    return [a, b]


def test_per_file_layout_with_conversions(two_files):
    plan = _core.plan_buffers(two_files, 256, target="F32", convert_from=["BF16", "F16"])
    assert isinstance(plan, _core.BufferPlan) and isinstance(plan.tensors[0], _core.PlannedTensor)
    assert [(b.file, b.reader) for b in plan.buffers] == [(0, 0), (1, 0)]
    assert [(t.file, t.key) for t in plan.tensors] == [(0, "e"), (0, "h"), (0, "i"), (0, "w"), (1, "h"), (1, "z")]
    by = {(t.file, t.key): t for t in plan.tensors}
    assert (by[0, "h"].dtype, by[0, "h"].out_dtype, by[0, "h"].nbytes, by[0, "h"].out_nbytes) == ("BF16", "F32", 14, 28)
    assert (by[0, "i"].out_dtype, by[0, "i"].out_nbytes) == ("I64", 24)
    assert by[1, "z"].out_nbytes == 8 and by[0, "w"].shape == (3, 5)
    for t in plan.tensors:
        assert t.buffer == t.file and t.buffer_offset % 256 == 0
        assert t.buffer_offset + t.out_nbytes <= plan.buffers[t.buffer].nbytes
    header = _core.read_header(two_files[0])
    assert by[0, "w"].offset == header[1] + next(e[3] for e in header[2] if e[0] == "w")


def test_per_tensor_and_merged_buckets(two_files):
    plan = _core.plan_buffers(two_files, 256, "tensor")
    assert len(plan.buffers) == len(plan.tensors) == 6
    assert all(t.buffer == i and t.buffer_offset == 0 for i, t in enumerate(plan.tensors))
    merged = _core.plan_buffers(two_files, 64, "buckets", merge=True, readers=2, bucket_bytes=64)
    assert [t.key for t in merged.tensors] == ["e", "h", "i", "w", "z"]  # first-seen order
    assert next(t for t in merged.tensors if t.key == "h").file == 1  # the later file's wins
    assert all(b.file == -1 and b.reader in (0, 1) for b in merged.buffers)


def test_bad_arguments_and_files_raise(two_files, tmp_path):
    with pytest.raises(ValueError, match="not a power of two"):
        _core.plan_buffers(two_files, 96)
    with pytest.raises(ValueError, match="split must be"):
        _core.plan_buffers(two_files, 64, "rows")
    with pytest.raises(ValueError, match="no conversion from I64 to F32"):
        _core.plan_buffers(two_files, 64, target="F32", convert_from=["I64"])
    with pytest.raises(ValueError, match="readers must be at least 1"):
        _core.plan_buffers(two_files, 64, "buckets", readers=0)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(_core.FormatError, match="bad.safetensors"):
        _core.plan_buffers([two_files[0], str(bad)], 64)
    with pytest.raises(OSError, match="missing.safetensors"):
        _core.plan_buffers([str(tmp_path / "missing.safetensors")], 64)
