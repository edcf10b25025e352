"""Loads that land somewhere other than pageable CPU memory: CUDA devices and pinned host memory.

``device="cuda"``: the tensors are allocated by torch (its caching allocator) and the C core fills
them through the CUDA library: reads go into pinned staging buffers on a pool of threads, each
filled buffer is copied to the device while the next ones are read, and a ``torch_dtype``
conversion runs on the GPU after the copy, so the bus carries the file's bytes. Conversions the
kernels cannot match bit for bit with torch on this device (see ``kernels.cast_rules``) are left to
torch after the copy, as DiffSynth does them.

``pin_memory=True`` on the CPU: one pinned buffer per file, allocated by torch, that the C core
reads (and converts) into directly; the tensors are views into it, so there is no second copy.

Neither plans its own layout: the C planner does (``_core.plan_buffers``, csrc/plan.c), and the
buffers go back to C as DLPack capsules whose sizes C checks every write against.
"""

from __future__ import annotations

import os
from typing import Any

from .. import _core
from ..core.conversion import c_converts
from ..core.settings import threads
from ..dlpack import TORCH_DTYPES, safetensors_name_of, torch_dtype_of, view_bytes

_MIB = 1 << 20
_SIZES = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # the dtypes C (and the CUDA kernels) convert between


def _simple(dtype: str) -> bool:
    """Whether a tensor of this file dtype has torch's layout (one element per dtype-sized cell)."""
    return dtype in TORCH_DTYPES and dtype != "F4"


def _check_dtypes(plan: Any, displays: list[str]) -> None:
    """FormatError naming the file and tensor when torch lacks a dtype the file uses."""
    for t in plan.tensors:
        if t.dtype in TORCH_DTYPES:
            try:
                torch_dtype_of(t.dtype)
            except ValueError as e:
                raise _core.FormatError(f"{displays[t.file]}: tensor '{t.key}': {e}") from None


def _capsule(x: Any) -> Any:
    """A DLPack capsule of x's bytes (a flat uint8 view: DLPack exports uint8 on every torch, float8
    not): what read_into and cuda_upload take, C reading the address and size from it. Made with
    torch.utils.dlpack.to_dlpack, not x.__dlpack__(), which on CUDA refuses a tensor off the current
    device and orders the default stream after the current one, one event per tensor."""
    import torch
    from torch.utils.dlpack import to_dlpack

    return to_dlpack(x.reshape(-1).view(torch.uint8))


def _empty(shape: tuple, dtype: str, device: Any) -> Any:
    import torch

    return torch.empty(shape, dtype=torch_dtype_of(dtype), device=device)


