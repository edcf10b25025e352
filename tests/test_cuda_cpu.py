"""The CUDA side, checked on a machine without a GPU: the build, cuda_available(), the kernels'
argument checks (raised before any launch) and the kernels' element arithmetic, which is
kernels/dtype.h compiled into the C core and run here with the GPU's rules."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import diffsynth_c
from diffsynth_c import _core, kernels
from diffsynth_c.core.conversion import probe

from .conftest import random_tensor, same_tensor

KDTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(WORD[t.element_size()]).to(torch.int64) & ((1 << (8 * t.element_size())) - 1)


def test_cuda_available_is_a_bool_with_a_reason():
    assert isinstance(diffsynth_c.cuda_available(), bool)
    assert isinstance(kernels.cuda_status(), str) and kernels.cuda_status()
    if not torch.cuda.is_available():
        assert diffsynth_c.cuda_available() is False


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed here")
def test_cuda_library_built_when_nvcc_is_found():
    lib = os.path.join(os.path.dirname(diffsynth_c.__file__), "_cuda.so")
    assert os.path.exists(lib), "setup.py found nvcc but built no CUDA library"
    # it opens without a driver (the runtime is linked statically, the driver is looked up lazily)
    assert _core.cuda_open(lib) is None


def test_core_does_not_link_cuda():
    so = _core.__file__
    with open(so, "rb") as f:
        blob = f.read()
    assert b"libcudart" not in blob and b"libcuda.so" not in blob


@pytest.mark.parametrize("src, dst", [(s, d) for s in KDTYPES for d in KDTYPES if s != d])
def test_gpu_rules_arithmetic_matches_torch_off_nan(src, dst):
    """What the CUDA cast computes (CUDA's NaN rule, E4M3 not saturating), run on the CPU through
    the same helpers: equal to torch's .to() on every non-NaN result, NaN where torch gives NaN,
    and CUDA's canonical NaN bits for 16-bit results."""
    x = probe(src)
    # E4M3 overflow is the one place the rule is chosen per torch build: follow this torch's CPU
    saturate = int(dst == "F8_E4M3" and torch.tensor([1000.0]).to(torch.float8_e4m3fn).float().item() == 448.0)
    got_bytes = _core.convert(src, dst, x.contiguous().view(torch.uint8).numpy(), rules=(1, saturate))
    got = torch.frombuffer(bytearray(got_bytes), dtype=torch.uint8).view(KDTYPES[dst])
    want = x.to(KDTYPES[dst])
    nan = torch.isnan(want.float())
    assert torch.equal(torch.isnan(got.float()), nan)
    assert torch.equal(_bits(got)[~nan], _bits(want)[~nan])
    if dst in ("F16", "BF16") and nan.any():
        assert set(_bits(got)[nan].tolist()) == {0x7FFF}
    if dst == "F32" and src == "F16" and nan.any():  # __half2float: the canonical NaN
        assert set(_bits(got)[nan].tolist()) == {0x7FFFFFFF}
    if dst == "F32" and src == "F8_E5M2" and nan.any():  # c10's software widening: canonical, then the sign
        negative = (x.view(torch.uint8) & 0x80).bool()
        assert set(_bits(got)[nan & ~negative].tolist()) == {0x7FFFFFFF}
        assert set(_bits(got)[nan & negative].tolist()) == {0xFFFFFFFF}


def test_cpu_rules_equal_the_loader_conversion():
    """rules=(0, saturate) is the CPU loader's own arithmetic (portable path)."""
    x = probe("F16")
    for dst in ("F32", "F8_E5M2", "F8_E4M3"):
        a = _core.convert("F16", dst, x.view(torch.uint8).numpy(), portable=True)
        b = _core.convert("F16", dst, x.view(torch.uint8).numpy(), rules=(0, 1))
        assert a == b, dst


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (
            lambda: kernels.cast(torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)),
            ValueError,
            "not on a CUDA device",
        ),
        (lambda: kernels.cast("x", torch.zeros(4)), TypeError, "expected a torch.Tensor"),
        (lambda: kernels.rms_norm(torch.zeros(2, 4), None), ValueError, "not on a CUDA device"),
        (lambda: kernels.layer_norm(torch.zeros(2, 4).t(), None), ValueError, "not on a CUDA device"),
    ],
)
def test_kernel_arguments_checked_before_launch(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_kernel_raises_clearly_without_cuda(monkeypatch):
    """Past the argument checks, a machine without the kernels says why instead of crashing."""
    if diffsynth_c.cuda_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setattr(kernels, "_check_cuda", lambda t, what: None)
    with pytest.raises(RuntimeError, match="CUDA kernels are not available"):
        kernels.cast(torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16))


