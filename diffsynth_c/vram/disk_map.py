"""``DiskMap``: a dict-like view of model files that reads one tensor when it is asked for.

The keys come from the headers (safetensors) or ``data.pkl`` (torch.save files) read by the C
core; ``dm[name]`` reads exactly that tensor's bytes into a fresh tensor (converting in C where it
can), with the GIL released, so several threads may read at once. ``prefetch(keys)`` starts
reading ahead on background threads so that a later ``dm[name]`` finds the tensor ready. Same
constructor, keys, order, renaming (``state_dict_converter``) and results as DiffSynth's DiskMap.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .. import _core
from ..core.settings import mode, threads
from ..core.torchfile import load_tree, map_leaves, read_tree, tensor_of
from ..dlpack import to_torch
from ..loader.folder import expand
from ..loader.safetensors_file import PRIVATE_MAP_MIN, SafetensorsFile
from .direct_read import DirectReader, use_direct

_PREFETCH_THREADS = 4


class _SafetensorsFile(SafetensorsFile):
    """One safetensors file of a DiskMap, opened when its header is read (a file replaced on disk
    afterwards keeps serving the version the header describes)."""

    def flush(self) -> None:
        """Nothing to drop: reads share no mapping (kept for DiffSynth's flush_files)."""

    def keys(self) -> Iterable[str]:
        return self.entries.keys()

    def read(self, name: str, torch_dtype: Any) -> Any:
        """A tensor no other read shares (as DiffSynth's DiskMap clones every read): in torch_dtype
        where C converts that pair, else in the file's dtype, in a private mapping of its own
        (mmap mode, large tensors: no copy) or read into fresh memory."""
        try:
            return self.read_independent(name, torch_dtype, mode())
        except ValueError as e:
            if isinstance(e, _core.FormatError):
                raise
            raise _core.FormatError(f"{self.path}: tensor '{name}': {e}") from None


class _TorchFile:
    def __init__(self, path: str):
        self.path = path
        # the file is opened before data.pkl is read and kept open: if it is replaced between the
        # two, read again, so the tree and the storages come from one version
        for _attempt in range(3):
            self.file = _core.OpenFile(path)
            tree = read_tree(path)
            if _same_file(self.file, path):
                break
            self.file.close()
        else:
            raise _core.FormatError(f"{path}: the file kept changing while its data.pkl was read")
        if tree is None:  # not a checkpoint the C reader takes: as DiffSynth, load it whole
            import torch

            self.file.close()
            self.loaded = torch.load(path, weights_only=True, map_location="cpu")
            self.obj, self.storages = None, None
        else:
            self.loaded = None
            self.obj, self.storages = tree

    def keys(self) -> Iterable[Any]:
        return (self.loaded if self.loaded is not None else self.obj).keys()

    def _tensor(self, ref: Any, name: Any) -> Any:
        """The tensor a TensorRef describes, in memory of its own (a clone, as DiffSynth's)."""
        _key, _dt, nbytes, offset = self.storages[ref.storage]
        raw = to_torch(self.file.map_range(offset, nbytes, 1, False))
        where = f"{self.path}: tensor '{name}': shape {list(ref.shape)}, stride {list(ref.stride)}"
        try:
            view = tensor_of(ref, raw)
        except (ValueError, RuntimeError) as e:  # a view outside its storage, a dtype torch lacks
            raise _core.FormatError(
                f"{where} at offset {ref.offset} does not fit its storage of {nbytes} bytes: {e}"
            ) from None
        try:
            return view.clone()
        except RuntimeError as e:  # a zero-stride view too large to copy out (DiffSynth's clone fails alike)
            raise type(e)(
                f"{where}: its {view.numel()} elements do not fit in memory as a tensor of their own: {e}"
            ) from None

    def read(self, name: Any, torch_dtype: Any) -> Any:
        """The value under name: a tensor, or (a nested dict such as IP-adapters' ``image_proj``)
        the container with every tensor in it, as torch.load gives it."""
        import torch

        if self.loaded is not None:
            value = self.loaded[name]
            return value.clone() if isinstance(value, torch.Tensor) else value
        ref = self.obj[name]
        if isinstance(ref, _core.TensorRef):
            return self._tensor(ref, name)
        return map_leaves(ref, _core.TensorRef, lambda r: self._tensor(r, name))


class SafetensorsCompatibleTensor:
    """DiffSynth's wrapper giving a loaded tensor the one method of safetensors' slice that its
    loaders call (``get_shape``)."""

    def __init__(self, tensor: Any):
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        """The tensor's shape as a list, as safetensors' slice gives it."""
        return list(self.tensor.shape)


class SafetensorsCompatibleBinaryLoader:
    """DiffSynth's safe_open-like view of a whole ``torch.save`` checkpoint: the file is read once
    by our C reader (what ``torch.load(weights_only=True, map_location=device)`` gives; files the
    reader does not take go to ``torch.load`` itself), with DiffSynth's message printed first."""

    def __init__(self, path: Any, device: Any):
        print(
            "Detected non-safetensors files, which may cause slower loading. "
            "It's recommended to convert it to a safetensors file."
        )
        import torch

        value = load_tree(path, threads(), mode())
        if value is None:
            value = torch.load(path, weights_only=True, map_location=device)
        elif torch.device(device) != torch.device("cpu"):
            value = map_leaves(value, torch.Tensor, lambda t: t.to(device))
        self.state_dict = value

    def keys(self) -> Iterable[Any]:
        """The checkpoint's top-level keys, in the file's order."""
        return self.state_dict.keys()

    def get_tensor(self, name: Any) -> Any:
        """The value saved under name (KeyError when there is none)."""
        return self.state_dict[name]

    def get_slice(self, name: Any) -> SafetensorsCompatibleTensor:
        """The value under name, wrapped for ``get_shape()``."""
        return SafetensorsCompatibleTensor(self.state_dict[name])


def _same_file(f: Any, path: Any) -> bool:
    """Whether path still names the file f opened."""
    try:
        a, b = os.fstat(f.fileno()), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class DiskMap:
    """DiffSynth's DiskMap(path, device, torch_dtype=None, state_dict_converter=None,
    buffer_size=10**9) on the C core, plus ``prefetch``."""

    def __init__(
        self,
        path: Any,
        device: Any,
        torch_dtype: Any = None,
        state_dict_converter: Callable | None = None,
        buffer_size: int = 10**9,
        *,
        process_group: Any = None,
    ):
        paths = path if isinstance(path, list) else [path]
        for p in paths:
            if not isinstance(p, (str, os.PathLike)):
                # DiffSynth's DiskMap fails on p.endswith(".safetensors") with a TypeError too
                raise TypeError(f"DiskMap: the path {p!r} is a {type(p).__name__}: give a str or os.PathLike")
        self.path = expand(paths)
        # with a torch.distributed group, each safetensors tensor is read by one rank (by bytes, the
        # same on every rank) and broadcast: every rank must ask for the same keys in the same order
        self.process_group = process_group
        self.device = device
        self.torch_dtype = torch_dtype
        env = os.environ.get("DIFFSYNTH_DISK_MAP_BUFFER_SIZE")
        self.buffer_size = int(env) if env is not None else buffer_size
        self.files = [
            _SafetensorsFile(p) if os.fspath(p).endswith(".safetensors") else _TorchFile(p) for p in self.path
        ]
        self.num_params = 0
        self.name_map: dict[Any, int] = {}
        for file_id, f in enumerate(self.files):
            for name in f.keys():  # noqa: SIM118  a file of a DiskMap is not a dict
                self.name_map[name] = file_id
        self.rename_dict = self.fetch_rename_dict(state_dict_converter)
        self._lock = threading.Lock()
        self._pending: dict[Any, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    def flush_files(self) -> None:
        """As DiffSynth's: after buffer_size elements have been handed out, the files' mappings are
        dropped (tensors already returned keep theirs) and the counter restarts."""
        for f in self.files:
            if isinstance(f, _SafetensorsFile):
                f.flush()
        self.num_params = 0

    def _owner(self, name: Any) -> int | None:
        """The group rank that reads name (None: every rank reads it itself)."""
        if self.process_group is None or not isinstance(self.files[self.name_map[name]], _SafetensorsFile):
            return None
        if not hasattr(self, "_owners"):
            import torch.distributed as dist

            size, sizes = dist.get_world_size(self.process_group), []
            for f in self.files:
                if isinstance(f, _SafetensorsFile):
                    sizes += [(n, e[3] - e[2]) for n, e in f.entries.items()]
            total, done, self._owners = sum(b for _, b in sizes) or 1, 0, {}
            for n, b in sizes:
                self._owners[n] = min(size - 1, int((done + b / 2) * size // total))
                done += b
        return self._owners[name]

    def _read_shared(self, name: Any, owner: int) -> Any:
        """The tensor in the file's dtype on the CPU: read by its owner, broadcast to the group."""
        import torch
        import torch.distributed as dist

        from .. import dlpack

        f = self.files[self.name_map[name]]
        dtype, shape, begin, end = f.entries[name]
        if dist.get_rank(self.process_group) == owner:
            t = f.read(name, None).contiguous()
            buf = t.reshape(-1).view(torch.uint8).clone() if t.numel() else torch.empty(0, dtype=torch.uint8)
        else:
            buf = torch.empty(end - begin, dtype=torch.uint8)
        src = owner if self.process_group is dist.group.WORLD else dist.get_global_rank(self.process_group, owner)
        if buf.numel():
            dist.broadcast(buf, src=src, group=self.process_group)
        return dlpack.view_bytes(buf, dtype, shape, f.path, name)

    def _read(self, name: Any) -> Any:
        import torch

        on_cpu = torch.device(self.device).type == "cpu"
        owner = self._owner(name)
        # on the CPU the C core converts while reading; elsewhere the device converts, as DiffSynth's does
        if owner is not None:
            param = self._read_shared(name, owner)
        else:
            param = self.files[self.name_map[name]].read(name, self.torch_dtype if on_cpu else None)
        if (
            on_cpu
            and self.torch_dtype is not None
            and isinstance(param, torch.Tensor)
            and param.dtype != self.torch_dtype
        ):
            param = param.to(self.torch_dtype)
        if isinstance(param, torch.Tensor) and not on_cpu:
            param = param.to(self.device)
            if self.torch_dtype is not None:
                param = param.to(self.torch_dtype)
        return param

    def __getitem__(self, name: Any) -> Any:
        """The tensor under name (renamed by state_dict_converter when given) in torch_dtype on
        device, read now or taken from a prefetch; KeyError for a name the files do not hold."""
        import torch

        if self.rename_dict is not None:
            name = self.rename_dict[name]
        if name not in self.name_map:
            raise KeyError(name)
        with self._lock:
            pending = self._pending.pop(name, None)
        param = pending.result() if pending is not None else self._read(name)
        if isinstance(param, torch.Tensor):
            with self._lock:
                self.num_params += param.numel()
                if self.num_params > self.buffer_size:
                    self.flush_files()
        return param

    def _real_name(self, name: Any) -> Any:
        real = self.rename_dict[name] if self.rename_dict is not None else name
        if real not in self.name_map:
            raise KeyError(name)
        return real

    def read_host(self, name: Any) -> Any:
        """The tensor under name (renamed as ``self[name]``) in the file's own dtype on the CPU,
        whatever this map's device and dtype: what the VRAM-managed layers copy to the GPU."""
        real = self._real_name(name)
        f = self.files[self.name_map[real]]
        if isinstance(f, _SafetensorsFile) and self._direct() is not None:
            _dtype, _shape, begin, end = f.entries[real]
            if end - begin >= PRIVATE_MAP_MIN:
                t = self._direct_reader.read(f, real)
                if t is not None:
                    return t
        return f.read(real, None)

    def _direct(self) -> DirectReader | None:
        """The O_DIRECT reader of read_host, where the files do not fit in memory (decided on the
        first read; see direct_read.py), else None."""
        with self._lock:
            if not hasattr(self, "_direct_reader"):
                total = sum(f.file.size for f in self.files if isinstance(f, _SafetensorsFile))
                self._direct_reader = DirectReader() if use_direct(total) else None
            return self._direct_reader

    def stored_nbytes(self, name: Any) -> int:
        """Bytes of the tensor under name in its file (0 for torch checkpoints' entries)."""
        real = self._real_name(name)
        f = self.files[self.name_map[real]]
        if isinstance(f, _SafetensorsFile):
            _dtype, _shape, begin, end = f.entries[real]
            return end - begin
        return 0

    def prefetch(self, names: Iterable[Any]) -> None:
        """Starts reading these tensors in the background; ``self[name]`` then waits only for what
        is still being read. Names are the ones ``self[...]`` takes (renamed ones included).
        Does nothing with a process group (its reads are collectives, made in the callers' order)."""
        if self.process_group is not None:
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_PREFETCH_THREADS, thread_name_prefix="diffsynth_c-prefetch")
            for name in names:
                real = self.rename_dict[name] if self.rename_dict is not None else name
                if real not in self._pending and real in self.name_map:
                    self._pending[real] = self._pool.submit(self._read, real)

    def fetch_rename_dict(self, state_dict_converter: Callable | None) -> dict | None:
        """{new name: file key}: the converter applied to {key: key} of every file (None without one)."""
        if state_dict_converter is None:
            return None
        state_dict = {}
        for f in self.files:
            for name in f.keys():  # noqa: SIM118  a file of a DiskMap is not a dict
                state_dict[name] = name
        return state_dict_converter(state_dict)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rename_dict if self.rename_dict is not None else self.name_map)

    def __contains__(self, x: Any) -> bool:
        return x in (self.rename_dict if self.rename_dict is not None else self.name_map)

    def __len__(self) -> int:
        return len(self.rename_dict if self.rename_dict is not None else self.name_map)

    def keys(self) -> Iterable[Any]:
        """The names ``self[...]`` takes: the renamed ones with a converter, else the files' keys."""
        return (self.rename_dict if self.rename_dict is not None else self.name_map).keys()

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        reader = getattr(self, "_direct_reader", None)
        if reader is not None:
            reader.close()