def _staging_bytes(total: int) -> int:
    env = os.environ.get("DIFFSYNTH_C_STAGING_MIB")
    if env:
        return max(2, int(env)) * _MIB
    # half the bytes (at least two slots of a MiB), at most 256 MiB: 4 slots of 64 MiB
    return max(2 * _MIB, min(256 * _MIB, (total // 2 + _MIB - 1) // _MIB * _MIB))


def _stream_of(dev: Any) -> int:
    """torch's current stream on dev, as a cudaStream_t int: the results were allocated in its order."""
    import torch

    return torch.cuda.current_stream(dev).cuda_stream


def _raise_upload(e: RuntimeError, items_meta: list, displays: list[str]) -> None:
    msg = e.args[0] if e.args else str(e)
    idx = e.args[1] if len(e.args) > 1 else -1
    if isinstance(idx, int) and idx >= 0:
        fi, key = items_meta[idx]
        raise OSError(f"{displays[fi]}: tensor '{key}': {msg}") from None
    raise RuntimeError(f"loading {', '.join(displays)} to the GPU: {msg}") from None


def _plan_cuda(paths: list, target: str | None, dev: Any) -> tuple[Any, tuple]:
    """The plan of a CUDA load (one buffer per tensor, each its own torch allocation, so that a
    tensor frees or converts alone as DiffSynth's do) and the (nan, saturate) rules its conversions
    run under. One upload runs under one rule set: when the file's dtypes need several, the
    conversions of the first (in sorted order) run on the GPU and the others are left to torch."""
    from ..kernels import cast_rules

    gpu = [d for d in _SIZES if d != target] if target in _SIZES else []
    plan = _core.plan_buffers(paths, _core.ALIGN_TORCH, "tensor", target=target, convert_from=gpu)
    present = sorted({t.dtype for t in plan.tensors if t.out_dtype != t.dtype})
    rules = {d: cast_rules(d, target, dev.index) for d in present}  # probed only for the files' dtypes
    used = sorted({rules[t.dtype] for t in plan.tensors if t.out_dtype != t.dtype and t.nbytes} - {None})
    keep = [d for d in present if rules[d] is not None and (not used or rules[d] == used[0])]
    if keep != present:  # planned again, the others left in the file's dtype for torch
        plan = _core.plan_buffers(paths, _core.ALIGN_TORCH, "tensor", target=target, convert_from=keep)
    return plan, used[0] if used else (1, 0)


def load_to_cuda(paths: list, displays: list[str], torch_dtype: Any, device: Any) -> list[dict[str, Any]] | None:
    """One dict per file, tensors on the CUDA device; None when a file holds a dtype this path does
    not place (the caller loads it on the CPU and moves it, as before). Out of GPU memory raises
    torch.OutOfMemoryError after every tensor of this load has been freed."""
    import torch

    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    target = safetensors_name_of(torch_dtype) if torch_dtype is not None else None
    plan, rules = _plan_cuda(paths, target, dev)
    _check_dtypes(plan, displays)
    if any(not _simple(t.dtype) for t in plan.tensors):
        return None
    items = [t for t in plan.tensors if t.nbytes]
    convert_bytes = sum(t.nbytes for t in items if t.out_dtype != t.dtype)
    oom = None
    try:
        tensors = [_empty(t.shape, t.out_dtype, dev) for t in plan.tensors]  # buffer i is tensor i
        staging = _staging_bytes(sum(t.nbytes for t in items))
        scratch = _empty((staging,), "U8", dev) if convert_bytes else None
    except torch.OutOfMemoryError as e:
        oom = str(e)
    if oom is not None:  # raised here, outside the handler, so no traceback keeps the tensors alive
        raise torch.OutOfMemoryError(f"loading {', '.join(displays)} to {dev}: {oom}")
    if items:
        try:
            _core.cuda_upload(
                paths,
                [_capsule(x) for x in tensors],
                items,
                dev.index,
                _capsule(scratch) if scratch is not None else None,
                staging,
                threads(per_cpu=1),
                _stream_of(dev),
                *rules,
            )
        except RuntimeError as e:
            _raise_upload(e, [(t.file, t.key) for t in items], displays)
    del scratch
    result: list[dict[str, Any]] = [{} for _ in paths]
    for t, x in zip(plan.tensors, tensors):
        if torch_dtype is not None and x.dtype != torch_dtype:
            x = x.to(torch_dtype)  # conversions the kernels do not match bit for bit: torch's, as DiffSynth
        result[t.file][t.key] = x
    return result


def _pinned_buffer(nbytes: int) -> Any:
    """nbytes of pinned host memory from torch's pinned allocator."""
    import torch

    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _pin(x: Any) -> Any:
    return x.pin_memory()


def load_pinned(paths: list, displays: list[str], torch_dtype: Any) -> list[dict[str, Any]]:
    """One dict per file, tensors in pinned CPU memory that the C core read (and converted) into."""

    target = safetensors_name_of(torch_dtype) if torch_dtype is not None else None
    convert_from = [d for d in _SIZES if target in _SIZES and d != target and c_converts(d, target)]
    # ALIGN_TORCH (256, csrc/plan.h): torch's allocators start blocks 512-byte aligned, so each view
    # into the buffer is as aligned as a tensor torch allocated alone
    plan = _core.plan_buffers(paths, _core.ALIGN_TORCH, "file", target=target, convert_from=convert_from)
    _check_dtypes(plan, displays)
    buffers = [_pinned_buffer(max(b.nbytes, 1)) for b in plan.buffers]
    _core.read_into(paths, [_capsule(b) for b in buffers], [t for t in plan.tensors if t.nbytes], threads(per_cpu=1))
    result: list[dict[str, Any]] = [{} for _ in paths]
    for t in plan.tensors:
        raw = buffers[t.buffer][t.buffer_offset : t.buffer_offset + t.out_nbytes]
        x = view_bytes(raw, t.out_dtype, t.shape, displays[t.file], t.key)
        if torch_dtype is not None and x.dtype != torch_dtype:
            x = _pin(x.to(torch_dtype))
        result[t.file][t.key] = x
    return result