def test_core_refuses_cpu_capsules_for_kernels():
    lib = os.path.join(os.path.dirname(diffsynth_c.__file__), "_cuda.so")
    if not os.path.exists(lib):
        pytest.skip("no CUDA library")
    assert _core.cuda_open(lib) is None
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="not in CUDA device memory"):
        _core.cuda_cast(x.__dlpack__(), x.__dlpack__(), "F32", "F32", 0)
    with pytest.raises(TypeError, match="F8_E5M2, not I64"):
        _core.cuda_cast(x.__dlpack__(), x.__dlpack__(), "I64", "F32", 0)


# ---- read_into: the C side of pin_memory=True, on ordinary memory ----


def _read_into_all(path, dtype_for=lambda d: d):
    _hl, start, tensors, _m = _core.read_header(path)
    outs, bufs, items = {}, [], []
    for name, dtype, shape, b, e in tensors:
        out_dtype = dtype_for(dtype)
        t = torch.empty(
            shape,
            dtype=getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}[out_dtype]),
        )
        outs[name] = t
        out_nbytes = t.numel() * t.element_size()
        items.append((name, 0, start + b, e - b, dtype, out_dtype, tuple(shape), len(bufs), 0, out_nbytes))
        bufs.append(t)  # a torch tensor: C takes its address and size through __dlpack__
    _core.read_into([path], bufs, items, 4)
    return outs


def test_read_into_fills_caller_memory(model_files):
    ref = diffsynth_c.load_state_dict(model_files[0])
    got = _read_into_all(model_files[0])
    for k in ref:
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8)), k


def test_read_into_converts_like_the_loader(model_files):
    ref = diffsynth_c.load_state_dict(model_files[0], torch_dtype=torch.float32)
    got = _read_into_all(model_files[0], lambda d: "F32" if d in ("BF16", "F16", "F32") else d)
    floats = [k for k in ref if got[k].dtype == torch.float32]
    assert len(floats) == 5
    for k in floats:
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8)), k


