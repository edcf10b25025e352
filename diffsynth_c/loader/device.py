"""Loads that land somewhere other than pageable CPU memory: CUDA devices and pinned host memory.

``device="cuda"``: the tensors are allocated by torch (its caching allocator) and the C core fills
them through the CUDA library: reads go into pinned staging buffers on a pool of threads, each
filled buffer is copied to the device while the next ones are read, and a ``torch_dtype``
conversion runs on the GPU after the copy, so the bus carries the file's bytes. Conversions the
kernels cannot match bit for bit with torch on this device (see ``kernels.cast_rules``) are left to
torch after the copy, as DiffSynth does them.

``pin_memory=True`` on the CPU: one pinned buffer per file, allocated by torch, that the C core
reads (and converts) into directly; the tensors are views into it, so there is no second copy.
"""

from __future__ import annotations

import os
from typing import Any

from .. import _core
from ..core.conversion import c_converts
from ..core.settings import threads
from ..dlpack import TORCH_DTYPES, safetensors_name_of, torch_dtype_of, view_bytes

_ALIGN = 256  # bytes between tensors inside one buffer, as torch's allocator would give
_MIB = 1 << 20
_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}  # the dtypes C converts between


def _simple(dtype: str) -> bool:
    """Whether a tensor of this file dtype has torch's layout (one element per dtype-sized cell)."""
    return dtype in TORCH_DTYPES and dtype != "F4"


def _headers(paths: list, displays: list[str]) -> list[tuple[int, list]]:
    out = []
    for p, d in zip(paths, displays):
        _hlen, data_start, tensors, _meta = _core.read_header(p)
        for name, dtype, _shape, _b, _e in tensors:
            if dtype in TORCH_DTYPES:
                try:
                    torch_dtype_of(dtype)
                except ValueError as e:
                    raise _core.FormatError(f"{d}: tensor '{name}': {e}") from None
        out.append((data_start, tensors))
    return out


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


def _plan_cuda(headers: list, torch_dtype: Any, dev: Any) -> tuple[list, list, list, list, int]:
    """Allocates every result tensor on dev and lists what to upload: (items, meta, after, result,
    bytes converted on the GPU). after: tensors torch converts after the upload."""
    from ..kernels import cast_rules

    target = safetensors_name_of(torch_dtype) if torch_dtype is not None else None
    items, meta, after = [], [], []
    result: list[dict[str, Any]] = []
    convert_bytes = 0
    for fi, (data_start, tensors) in enumerate(headers):
        sd: dict[str, Any] = {}
        for name, dtype, shape, begin, end in tensors:
            on_gpu = target is not None and target != dtype and dtype in _SIZES and target in _SIZES
            rules = cast_rules(dtype, target, dev.index) if on_gpu else None
            if rules is not None:
                x = _empty(shape, target, dev)
                convert_bytes += end - begin
                spec = (dtype, target)
            else:
                x = _empty(shape, dtype, dev)
                spec = (None, None)
                if torch_dtype is not None and x.dtype != torch_dtype:
                    after.append((fi, name))
            if end > begin:
                items.append([fi, data_start + begin, end - begin, spec[0], spec[1], x.data_ptr(), rules])
                meta.append((fi, name))
            sd[name] = x
        result.append(sd)
    # one upload runs under one rule; conversions that need another are left to torch
    rule_set = sorted({it[6] for it in items if it[6] is not None})
    if len(rule_set) > 1:
        for k, it in enumerate(items):
            if it[6] is not None and it[6] != rule_set[0]:
                fi, name = meta[k]
                x = _empty(result[fi][name].shape, it[3], dev)
                result[fi][name] = x
                convert_bytes -= it[2]
                items[k] = [it[0], it[1], it[2], None, None, x.data_ptr(), None]
                after.append((fi, name))
    return items, meta, after, result, convert_bytes


def load_to_cuda(paths: list, displays: list[str], torch_dtype: Any, device: Any) -> list[dict[str, Any]] | None:
    """One dict per file, tensors on the CUDA device; None when a file holds a dtype this path does
    not place (the caller loads it on the CPU and moves it, as before). Out of GPU memory raises
    torch.OutOfMemoryError after every tensor of this load has been freed."""
    import torch

    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    headers = _headers(paths, displays)
    if any(not _simple(t[1]) for _, tensors in headers for t in tensors):
        return None
    oom = None
    try:
        items, meta, after, result, convert_bytes = _plan_cuda(headers, torch_dtype, dev)
        staging = _staging_bytes(sum(it[2] for it in items))
        scratch = _empty((staging,), "U8", dev) if convert_bytes else None
    except torch.OutOfMemoryError as e:
        oom = str(e)
    if oom is not None:  # raised here, outside the handler, so no traceback keeps the tensors alive
        raise torch.OutOfMemoryError(f"loading {', '.join(displays)} to {dev}: {oom}")
    if items:
        rules = next((it[6] for it in items if it[6] is not None), (1, 0))
        stream = _stream_of(dev)
        try:
            _core.cuda_upload(
                paths,
                [tuple(it[:6]) for it in items],
                dev.index,
                scratch.data_ptr() if scratch is not None else 0,
                staging,
                threads(per_cpu=1),
                stream,
                *rules,
            )
        except RuntimeError as e:
            _raise_upload(e, meta, displays)
    del scratch
    for fi, name in after:
        result[fi][name] = result[fi][name].to(torch_dtype)
    return result


def _pinned_buffer(nbytes: int) -> Any:
    """nbytes of pinned host memory from torch's pinned allocator."""
    import torch

    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _pin(x: Any) -> Any:
    return x.pin_memory()


def load_pinned(paths: list, displays: list[str], torch_dtype: Any) -> list[dict[str, Any]]:
    """One dict per file, tensors in pinned CPU memory that the C core read (and converted) into."""

    headers = _headers(paths, displays)
    target = safetensors_name_of(torch_dtype) if torch_dtype is not None else None
    result: list[dict[str, Any]] = []
    for fi, (data_start, tensors) in enumerate(headers):
        plans, size = [], 0
        for name, dtype, shape, begin, end in tensors:
            simple = _simple(dtype)
            out_dtype = target if (simple and target and target != dtype and c_converts(dtype, target)) else dtype
            numel = 1
            for s in shape:
                numel *= s
            nbytes = end - begin if out_dtype == dtype else numel * _SIZES[out_dtype]
            plans.append((name, dtype, out_dtype, shape, begin, end, size, nbytes))
            size += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        buf = _pinned_buffer(max(size, 1))
        base = buf.data_ptr()
        items = [
            (0, data_start + begin, end - begin, dtype, out_dtype, base + off, name)
            for name, dtype, out_dtype, shape, begin, end, off, nbytes in plans
            if end > begin
        ]
        _core.read_into([paths[fi]], items, threads(per_cpu=1))
        sd: dict[str, Any] = {}
        for name, dtype, out_dtype, shape, begin, end, off, nbytes in plans:
            x = view_bytes(buf[off : off + nbytes], out_dtype, shape, displays[fi], name)
            if torch_dtype is not None and x.dtype != torch_dtype:
                x = _pin(x.to(torch_dtype))
            sd[name] = x
        result.append(sd)
    return result
