"""PyTorch checkpoints (.bin, .pth, .ckpt, .pt) through the C core, without torch.load.

``torch.save`` writes a zip archive: ``data.pkl`` (the saved value, pickled) and one ``data/<key>``
entry per storage. The C core reads the zip directory and runs ``data.pkl`` through a restricted
pickle machine (csrc/unpickle.c) that only knows what a tensor checkpoint needs: no global is ever
imported or called, one outside its allow-list is refused with an error naming it. What comes
back describes every tensor as a view (dtype, offset, shape, stride) into a storage; a load maps
the storages' bytes (their pages read in parallel, each once; read mode reads them into memory it
owns) and builds the tensors as views of them, so tensors that shared a storage still share it, and
the user's file can be rewritten (even by ``torch.save`` of what we returned) while the tensors
live: the mapping is held under a read lease that copies it out first (``load_tree``). A hash or a keys dict needs only
``data.pkl``.

What the pickle shares stays shared: an object met twice (its memo) is one object in what we
return, as with ``torch.load``, so a small file cannot cost more than linear work (a list holding
itself twice, twenty deep, is still a few objects). Tensors keep what ``torch.load`` restores:
conjugate and negative views (the metadata saved with them), ``nn.Parameter`` and its Python
attributes, ``requires_grad``, and a state dict's ``_metadata``.

Files the reader does not represent (the legacy pre-1.6 format, big-endian archives, constructs
torch's weights-only unpickler accepts and this reader does not, globals the user allowed with
``torch.serialization.add_safe_globals`` / ``safe_globals``) go to ``torch.load(weights_only=True)``
with a warning, as DiffSynth would load them.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from .. import _core
from ..dlpack import to_torch, torch_dtype_of


def _user_allowed_globals() -> list[str]:
    """'module.name' of every global the user allowed torch.load to resolve (torch's own naming:
    a (callable, name) pair gives its name). Empty when torch is not imported: then nobody can
    have allowed anything."""
    torch = sys.modules.get("torch")
    get = getattr(getattr(torch, "serialization", None), "get_safe_globals", None)
    if get is None:
        return []
    names = []
    for entry in get():
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str):
            names.append(entry[1])
        else:
            module, name = getattr(entry, "__module__", None), getattr(entry, "__qualname__", None)
            if isinstance(module, str) and isinstance(name, str):
                names.append(f"{module}.{name}")
    return names


def read_tree(path: Any) -> tuple[Any, list] | None:
    """(value with TensorRef leaves, storages), or None when the C reader does not take the file
    (a warning says why)."""
    try:
        return _core.torch_read(path, _user_allowed_globals())
    except _core.NotNativeError as e:
        warnings.warn(f"diffsynth_c: {e}; reading it with torch.load(weights_only=True)", RuntimeWarning, stacklevel=4)
        return None


def map_leaves(obj: Any, leaf_type: type, fn: Callable[[Any], Any]) -> Any:
    """obj with every leaf_type leaf replaced by fn(leaf). Lists, dicts and an OrderedDict's
    attributes (its _metadata) are updated in place and tuples rebuilt only when a leaf below them
    changed, so objects shared in obj stay shared (one fn call per distinct leaf) and the walk
    visits each object once: linear time, cycles included, no recursion."""
    done: dict[int, Any] = {}  # id of a visited object -> what replaces it (itself while in progress)
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        o, children_done = stack.pop()
        if not children_done:
            if id(o) in done:
                continue
            if isinstance(o, leaf_type):
                done[id(o)] = fn(o)
                continue
            if not isinstance(o, (list, tuple, dict)):
                continue
            done[id(o)] = o
            stack.append((o, True))
            children = list(o.keys()) + list(o.values()) if isinstance(o, dict) else list(o)
            if isinstance(o, dict) and type(o) is not dict:
                children.extend(vars(o).values())
            stack.extend((c, False) for c in children if id(c) not in done)
            continue

        def new(v: Any) -> Any:
            return done.get(id(v), v)

        if isinstance(o, list):
            for i, v in enumerate(o):
                if new(v) is not v:
                    o[i] = new(v)
        elif isinstance(o, tuple):
            if any(new(v) is not v for v in o):
                done[id(o)] = tuple(new(v) for v in o)
        else:
            if any(new(k) is not k for k in o):  # a key changed: rebuild, keeping the order
                items = [(new(k), new(v)) for k, v in o.items()]
                o.clear()
                o.update(items)
            else:
                for k, v in o.items():
                    if new(v) is not v:
                        o[k] = new(v)
            if type(o) is not dict:
                attrs = vars(o)
                for k, v in attrs.items():
                    if new(v) is not v:
                        attrs[k] = new(v)
    return done.get(id(obj), obj)


def _set_attributes(param: Any, state: dict) -> None:
    """The Python attributes saved with an nn.Parameter, set as torch.load sets them."""
    for k, v in state.items():
        setattr(param, k, v)


def tensor_of(ref: Any, storage: Any, typed: dict | None = None) -> Any:
    """The tensor a TensorRef describes, as a view of its storage's bytes (a uint8 tensor): its
    dtype, offset, shape and stride, its saved metadata (conjugate / negative view bits), and
    nn.Parameter (with its attributes) / requires_grad as saved. typed caches the storage's typed
    view so that tensors of one storage share it."""
    import torch

    key = (ref.storage, ref.dtype)
    view = typed.get(key) if typed is not None else None
    if view is None:
        dtype = torch_dtype_of(ref.dtype)
        view = storage[: storage.numel() - storage.numel() % dtype.itemsize].view(dtype)
        if typed is not None:
            typed[key] = view
    t = torch.as_strided(view, ref.shape, ref.stride, ref.offset)
    if ref.metadata:  # on this view only (as_strided made it), as torch sets it after the rebuild
        torch._utils.set_tensor_metadata(t, ref.metadata)
    if ref.parameter:
        t = torch.nn.Parameter(t, requires_grad=ref.requires_grad)
        if ref.state:
            _set_attributes(t, ref.state)
        return t
    if ref.requires_grad:
        t.requires_grad_(True)
    return t


def load_tree(path: Any, threads: int, mode: str) -> Any | None:
    """The saved value with torch tensors on the CPU (views of the storages' bytes), or None when
    the C reader does not take the file. In mmap mode the storages are a private mapping of the
    file under a read lease: before any writer may open or truncate the file (``torch.save`` of
    these very tensors over it included), the mapped ranges are copied into memory of our own
    (csrc/lease.c), and a file that cannot be leased is read instead; read mode always reads. Either
    way the file may change or be rewritten while the tensors live."""
    tree = read_tree(path)
    if tree is None:
        return None
    obj, storages = tree
    flat = [to_torch(t) for t in _core.map_ranges(path, [(off, n) for _, _, n, off in storages], threads, mode)]
    typed: dict[tuple[int, str], Any] = {}  # one typed view per (storage, dtype), shared by its tensors

    def make(ref: Any) -> Any:
        return tensor_of(ref, flat[ref.storage], typed)

    try:
        return map_leaves(obj, _core.TensorRef, make)
    except ValueError as e:  # a dtype torch lacks
        raise _core.FormatError(f"{os.fsdecode(path)}: {e}") from None