def test_read_into_fills_a_plan(model_files):
    """plan_buffers' entries go back into read_into as they came out, into any buffer C can size."""
    plan = _core.plan_buffers(model_files, 64, target="F32", convert_from=["BF16", "F16"])
    bufs = [bytearray(b.nbytes) for b in plan.buffers]
    _core.read_into(model_files, bufs, [t for t in plan.tensors if t.nbytes], 2)
    for fi, p in enumerate(model_files):
        ref = diffsynth_c.load_state_dict(p, torch_dtype=torch.float32)
        for t in (t for t in plan.tensors if t.file == fi):
            got = bytes(bufs[t.buffer][t.buffer_offset : t.buffer_offset + t.out_nbytes])
            want = ref[t.key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            if t.dtype in ("BF16", "F16", "F32"):  # DiffSynth converts the rest with torch
                assert got == want, t.key


def test_read_into_overrun_raises_and_writes_nothing(tmp_path):
    from safetensors.torch import save_file

    p = str(tmp_path / "t.safetensors")
    save_file({"a": random_tensor((16,), torch.float32, 1), "b": random_tensor((1024,), torch.float32, 2)}, p)
    plan = _core.plan_buffers([p], 64)
    a, b = plan.tensors
    buf = bytearray(b"\xee" * (b.buffer_offset + b.out_nbytes - 1))  # one byte short for 'b'
    with pytest.raises(ValueError, match=r"t\.safetensors: tensor 'b': bytes \[\d+, \d+\) do not fit in buffer 0"):
        _core.read_into([p], [buf], [a, b])
    assert buf == bytearray(b"\xee" * len(buf))  # 'a' was not read either: every item is checked first
    fields = (a.key, 0, a.offset, a.nbytes, a.dtype, a.out_dtype, a.shape, 0)
    with pytest.raises(ValueError, match="tensor 'a'.*do not fit"):
        _core.read_into([p], [buf], [fields + (len(buf) - 8, a.out_nbytes)])
    with pytest.raises(ValueError, match="tensor 'a'.*do not fit"):  # offset + nbytes would wrap around 64 bits
        _core.read_into([p], [buf], [fields + (2**64 - 8, a.out_nbytes)])
    with pytest.raises(ValueError, match=r"t\.safetensors: tensor 'b'.*do not fit"):
        _core.OpenFile(p).read_into([buf], [b])
    with pytest.raises(BufferError):
        _core.read_into([p], [bytes(len(buf))], [a])  # read-only memory
    with pytest.raises(TypeError, match="neither a buffer"):
        _core.read_into([p], [12345], [a])  # an address is not a buffer
    assert buf == bytearray(b"\xee" * len(buf))


def test_read_into_truncated_names_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    p = str(tmp_path / "t.safetensors")
    save_file({"a": random_tensor((1024,), torch.float32, 1)}, p)
    _hl, start, _tensors, _m = _core.read_header(p)
    os.truncate(p, os.path.getsize(p) - 100)
    out = torch.empty(1024)
    with pytest.raises((OSError, ValueError)) as info:
        _core.read_into([p], [out], [("a", 0, start, 4096, "F32", "F32", (1024,), 0, 0, 4096)], 2)
    assert "t.safetensors" in str(info.value) and "'a'" in str(info.value)


def test_read_into_rejects_bad_items(tmp_path):
    out = bytearray(16)
    with pytest.raises(IndexError, match="names file 3"):
        _core.read_into([], [out], [("k", 3, 0, 4, "F32", "F32", (1,), 0, 0, 4)])
    with pytest.raises(ValueError, match="no conversion from I64 to F32"):
        _core.read_into(["x"], [out], [("k", 0, 0, 8, "I64", "F32", (1,), 0, 0, 4)])
    with pytest.raises(ValueError, match="whole number of"):
        _core.read_into(["x"], [out], [("k", 0, 0, 3, "F32", "BF16", (1,), 0, 0, 2)])
    with pytest.raises(ValueError, match="are not 8 bytes of BF16"):
        _core.read_into(["x"], [out], [("k", 0, 0, 8, "F32", "BF16", (2,), 0, 0, 8)])
    with pytest.raises(IndexError, match="names buffer 1 of 1"):
        _core.read_into(["x"], [out], [("k", 0, 0, 8, "F32", "F32", (2,), 1, 0, 8)])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_pinned_load_reads_into_one_buffer_per_file(model_files, monkeypatch, dtype):
    """load_pinned with torch's pinned allocator swapped for ordinary memory (no CUDA here): same
    tensors as the ordinary load, each a view into its file's buffer."""
    from diffsynth_c.loader import direct_fill

    buffers = []

    def fake_pinned(n):
        buffers.append(torch.empty(n, dtype=torch.uint8))
        return buffers[-1]

    monkeypatch.setattr(direct_fill, "_pinned_buffer", fake_pinned)
    monkeypatch.setattr(direct_fill, "_pin", lambda x: x)
    got = direct_fill.load_pinned(model_files, model_files, dtype)
    assert len(buffers) == 2
    for d, p, buf in zip(got, model_files, buffers):
        ref = diffsynth_c.load_state_dict(p, torch_dtype=dtype)
        assert list(d) == list(ref)
        for k in ref:
            assert same_tensor(d[k], ref[k]), k
            torch_converted = dtype is not None and k == "pos_ids"  # int64: torch's .to(), then pinned
            if d[k].numel() and not torch_converted:
                start = d[k].untyped_storage().data_ptr()
                assert start == buf.untyped_storage().data_ptr(), f"{k} is not a view into the file's buffer"
