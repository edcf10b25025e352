"""The CUDA kernels against torch on the GPU: cast bit for bit, norms within torch's tolerances."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffsynth_c import _core, kernels
from diffsynth_c.core.conversion import probe

DT = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
PAIRS = [(s, d) for s in DT for d in DT if s != d]
WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def bits(t):
    return t.contiguous().view(WORD[t.element_size()])


@pytest.mark.parametrize("src, dst", PAIRS)
def test_cast_every_pattern_bit_identical(src, dst):
    x = probe(src).cuda()
    want = x.to(DT[dst])
    got = kernels.cast(x, torch.empty_like(want))
    assert torch.equal(bits(got), bits(want))
    # the rule the kernel settled on reproduces the CPU-side helpers bit for bit
    rules = kernels.cast_rules(src, dst, x.device.index or 0)
    assert rules is not None, f"no rule matches torch's CUDA {src}->{dst}"
    ref = _core.convert(src, dst, probe(src).view(torch.uint8).numpy(), rules=rules)
    assert bytes(got.view(torch.uint8).cpu().numpy()) == ref


@pytest.mark.parametrize("src, dst", PAIRS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1023, (1 << 20) + 3])
def test_cast_sizes_and_offsets(src, dst, n):
    g = torch.Generator(device="cuda").manual_seed(n)
    x = (torch.randn(n + 1, device="cuda", generator=g) * 100).to(DT[src])
    for a in (x[:n], x[1:]):  # aligned, and one element off (scalar path)
        want = a.to(DT[dst])
        got = kernels.cast(a, torch.empty_like(want))
        assert torch.equal(bits(got), bits(want))
        out = torch.empty(n + 1, dtype=DT[dst], device="cuda")[1:]
        assert torch.equal(bits(kernels.cast(a, out)), bits(want))


def test_cast_specials_overflow_and_subnormals():
    v = torch.tensor(
        [
            float("nan"),
            float("inf"),
            -float("inf"),
            1e6,
            -1e6,
            500.0,
            448.0,
            464.0,
            1e-9,
            -0.0,
            2.0**-10,
            2.0**-17,
            65519.0,
            65520.0,
        ],
        device="cuda",
    )
    for d in ("F16", "BF16", "F8_E4M3", "F8_E5M2"):
        want = v.to(DT[d])
        assert torch.equal(bits(kernels.cast(v, torch.empty_like(want))), bits(want)), d


def test_cast_on_a_side_stream():
    s = torch.cuda.Stream()
    x = torch.randn(1 << 22, device="cuda")
    out = torch.empty(x.shape, dtype=torch.bfloat16, device="cuda")
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kernels.cast(x, out)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(bits(out), bits(x.to(torch.bfloat16)))
    out2 = torch.empty_like(out)
    kernels.cast(x, out2, stream=s)
    s.synchronize()
    assert torch.equal(bits(out2), bits(out))


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: (torch.zeros(4, 4, device="cuda").t(), torch.zeros(16, device="cuda")), ValueError, "not contiguous"),
        (lambda: (torch.zeros(4, device="cuda"), torch.zeros(5, device="cuda")), ValueError, "4 elements, dst 5"),
        (lambda: (torch.zeros(4, device="cuda", dtype=torch.int32), torch.zeros(4, device="cuda")), TypeError, "int32"),
        (lambda: (torch.zeros(4, device="cuda"), torch.zeros(4)), ValueError, "not on a CUDA device"),
    ],
)
def test_cast_bad_arguments(make, exc, words):
    a, b = make()
    with pytest.raises(exc, match=words):
        kernels.cast(a, b)


TOL = {
    torch.float32: {"rtol": 1.3e-6, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}


def _ref_rms(x, w, eps):
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w.float()
    return y.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [1024, 3072, 4096, 8192, 1000, 7])
def test_rms_norm_matches_torch(dtype, cols):
    g = torch.Generator(device="cuda").manual_seed(cols)
    x = torch.randn(33, cols, device="cuda", generator=g).to(dtype)
    w = torch.randn(cols, device="cuda", generator=g).to(dtype)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), _ref_rms(x, w, 1e-6), **TOL[dtype])
    torch.testing.assert_close(kernels.rms_norm(x, None, 1e-6), _ref_rms(x, None, 1e-6), **TOL[dtype])
    if hasattr(F, "rms_norm"):
        ref = F.rms_norm(x.float(), (cols,), w.float(), 1e-6).to(dtype)
        torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [1024, 2048, 5120, 8192, 1000, 7])
def test_layer_norm_matches_torch(dtype, cols):
    g = torch.Generator(device="cuda").manual_seed(cols)
    x = (torch.randn(17, cols, device="cuda", generator=g) * 3 + 1).to(dtype)
    w = torch.randn(cols, device="cuda", generator=g).to(dtype)
    b = torch.randn(cols, device="cuda", generator=g).to(dtype)
    for ww, bb in ((w, b), (None, None), (w, None)):
        want = F.layer_norm(x, (cols,), ww, bb, 1e-5)
        torch.testing.assert_close(kernels.layer_norm(x, ww, bb, 1e-5), want, **TOL[dtype])


def test_norm_weight_in_another_dtype_and_3d():
    x = torch.randn(2, 5, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda")
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), _ref_rms(x, w, 1e-6), **TOL[torch.bfloat16])


def test_norm_unaligned_rows():
    x = torch.randn(8 * 1024 + 1, device="cuda", dtype=torch.float16)[1:].view(8, 1024)
    torch.testing.assert_close(kernels.rms_norm(x, None, 1e-6), _ref_rms(x, None, 1e-6), **TOL[torch.float16])


def test_norm_bad_arguments():
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="weight has 63 elements"):
        kernels.rms_norm(x, torch.ones(63, device="cuda"))
    with pytest.raises(TypeError, match="float8"):
        kernels.rms_norm(x.to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="not contiguous"):
        kernels.layer_norm(x.t())
    with pytest.raises(ValueError, match="not on a CUDA device"):
        kernels.rms_norm(x, torch.ones(64))
