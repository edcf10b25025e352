"""The C conversions (kernels/dtype.h, shared with the GPU) against torch's .to(), bit for bit:
every bit pattern of the 8- and 16-bit dtypes, and for F32 the special values plus three million
random words, through the F16C path and the portable helpers alike."""

from __future__ import annotations

import pytest
import torch

from diffsynth_c import _core
from diffsynth_c.core.conversion import _F32_SPECIALS, C_CONVERTIBLE, c_converts

TORCH = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def all_values(name: str) -> torch.Tensor:
    dtype = TORCH[name]
    bits = torch.finfo(dtype).bits
    if bits <= 16:
        return torch.arange(1 << bits, dtype=torch.int32).to(WORD[bits // 8]).view(dtype)
    g = torch.Generator().manual_seed(7)
    rnd = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), dtype=torch.int32, generator=g)
    specials = torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in _F32_SPECIALS], dtype=torch.int32)
    # random words, then ones concentrated on the small and the overflowing exponents
    return torch.cat([specials, specials ^ (1 << 31), rnd, (rnd & 0x7FFFFFFF) >> 4, rnd >> 8]).view(torch.float32)


PAIRS = [(s, d) for s in C_CONVERTIBLE for d in C_CONVERTIBLE if s != d]


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("src,dst", PAIRS)
def test_conversion_is_bit_identical_to_torch(src, dst, portable):
    x = all_values(src).contiguous()
    ref = x.to(TORCH[dst]).contiguous()
    got = _core.convert(src, dst, x.view(torch.uint8).numpy(), portable=portable)
    got_t = torch.frombuffer(bytearray(got), dtype=torch.uint8).view(WORD[ref.element_size()])
    ref_w = ref.view(WORD[ref.element_size()])
    bad = (got_t != ref_w).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{src}->{dst}: {bad.numel()} of {x.numel()} differ, e.g. source bits "
        f"{x.view(WORD[x.element_size()])[bad[:4]].tolist()}: ours {got_t[bad[:4]].tolist()}, torch {ref_w[bad[:4]].tolist()}"
    )


def test_the_runtime_check_trusts_every_pair_here():
    """On this machine's torch every pair agrees, so the loader converts in C."""
    assert all(c_converts(s, d) for s, d in PAIRS)


def test_convert_rejects_bad_input():
    with pytest.raises(ValueError, match="no conversion from I32 to F16"):
        _core.convert("I32", "F16", b"\0" * 4)
    with pytest.raises(ValueError, match="3 bytes is not a whole number of F32 elements"):
        _core.convert("F32", "F16", b"abc")
    with pytest.raises(ValueError, match="unknown safetensors dtype name 'float'"):
        _core.convert("float", "F16", b"")


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("src,dst", [(s, d) for s, d in PAIRS if s.startswith("F8")])
def test_long_8bit_runs_take_the_table_path_and_stay_identical(src, dst, threads):
    """From 4096 elements an 8-bit source is converted through a 256-entry table built by the
    element path; convert_into splits the run over threads. Every pattern, shuffled, 3 MiB long."""
    g = torch.Generator().manual_seed(11)
    x = all_values(src).repeat(12 * 1024)[torch.randperm(256 * 12 * 1024, generator=g)].contiguous()
    ref = x.to(TORCH[dst]).contiguous().view(torch.uint8)
    assert _core.convert(src, dst, x.view(torch.uint8).numpy()) == bytes(ref.numpy())
    out = torch.empty(x.shape, dtype=TORCH[dst])
    _core.convert_into(src, dst, x.view(torch.uint8).numpy(), out.view(torch.uint8).numpy(), threads)
    assert torch.equal(out.view(torch.uint8), ref)


def test_convert_into_rejects_bad_buffers():
    src = torch.zeros(8, dtype=torch.uint8).numpy()
    with pytest.raises(ValueError, match=r"convert_into: 8 BF16 elements need 16 bytes, dst has 8"):
        _core.convert_into("F8_E4M3", "BF16", src, torch.zeros(8, dtype=torch.uint8).numpy())
    with pytest.raises(ValueError, match="src and dst overlap"):
        buf = torch.zeros(24, dtype=torch.uint8).numpy()
        _core.convert_into("F8_E4M3", "BF16", buf[:8], buf[4:20])
    with pytest.raises(BufferError, match="not writable"):
        _core.convert_into("F8_E4M3", "BF16", src, b"\0" * 16)
