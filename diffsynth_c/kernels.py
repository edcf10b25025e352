"""The CUDA kernels of diffsynth_c (kernels/*.cu), for torch tensors on the GPU.

``cuda_available()`` says whether they can run here: the package was built with nvcc (the CUDA
library ``diffsynth_c/_cuda.so`` exists), it opens, and the driver sees a device. Without them
everything else in the package works as before.

Each kernel takes its tensors through DLPack and is launched on the caller's CUDA stream:
torch's current stream of the tensor's device, or the ``stream`` argument (a ``torch.cuda.Stream``
or a raw ``cudaStream_t`` as an int). Wrong devices, dtypes, shapes or non-contiguous tensors raise
before any launch; a CUDA error raises ``RuntimeError`` with CUDA's own message.

``cast`` is bit-identical to torch's ``.to()``: where torch's answer for special values depends on
its build (the bits of a NaN, whether F8_E4M3 saturates; see kernels/dtype.h), the first use of a
dtype pair on a device compares the kernel with torch on every 8- and 16-bit pattern and F32's
special values, picks the rule that matches, and leaves the pair to torch if none does.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from . import _core
from .dlpack import safetensors_name_of

KERNEL_DTYPES = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
NORM_DTYPES = ("F32", "F16", "BF16")
_LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cuda.so")
# the rules a kernel may follow, most likely first: (nan, saturate); nan 1 is CUDA's canonical NaN
_RULES = ((1, 0), (0, 0), (1, 1), (0, 1))


@cache
def _status() -> tuple[bool, str]:
    if not os.path.exists(_LIBRARY):
        return False, "diffsynth_c was built without nvcc (no CUDA library)"
    why = _core.cuda_open(_LIBRARY)
    if why is not None:
        return False, why
    n, why = _core.cuda_device_count()
    if n == 0:
        return False, f"no CUDA device: {why}" if why else "no CUDA device"
    return True, f"{n} CUDA device(s)"


def cuda_available() -> bool:
    """True when the CUDA kernels and the GPU load path can run in this process."""
    return _status()[0]


def cuda_status() -> str:
    """Why ``cuda_available()`` says what it says."""
    return _status()[1]


def _require() -> None:
    ok, why = _status()
    if not ok:
        raise RuntimeError(f"diffsynth_c CUDA kernels are not available: {why}")


def _kernel_dtype(t: Any, what: str, allowed: tuple[str, ...]) -> str:
    name = safetensors_name_of(t.dtype)
    if name not in allowed:
        raise TypeError(f"{what}: dtype {t.dtype} is not one of {', '.join(allowed)}")
    return name


def _check_cuda(t: Any, what: str) -> None:
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{what}: the tensor is on {t.device}, not on a CUDA device")
    if not t.is_contiguous():
        raise ValueError(f"{what}: the tensor is not contiguous (call .contiguous() first)")


def _stream_handle(device: Any, stream: Any) -> tuple[int, bool]:
    """(cudaStream_t as int, whether it is torch's current stream of device)."""
    import torch

    current = torch.cuda.current_stream(device)
    if stream is None:
        return current.cuda_stream, True
    handle = stream.cuda_stream if hasattr(stream, "cuda_stream") else int(stream)
    return handle, handle == current.cuda_stream


def _capsule(t: Any, handle: int, is_current: bool) -> Any:
    """A DLPack capsule of t, ready on the stream we launch on. torch has no DLPack code for float8,
    so those are exported as bytes (same shape, same element size)."""
    import torch

    t = t.detach()  # torch exports no tensor that requires grad (a norm's weight is a Parameter)
    if t.element_size() == 1 and t.dtype not in (torch.uint8, torch.int8):
        t = t.view(torch.uint8)
    if is_current:
        return t.__dlpack__(stream=-1)  # our launch is ordered after torch's work on this stream
    return t.__dlpack__(stream=handle if handle != 0 else 1)


def _same_device(tensors: list, what: str) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{what}: tensors on different devices: {', '.join(sorted(map(str, devices)))}")


def _launch_cast(src: Any, dst: Any, s: str, d: str, rules: tuple[int, int], stream: Any) -> None:
    import torch

    with torch.cuda.device(src.device):  # torch exports only tensors of the current device
        handle, current = _stream_handle(src.device, stream)
        _core.cuda_cast(_capsule(src, handle, current), _capsule(dst, handle, current), s, d, handle, *rules)


def _probe_values(name: str, device: Any) -> Any:
    from .core.conversion import probe

    return probe(name).to(device)


@cache
def cast_rules(src: str, dst: str, device_index: int) -> tuple[int, int] | None:
    """The rules under which our cast of src -> dst equals torch's .to() on this device, or None."""
    import torch

    from .dlpack import torch_dtype_of

    device = torch.device("cuda", device_index)
    x = _probe_values(src, device)
    want = x.to(torch_dtype_of(dst)).view(torch.uint8)
    for rules in _RULES:
        got = torch.empty(x.shape, dtype=torch_dtype_of(dst), device=device)
        _launch_cast(x, got, src, dst, rules, None)
        if torch.equal(got.view(torch.uint8), want):
            return rules
    return None


def cast(src: Any, dst: Any, stream: Any = None) -> Any:
    """dst.copy_(src) for F32/F16/BF16/F8_E4M3/F8_E5M2 tensors on one CUDA device, bit-identical to
    torch's ``.to()``, with vector loads and stores. Returns dst."""
    _check_cuda(src, "cast: src")
    _check_cuda(dst, "cast: dst")
    _same_device([src, dst], "cast")
    s = _kernel_dtype(src, "cast: src", KERNEL_DTYPES)
    d = _kernel_dtype(dst, "cast: dst", KERNEL_DTYPES)
    if src.numel() != dst.numel():
        raise ValueError(f"cast: src has {src.numel()} elements, dst {dst.numel()}")
    _require()
    rules = cast_rules(s, d, src.device.index if src.device.index is not None else 0) if s != d else (1, 0)
    if rules is None:  # torch's build resolves a special value differently from every rule we know
        import contextlib

        import torch

        on = contextlib.nullcontext()
        if stream is not None:  # torch's copy goes on the stream asked for, as our launch would
            on = torch.cuda.stream(stream if hasattr(stream, "cuda_stream") else torch.cuda.ExternalStream(int(stream)))
        with on:
            dst.copy_(src.view(dst.shape) if src.shape != dst.shape else src)
        return dst
    _launch_cast(src, dst, s, d, rules, stream)
    return dst


def _norm(layer: bool, x: Any, weight: Any, bias: Any, eps: float, out: Any, stream: Any) -> Any:
    import torch

    what = "layer_norm" if layer else "rms_norm"
    _check_cuda(x, f"{what}: x")
    t = _kernel_dtype(x, f"{what}: x", NORM_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{what}: x must have at least one dimension")
    cols = x.shape[-1]
    wt = t
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        _check_cuda(p, f"{what}: {name}")
        pt = _kernel_dtype(p, f"{what}: {name}", NORM_DTYPES)
        if p.numel() != cols:
            raise ValueError(f"{what}: {name} has {p.numel()} elements, x's last dimension is {cols}")
        wt = pt
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"{what}: weight is {weight.dtype} and bias {bias.dtype}; they must match")
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_cuda(out, f"{what}: out")
        if out.shape != x.shape or out.dtype != x.dtype:
            raise ValueError(f"{what}: out must have x's shape {tuple(x.shape)} and dtype {x.dtype}")
    _same_device([x, weight, bias, out], what)
    _require()
    with torch.cuda.device(x.device):  # torch exports only tensors of the current device
        handle, current = _stream_handle(x.device, stream)
        caps = [None if p is None else _capsule(p, handle, current) for p in (x, out, weight, bias)]
        _core.cuda_norm(layer, caps[0], caps[1], caps[2], caps[3], t, wt, float(eps), handle)
    return out


def rms_norm(x: Any, weight: Any = None, eps: float = 1e-6, *, out: Any = None, stream: Any = None) -> Any:
    """x / sqrt(mean(x**2, -1) + eps) * weight over the last dimension, accumulated in F32;
    x and the result in F32, F16 or BF16 (weight may have another of the three)."""
    return _norm(False, x, weight, None, eps, out, stream)


def layer_norm(
    x: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5, *, out: Any = None, stream: Any = None
) -> Any:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension (biased variance, F32
    accumulation), as torch.nn.functional.layer_norm."""
    return _norm(True, x, weight, bias, eps, out, stream)
