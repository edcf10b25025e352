"""Handing tensors from the C core to torch and numpy through DLPack, without a copy.

The C core exports every tensor with a dtype its consumers accept: torch refuses DLPack's float8
codes, so F8_* (and F4, packed in pairs) leave as uint8 and are viewed here as torch's float8 /
float4 dtypes; numpy has no bfloat16 or float8, so numpy callers get ml_dtypes' types when
ml_dtypes is installed and the raw unsigned integers otherwise.
"""

from __future__ import annotations

from typing import Any

from . import _core

# safetensors dtype name -> torch dtype attribute name
TORCH_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F4": "float4_e2m1fn_x2",
}

# dtypes exported as uint8 that torch must view as their real dtype
_VIEWED = {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4"}

_NUMPY_VIA_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def torch_dtype_of(name: str) -> Any:
    """The torch dtype for a safetensors dtype name; ValueError when torch has none."""
    import torch

    attr = TORCH_DTYPES.get(name)
    dtype = getattr(torch, attr, None) if attr else None
    if dtype is None:
        raise ValueError(f"safetensors dtype {name} has no torch dtype (torch {torch.__version__})")
    return dtype


def safetensors_name_of(torch_dtype: Any) -> str | None:
    """The safetensors dtype name of a torch dtype, or None when the format has none."""
    name = str(torch_dtype).removeprefix("torch.")
    for st_name, attr in TORCH_DTYPES.items():
        if attr == name:
            return st_name
    return None


def to_torch(t: _core.Tensor) -> Any:
    """A torch tensor sharing t's memory (no copy)."""
    import torch

    if t.dtype in _VIEWED:
        return torch.from_dlpack(t).view(torch_dtype_of(t.dtype))
    if t.dtype not in TORCH_DTYPES:
        torch_dtype_of(t.dtype)  # raises: F6 has no torch dtype
    return torch.from_dlpack(t)


def view_bytes(raw: Any, dtype: str, shape: tuple, display: str, name: str) -> Any:
    """A uint8 torch tensor's bytes as a tensor of a safetensors dtype and shape (no copy), with the
    same layout rules as to_torch: F4 packs pairs (float4_e2m1fn_x2, last dimension halved).
    FormatError naming the file and tensor when torch has no such dtype or layout."""
    from . import _core

    try:
        if dtype == "F4":
            if not shape or shape[-1] % 2:
                raise ValueError("F4 needs an even last dimension to become torch's float4_e2m1fn_x2")
            return raw.view(torch_dtype_of("F4")).view(*shape[:-1], shape[-1] // 2)
        return raw.view(torch_dtype_of(dtype)).view(shape)
    except ValueError as e:
        raise _core.FormatError(f"{display}: tensor '{name}': {e}") from None


def to_numpy(t: _core.Tensor) -> Any:
    """A numpy array sharing t's memory (no copy); bfloat16/float8 as ml_dtypes types when installed,
    else as unsigned integers of the same width."""
    import numpy as np

    if t.dtype in ("BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "F32", "F64", "C64"):
        return np.from_dlpack(t)
    bits = np.from_dlpack(t.bits())
    ml_name = _NUMPY_VIA_ML_DTYPES.get(t.dtype)
    if ml_name is not None:
        try:
            import ml_dtypes
        except ImportError:
            return bits
        return bits.view(getattr(ml_dtypes, ml_name))
    return bits
