"""Model files: the functions of ``diffsynth.core.loader.file``, on the C core.

Same names, signatures and results as DiffSynth's: ``load_state_dict`` returns the same keys in
the same order (names sorted within a safetensors file, files merged with ``dict.update``) with
bit-identical tensors; ``hash_model_file`` returns the same MD5, read from the headers alone.

What differs is how the bytes move. For safetensors files the C core validates every header
first, maps each file privately (copy-on-write, as safetensors itself does) and reads its pages in
on a pool of threads with the GIL released, so the tensors returned are resident, not lazily
faulted. A ``torch_dtype`` among F32/F16/BF16/F8 is converted in C while the pages are read, into
one buffer per file, bit-identical to ``tensor.to(torch_dtype)``. ``.bin``/``.pth``/``.ckpt``
files (torch's zip format) are read by the C core's own reader (``core/torchfile.py``: zip
directory, an allow-listed unpickler, storages mapped under a read lease) with the results of
``torch.load(weights_only=True)``; what that reader does not take (legacy files, globals outside
its allow-list, big-endian data) goes to ``torch.load(weights_only=True)`` itself, with a warning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from .. import _core, progress
from ..core.conversion import c_sources_for
from ..core.formats import is_safetensors
from ..core.settings import mode, threads
from ..core.torchfile import load_tree, map_leaves, read_tree
from ..dlpack import safetensors_name_of, to_torch
from .direct_fill import load_pinned, load_to_cuda

PathLike = str | os.PathLike


def _as_list(file_path: PathLike | list[PathLike], what: str, variant: str | None = None) -> list[PathLike]:
    """The files to read; a folder stands for its weight files (index json or shards, as diffusers
    lays them out, of ``variant`` when given: diffsynth_c/loader/folder.py)."""
    from .folder import expand

    paths = list(file_path) if isinstance(file_path, (list, tuple)) else [file_path]
    if not paths:
        raise ValueError(f"{what}: the list of files is empty")
    return expand(paths, variant)


def _is_cpu(device: Any) -> bool:
    import torch

    return torch.device(device).type == "cpu"


def _gpu_path(device: Any) -> bool:
    """Whether a load to device goes through the CUDA library (a CUDA device, and both torch and
    our kernels can reach it)."""
    import torch

    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    from ..kernels import cuda_available

    return cuda_available()


def _load_safetensors_files(
    paths: list[PathLike], torch_dtype: Any, device: Any, path_display: list[str], pin_memory: bool = False
) -> list[dict[str, Any]]:
    """Loads safetensors files in one parallel C call; one dict per file, keys in name order.
    With pin_memory (on the CPU, CUDA present) the tensors come back pinned already."""
    on_cpu = _is_cpu(device)
    if not on_cpu and _gpu_path(device):
        placed = load_to_cuda(paths, path_display, torch_dtype, device)
        if placed is not None:
            return placed
    if on_cpu and pin_memory:  # the caller asks only when CUDA can pin (see load_state_dict)
        return load_pinned(paths, path_display, torch_dtype)
    target = safetensors_name_of(torch_dtype) if (torch_dtype is not None and on_cpu) else None
    sources = c_sources_for(target) if target else []
    per_file = _core.load(paths, target if sources else None, threads(), mode(), convert_from=sources)
    result = []
    for display, pairs in zip(path_display, per_file):
        sd: dict[str, Any] = {}
        for name, t in pairs:
            try:
                x = to_torch(t)
            except ValueError as e:
                raise _core.FormatError(f"{display}: tensor '{name}': {e}") from None
            if not on_cpu:
                x = x.to(device)
            if torch_dtype is not None and x.dtype != torch_dtype:
                x = x.to(torch_dtype)
            sd[name] = x
        result.append(sd)
    return result


def load_state_dict(
    file_path: PathLike | list[PathLike],
    torch_dtype: Any = None,
    device: Any = "cpu",
    pin_memory: bool = False,
    verbose: int = 0,
    *,
    process_group: Any = None,
    node_local: bool = False,
    bucket_mib: int = 256,
    variant: str | None = None,
) -> dict[str, Any]:
    """Loads one model file, or several merged into one state dict (as DiffSynth's
    ``load_state_dict``: a later file's tensor replaces an earlier one of the same name).
    A folder stands for its weight files; ``variant`` picks diffusers' variant files there
    (``variant="fp16"``: ``diffusion_pytorch_model.fp16.safetensors`` or the index
    ``diffusion_pytorch_model.safetensors.index.fp16.json`` and its shards).

    With a ``torch.distributed`` ``process_group``, every rank gets the full dict while each byte
    is read from disk once across the group (``node_local``: once per host; ``bucket_mib``: the
    size of the exchanged buckets); see ``diffsynth_c/loader/distributed.py``.

    ``torch_dtype`` converts every tensor (``tensor.to(torch_dtype)``); ``device`` places them.
    On a CUDA device, when ``diffsynth_c.cuda_available()``, the file's bytes go through pinned
    staging buffers straight into tensors from torch's allocator and are converted on the GPU
    (diffsynth_c/loader/direct_fill.py); otherwise they are read on the CPU, moved, then converted on the
    device, as DiffSynth's are. ``pin_memory`` pins CPU tensors (read straight into pinned memory
    when CUDA is there). Raises ``FileNotFoundError`` for a missing file,
    ``diffsynth_c.FormatError`` (a ``ValueError``) naming the file and tensor for a malformed one.
    """
    if process_group is not None:
        if variant is not None:
            file_path = _as_list(file_path, "load_state_dict", variant)
        return _load_in_group(
            file_path, torch_dtype, device, pin_memory, verbose, process_group, node_local, bucket_mib
        )
    if isinstance(file_path, (list, tuple)) and not file_path:
        return {}  # DiffSynth's merge of no files
    paths = _as_list(file_path, "load_state_dict", variant)
    displays = [os.fsdecode(p) for p in paths]
    single = not isinstance(file_path, (list, tuple)) and len(paths) == 1
    sizes = [0] * len(paths)
    bar = None
    if progress.wanted(0):  # a terminal, a notebook, or forced: worth a bar if the load is large
        sizes = [_size_of(p) for p in paths]
        label = f"Loading {os.path.basename(displays[0])}" if len(paths) == 1 else f"Loading {len(paths)} files"
        bar = progress.Progress(sum(sizes), label, min_total=progress.LOAD_MIN_BYTES)
    # One C call for every safetensors file reads them all in parallel. A bar or verbose output goes
    # file by file instead: the bar moves between C calls (nothing is called back per tensor), and
    # verbose prints DiffSynth's lines in DiffSynth's order (started, done, then the next file).
    stepwise = verbose >= 1 or (bar is not None and bar.on)
    batches = [[i] for i in range(len(paths))] if stepwise else [list(range(len(paths)))]
    state_dict: dict[str, Any] = {}
    try:
        for batch in batches:
            if verbose >= 1:
                print(f"Loading file [started]: {displays[batch[0]]}")
            safetensors_idx = [i for i in batch if is_safetensors(paths[i])]
            # safetensors files read straight into pinned memory when CUDA is there to pin it
            pinned = bool(safetensors_idx) and pin_memory and _is_cpu(device) and _gpu_path("cuda")
            loaded: dict[int, dict[str, Any]] = {}
            if safetensors_idx:
                dicts = _load_safetensors_files(
                    [paths[i] for i in safetensors_idx],
                    torch_dtype,
                    device,
                    [displays[i] for i in safetensors_idx],
                    pinned,
                )
                loaded.update(zip(safetensors_idx, dicts))
            for i in batch:
                from_c = i in loaded
                sd = loaded.pop(i) if from_c else load_state_dict_from_bin(paths[i], torch_dtype, device)
                if pin_memory and not (from_c and pinned):
                    for k in sd:
                        sd[k] = sd[k].pin_memory()
                if verbose >= 1:
                    print(f"Loading file [done]: {displays[i]}")
                if bar is not None:
                    bar.update(sizes[i])
                if single:
                    return sd  # one file: its own dict, as DiffSynth returns it (an OrderedDict for torch.save files)
                state_dict.update(sd)
    finally:
        if bar is not None:
            bar.close()
    return state_dict


def _size_of(path: PathLike) -> int:
    """Bytes of a file for the bar; 0 when it cannot be seen (the load then says why)."""
    try:
        return os.path.getsize(path)
    except (OSError, TypeError, ValueError):
        return 0


def _load_in_group(
    file_path: Any,
    torch_dtype: Any,
    device: Any,
    pin_memory: bool,
    verbose: int,
    group: Any,
    node_local: bool,
    bucket_mib: int,
) -> dict[str, Any]:
    """load_state_dict across a process group: safetensors files read once across the ranks, torch
    checkpoints by every rank; merged in file order as without a group. A rank that cannot find
    its files makes every rank raise (no rank is left waiting in a collective)."""
    import torch.distributed as dist

    from .distributed import agree, all_ranks, load_safetensors_distributed

    paths, error = [], None
    try:
        paths = _as_list(file_path, "load_state_dict")
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{os.fsdecode(p)}: no such file")
    except (OSError, ValueError) as e:
        error = str(e)
    agree(group, dist.get_rank(group), error, "finding the files")
    kinds = all_ranks(group, [is_safetensors(p) for p in paths])
    if any(k != kinds[0] for k in kinds):  # every rank must walk the same collectives
        raise RuntimeError(
            "distributed load: the ranks were given different file lists (count or formats): "
            + "; ".join(f"rank {r}: {len(k)} files" for r, k in enumerate(kinds))
        )
    displays = [os.fsdecode(p) for p in paths]
    single = not isinstance(file_path, (list, tuple)) and len(paths) == 1

    if verbose >= 1:
        for d in displays:
            print(f"Loading file [started]: {d}")
    if all(is_safetensors(p) for p in paths):
        state_dict = load_safetensors_distributed(paths, displays, torch_dtype, device, group, node_local, bucket_mib)
    else:
        state_dict = {}
        for p, d in zip(paths, displays):
            if is_safetensors(p):
                state_dict.update(
                    load_safetensors_distributed([p], [d], torch_dtype, device, group, node_local, bucket_mib)
                )
            else:
                sd = load_state_dict_from_bin(p, torch_dtype=torch_dtype, device=device)
                if single:
                    state_dict = sd
                else:
                    state_dict.update(sd)
    if pin_memory:
        state_dict = {k: v.pin_memory() for k, v in state_dict.items()}
    if verbose >= 1:
        for d in displays:
            print(f"Loading file [done]: {d}")
    return state_dict


def load_state_dict_from_safetensors(file_path: PathLike, torch_dtype: Any = None, device: Any = "cpu") -> dict:
    """One safetensors file (DiffSynth's helper of the same name)."""
    return _load_safetensors_files([file_path], torch_dtype, device, [os.fsdecode(file_path)])[0]


def _unwrap(state_dict: Any) -> Any:
    """DiffSynth's unwrapping of a checkpoint holding one key: state_dict, module or model_state."""
    if len(state_dict) == 1:
        for wrapper in ("state_dict", "module", "model_state"):
            if wrapper in state_dict:
                return state_dict[wrapper]
    return state_dict


def load_state_dict_from_bin(file_path: PathLike, torch_dtype: Any = None, device: Any = "cpu") -> dict:
    """A PyTorch checkpoint, read by the C core (diffsynth_c/core/torchfile.py) with the results of
    ``torch.load(weights_only=True)``, unwrapping a single ``state_dict`` / ``module`` /
    ``model_state`` key and converting the top-level tensors, as DiffSynth does. Files the C reader
    does not take go through torch.load itself."""
    import torch

    state_dict = load_tree(file_path, threads(), mode())
    if state_dict is None:
        state_dict = torch.load(file_path, map_location=device, weights_only=True)
    elif not _is_cpu(device):
        state_dict = map_leaves(state_dict, torch.Tensor, lambda t: t.to(device))
    state_dict = _unwrap(state_dict)
    if torch_dtype is not None:
        for k in state_dict:
            if isinstance(state_dict[k], torch.Tensor):
                state_dict[k] = state_dict[k].to(torch_dtype)
    return state_dict


def load_metadata_from_safetensors(file_path: PathLike | list[PathLike]) -> dict[str, str]:
    """The ``__metadata__`` of one file, or of several merged (JSON lists are concatenated without
    repeats, other values replaced), as DiffSynth's helper."""
    if isinstance(file_path, (list, tuple)):
        metadata: dict[str, str] = {}
        for p in file_path:
            for key, value in load_metadata_from_safetensors(p).items():
                metadata[key] = merge_metadata_value(metadata[key], value) if key in metadata else value
        return metadata
    return _core.read_header(file_path)[3] or {}


def merge_metadata_value(old_value: str, new_value: str) -> str:
    """Merges two metadata values: two JSON lists are concatenated (new items only), anything else
    takes the new value."""
    try:
        old_items, new_items = json.loads(old_value), json.loads(new_value)
    except (json.JSONDecodeError, TypeError):
        return new_value
    if isinstance(old_items, list) and isinstance(new_items, list):
        return json.dumps(old_items + [i for i in new_items if i not in old_items])
    return new_value


# ---- model hashes ------------------------------------------------------------------------


class _Budget:
    """A limit on the bytes of the nested key strings of one hash: a dict shared n times under
    itself makes DiffSynth's string exponentially long (each copy is spelled out), which no input
    of a few bytes may cost. nested: canonical string of each dict met (by id), built once."""

    def __init__(self, limit: int, display: str):
        self.left, self.limit, self.display = limit, limit, display
        self.nested: dict[int, bytes] = {}

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise _core.FormatError(
                f"{self.display}: the canonical key string of this checkpoint exceeds {self.limit} bytes (64 times "
                "the file): its nested dicts are shared and repeated; refused rather than hashed"
            )


def _entries(
    items: Iterable[tuple[Any, Any]], with_shape: bool, is_leaf, shape_of, budget: _Budget | None = None
) -> list:
    """The (name, shape | nested bytes) entries of _core.keys_string; non-str keys are skipped and
    values that are neither leaves nor dicts ignored, as DiffSynth does. With a budget, a dict met
    again is not walked again, and the bytes its string adds count against the budget."""
    entries = []
    for key, value in items:
        if not isinstance(key, str):
            continue
        if is_leaf(value):
            entries.append((key, shape_of(value)))
        elif isinstance(value, dict):
            nested = budget.nested.get(id(value)) if budget is not None else None
            if nested is None:
                nested = _core.keys_string(_entries(value.items(), with_shape, is_leaf, shape_of, budget), with_shape)
                if budget is not None:
                    budget.nested[id(value)] = nested
            if budget is not None:
                budget.spend(2 * (len(key) + len(nested)))
            entries.append((key, nested))
    return entries


def convert_state_dict_keys_to_single_str(state_dict: dict, with_shape: bool = True) -> str:
    """DiffSynth's canonical string of a state dict's keys (and shapes)."""
    import torch

    entries = _entries(state_dict.items(), with_shape, lambda v: isinstance(v, torch.Tensor), lambda v: tuple(v.shape))
    return _core.keys_string(entries, with_shape).decode("utf-8")


def hash_state_dict_keys(state_dict: dict, with_shape: bool = True) -> str:
    """MD5 of the canonical key string of a loaded state dict (DiffSynth's model hash)."""
    import torch

    entries = _entries(state_dict.items(), with_shape, lambda v: isinstance(v, torch.Tensor), lambda v: tuple(v.shape))
    return _core.md5_hex(_core.keys_string(entries, with_shape))


def convert_keys_dict_to_single_str(state_dict: dict, with_shape: bool = True) -> str:
    """DiffSynth's canonical string of a keys dict ({name: shape list or nested dict}; the parameter
    has DiffSynth's name)."""
    entries = _entries(state_dict.items(), with_shape, lambda v: not isinstance(v, dict), lambda v: tuple(v))
    return _core.keys_string(entries, with_shape).decode("utf-8")


def load_keys_dict(file_path: PathLike | list[PathLike]) -> dict:
    """{name: shape} of one file or several merged; safetensors from the header alone."""
    if not isinstance(file_path, (list, tuple)) and os.path.isdir(file_path):
        file_path = _as_list(file_path, "load_keys_dict")
    if isinstance(file_path, (list, tuple)):
        keys_dict: dict = {}
        for p in file_path:
            keys_dict.update(load_keys_dict(p))
        return keys_dict
    if is_safetensors(file_path):
        return load_keys_dict_from_safetensors(file_path)
    return load_keys_dict_from_bin(file_path)


def load_keys_dict_from_safetensors(file_path: PathLike) -> dict:
    """{name: shape list} in name order, from the header."""
    return {name: list(shape) for name, _, shape, _, _ in _core.read_header(file_path)[2]}


def convert_state_dict_to_keys_dict(state_dict: dict) -> dict:
    """{name: shape list}, nested dicts kept nested."""
    import torch

    keys_dict = {}
    for k, v in state_dict.items():
        keys_dict[k] = list(v.shape) if isinstance(v, torch.Tensor) else convert_state_dict_to_keys_dict(v)
    return keys_dict


def load_keys_dict_from_bin(file_path: PathLike) -> dict:
    """{name: shape list} of a PyTorch checkpoint from its data.pkl alone (no tensor byte is read),
    with DiffSynth's unwrapping and its error for values that are neither tensors nor dicts."""
    tree = read_tree(file_path)
    if tree is None:
        return convert_state_dict_to_keys_dict(load_state_dict_from_bin(file_path))
    try:
        return _refs_to_keys_dict(_unwrap(tree[0]), {})
    except _core.FormatError as e:
        raise _core.FormatError(f"{os.fsdecode(file_path)}: {e}") from None


def _refs_to_keys_dict(state_dict: Any, seen: dict[int, dict]) -> dict:
    """convert_state_dict_to_keys_dict over TensorRef leaves (same recursion, same errors). A dict
    the checkpoint shares gives one keys dict, shared the same way (seen: by id), so the work is
    linear in the pickle; a dict that holds itself is refused (DiffSynth would recurse forever)."""
    if id(state_dict) in seen:
        if seen[id(state_dict)] is None:
            raise _core.FormatError("the checkpoint holds a dict that contains itself, which has no key string")
        return seen[id(state_dict)]
    seen[id(state_dict)] = None
    keys_dict = {}
    for k, v in state_dict.items():
        keys_dict[k] = list(v.shape) if isinstance(v, _core.TensorRef) else _refs_to_keys_dict(v, seen)
    seen[id(state_dict)] = keys_dict
    return keys_dict


def hash_model_file(path: PathLike | list[PathLike], with_shape: bool = True) -> str:
    """DiffSynth's model hash of a file or a list of files (merged). For safetensors files only
    the headers are read. An empty list hashes the empty key string, as DiffSynth's does."""
    if isinstance(path, (list, tuple)) and not path:
        return _core.md5_hex(b"")
    paths = _as_list(path, "hash_model_file")
    if all(is_safetensors(p) for p in paths):
        return _core.hash_files(paths, with_shape)
    keys_dict = load_keys_dict(paths)
    budget = _Budget(64 * sum(os.path.getsize(p) for p in paths) + (1 << 20), ", ".join(map(os.fsdecode, paths)))
    entries = _entries(keys_dict.items(), with_shape, lambda v: not isinstance(v, dict), lambda v: tuple(v), budget)
    return _core.md5_hex(_core.keys_string(entries, with_shape))
