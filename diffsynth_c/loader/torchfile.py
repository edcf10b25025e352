"""PyTorch checkpoints (.bin, .pth, .ckpt, .pt) through the C core, without torch.load.

``torch.save`` writes a zip archive: ``data.pkl`` (the saved value, pickled) and one ``data/<key>``
entry per storage. The C core reads the zip directory and runs ``data.pkl`` through a restricted
pickle machine (csrc/unpickle.c) that only knows what a tensor checkpoint needs: no global is ever
imported or called, one outside its allow-list is refused with an error naming it. What comes
back describes every tensor as a view (dtype, offset, shape, stride) into a storage; a load maps
the storages' bytes (read in parallel, each once) and builds the tensors as views of them, so
tensors that shared a storage still share it. A hash or a keys dict needs only ``data.pkl``.

Files the reader does not represent (the legacy pre-1.6 format, big-endian archives, constructs
torch's weights-only unpickler accepts and this reader does not) go to
``torch.load(weights_only=True)`` with a warning, as DiffSynth would load them.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from .. import _core
from ..dlpack import to_torch, torch_dtype_of


def read_tree(path: Any) -> tuple[Any, list] | None:
    """(value with TensorRef leaves, storages), or None when the C reader does not take the file
    (a warning says why)."""
    try:
        return _core.torch_read(path)
    except _core.NotNativeError as e:
        warnings.warn(f"diffsynth_c: {e}; reading it with torch.load(weights_only=True)", RuntimeWarning, stacklevel=4)
        return None


def _map(obj: Any, leaf_type: type, fn) -> Any:
    """obj with every leaf_type leaf replaced by fn(leaf), containers rebuilt (dicts keep order)."""
    if isinstance(obj, leaf_type):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map(v, leaf_type, fn)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_map(v, leaf_type, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map(v, leaf_type, fn) for v in obj)
    return obj


def tensor_of(ref: Any, storage: Any, typed: dict | None = None) -> Any:
    """The tensor a TensorRef describes, as a view of its storage's bytes (a uint8 tensor): its
    dtype, offset, shape and stride, and nn.Parameter / requires_grad as saved. typed caches the
    storage's typed view so that tensors of one storage share it."""
    import torch

    key = (ref.storage, ref.dtype)
    view = typed.get(key) if typed is not None else None
    if view is None:
        dtype = torch_dtype_of(ref.dtype)
        view = storage[: storage.numel() - storage.numel() % dtype.itemsize].view(dtype)
        if typed is not None:
            typed[key] = view
    t = torch.as_strided(view, ref.shape, ref.stride, ref.offset)
    if ref.parameter:
        return torch.nn.Parameter(t, requires_grad=ref.requires_grad)
    if ref.requires_grad:
        t.requires_grad_(True)
    return t


def load_tree(path: Any, threads: int, mode: str) -> Any | None:
    """The saved value with torch tensors on the CPU (views of the storages' bytes), or None when
    the C reader does not take the file."""
    tree = read_tree(path)
    if tree is None:
        return None
    obj, storages = tree
    flat = [to_torch(t) for t in _core.map_ranges(path, [(off, n) for _, _, n, off in storages], threads, mode)]
    typed: dict[tuple[int, str], Any] = {}  # one typed view per (storage, dtype), shared by its tensors

    def make(ref: Any) -> Any:
        return tensor_of(ref, flat[ref.storage], typed)

    try:
        return _map(obj, _core.TensorRef, make)
    except ValueError as e:  # a dtype torch lacks
        raise _core.FormatError(f"{os.fsdecode(path)}: {e}") from None
