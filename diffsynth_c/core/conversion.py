"""Which dtype conversions the C core may do, decided against the installed torch.

The C core reproduces torch's `.to(dtype)` for F32/F16/BF16/F8_E4M3/F8_E5M2 bit for bit, including
the places where torch's answer depends on its build and processor (the bits of a NaN, whether
E4M3 saturates; see kernels/dtype.h). Before a pair is trusted, both convert the same probe values:
every bit pattern of 8- and 16-bit sources, and for F32 the special values (NaN payloads, infinities,
subnormals, rounding and overflow boundaries) plus random words. A pair that disagrees is left to
torch, after the C core has read the bytes, so results stay identical on any torch.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import Any

from .. import _core
from ..dlpack import torch_dtype_of

C_CONVERTIBLE = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")

_F32_SPECIALS = [
    0x00000000,
    0x80000000,
    0x00000001,
    0x80000001,
    0x007FFFFF,
    0x00800000,
    0x7F7FFFFF,
    0xFF7FFFFF,
    0x7F800000,
    0xFF800000,
    0x7FC00000,
    0xFFC00000,
    0x7F800001,
    0xFF800001,
    0x7FA00000,
    0x7FFFFFFF,
    0x7F812345,
    0xFFFFFFFF,
    0x477FF000,
    0x477FEFFF,
    0x477FE000,
    0x47800000,
    0x477FFFFF,
    0x47600000,
    0x47700000,
    0x38800000,
    0x387FFFFF,
    0x33000000,
    0x33000001,
    0x32FFFFFF,
    0x43F00000,
    0x43EFFFFF,
    0x43E00000,
    0x43E80000,
    0x3B800000,
    0x3A800000,
    0x37800000,
    0x3AFFFFFF,
    0x3B000000,
    0x3F808000,
    0x3F818000,
    0x3F828000,
    0x3F7FFFFF,
    0x3F800001,
    0x3C000000,
    0x3BFFFFFF,
    0x377FFFFF,
    0x37000000,
]


def probe(src: str) -> Any:
    """A float tensor of dtype src holding the values a conversion from src is checked on: every
    bit pattern for dtypes of 16 bits or fewer; float32 specials, their negatives and seeded
    random words for float32."""
    import torch

    dtype = torch_dtype_of(src)
    bits = torch.finfo(dtype).bits
    if bits <= 16:
        word = torch.int16 if bits == 16 else torch.uint8
        return torch.arange(1 << bits, dtype=torch.int32).to(word).view(dtype)
    g = torch.Generator().manual_seed(20261124)
    rnd = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), dtype=torch.int32, generator=g)
    specials = torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in _F32_SPECIALS], dtype=torch.int32)
    words = torch.cat([specials, specials ^ (1 << 31), rnd, rnd >> 7, (rnd & 0x7FFFFFFF) >> 3])
    return words.view(torch.float32)


@cache
def c_converts(src: str, dst: str) -> bool:
    """True when the C core's src -> dst conversion equals torch's on every probe value."""
    import torch

    if src == dst or src not in C_CONVERTIBLE or dst not in C_CONVERTIBLE:
        return False
    x = probe(src).contiguous()
    ref = x.to(torch_dtype_of(dst)).contiguous().view(torch.uint8)
    got = _core.convert(src, dst, x.view(torch.uint8).numpy())
    agrees = bytes(ref.numpy()) == got
    if not agrees:
        warnings.warn(
            f"diffsynth_c: this torch ({torch.__version__}) converts {src} -> {dst} differently from the C core "
            f"on special values; torch will do that conversion",
            RuntimeWarning,
            stacklevel=3,
        )
    return agrees


def c_sources_for(dst: str) -> list[str]:
    """The source dtypes the C core may convert to dst."""
    return [src for src in C_CONVERTIBLE if c_converts(src, dst)]
