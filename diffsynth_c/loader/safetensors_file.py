"""``safe_open``: safetensors' lazy reader on the C core, and the open file it shares with DiskMap.

``safe_open(path, framework="pt", device="cpu")`` answers as ``safetensors.safe_open`` does:
``keys()`` (sorted), ``offset_keys()``, ``metadata()``, ``get_tensor``, ``get_tensors``,
``get_slice`` (``get_shape()``, ``get_dtype()`` and torch's indexing), as a context manager. The
header is validated by the C core before any tensor byte is read, and the file is opened once,
then: every read serves the file that was opened, even after it is replaced on disk (an
``os.replace`` of a new version), as safetensors does.

``get_tensor`` views one private (copy-on-write) mapping of the whole file, its pages read in on
worker threads with the GIL released; tensors of one ``safe_open`` share that mapping as
safetensors' do (a write to one shows in a later ``get_tensor`` of the same key from the same
handle, never in the file). A slice maps only its tensor's bytes, privately, and reads on first
touch only the pages its elements lie in. ``backend="pread"`` reads each tensor into memory of its
own instead.

Errors: a malformed file, an unknown key, a closed handle raise ``SafeOpenError``, which is both
our ``FormatError`` (a ``ValueError``) and, when safetensors is installed, its
``SafetensorError``, so code written against either catches it; the message names the file and
the key. A missing file raises ``FileNotFoundError`` as safetensors does.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Self

from .. import _core
from ..core.conversion import c_converts
from ..core.settings import threads
from ..dlpack import safetensors_name_of, to_torch, torch_dtype_of, view_bytes

# tensors at least this large get a private mapping of their own in DiskMap; smaller ones are
# copied by pread (as fast, and it keeps the number of mappings down)
PRIVATE_MAP_MIN = 1 << 20
_FRAMEWORKS = ("pt", "torch")
_BACKENDS = ("mmap", "pread")


@functools.cache
def _error_class() -> type:
    """FormatError that is also safetensors' SafetensorError when safetensors is installed."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return _core.FormatError
    return type(
        "SafeOpenError",
        (_core.FormatError, SafetensorError),
        {
            "__module__": __name__,
            "__doc__": "A safetensors file or request safe_open refuses (message names file and key).",
        },
    )


def __getattr__(name: str) -> Any:
    if name == "SafeOpenError":  # built on first use: importing safetensors is not needed before
        return _error_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _threads_for(nbytes: int) -> int:
    """Large tensors are read in 8 MiB pieces by several threads; small ones on the caller's."""
    return threads() if nbytes >= (16 << 20) else 1


class SafetensorsFile:
    """A safetensors file opened once: its validated header, and reads that all see the file that
    was opened (``_core.OpenFile``). Shared by ``safe_open`` and ``DiskMap``."""

    def __init__(self, path: Any):
        self.path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
        self.file = _core.OpenFile(path)
        try:
            _hl, self.data_start, tensors, self.metadata = self.file.read_header()
        except BaseException:
            self.file.close()
            raise
        # name -> (dtype, shape, begin, end), names sorted as safe_open().keys() gives them
        self.entries = {name: (dtype, shape, begin, end) for name, dtype, shape, begin, end in tensors}
        self._region = None  # the whole file's private mapping, made when a shared view asks
        self._lock = threading.Lock()

    def close(self) -> None:
        """Closes the file; tensors already returned keep their memory."""
        self.file.close()

    def _entry(self, name: str) -> tuple:
        return self.entries[name]

    def shared_view(self, name: str) -> Any:
        """The tensor as a view of the whole file's private mapping (shared by every shared view
        of this file), its pages read in now."""
        dtype, shape, begin, end = self._entry(name)
        with self._lock:
            if self._region is None:
                self._region = self.file.map()
            region = self._region
        raw = to_torch(_core.region_view(region, self.data_start + begin, end - begin, _threads_for(end - begin)))
        return view_bytes(raw, dtype, shape, self.path, name)

    def private_view(self, name: str, populate: bool = True) -> Any:
        """The tensor in a private mapping of its own bytes: a write to it reaches neither the file
        nor any other tensor. No copy; pages read in now (populate) or on first touch."""
        dtype, shape, begin, end = self._entry(name)
        raw = to_torch(self.file.map_range(self.data_start + begin, end - begin, _threads_for(end - begin), populate))
        return view_bytes(raw, dtype, shape, self.path, name)

    def read_copy(self, name: str, torch_dtype: Any = None) -> Any:
        """The tensor read into fresh memory: in torch_dtype where C converts that pair (else in the
        file's dtype)."""
        import torch

        dtype, shape, begin, end = self._entry(name)
        target = safetensors_name_of(torch_dtype) if torch_dtype is not None else None
        convert = target is not None and target != dtype and c_converts(dtype, target)
        if convert:
            out = torch.empty(shape, dtype=torch_dtype_of(target))
        else:
            out = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            raw = out.reshape(-1).view(torch.uint8)  # C sizes the buffer from it (DLPack), whatever the dtype
            out_dtype = target if convert else dtype
            item = (name, 0, self.data_start + begin, end - begin, dtype, out_dtype, shape, 0, 0, raw.numel())
            self.file.read_into([raw], [item], _threads_for(end - begin))
        return out if convert else view_bytes(out, dtype, shape, self.path, name)

    def read_independent(self, name: str, torch_dtype: Any = None, mode: str = "mmap") -> Any:
        """A tensor no other caller shares (DiffSynth's DiskMap clones every read): converted in C
        where it can be, else a private mapping of its own (large tensors, mmap mode) or a copy."""
        dtype, _shape, begin, end = self._entry(name)
        target = safetensors_name_of(torch_dtype) if torch_dtype is not None else None
        if target is not None and target != dtype and c_converts(dtype, target):
            return self.read_copy(name, torch_dtype)
        if mode == "mmap" and end - begin >= PRIVATE_MAP_MIN:
            return self.private_view(name)
        return self.read_copy(name)


def _device_of(device: Any) -> Any:
    import torch

    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise _error_class()(f"device {device} is invalid") from None


class SafeSlice:
    """What ``safe_open.get_slice`` returns: the tensor's shape and dtype from the header, and its
    elements through torch's indexing (``sl[:, 1:3]``, ``sl[0, ...]``), reading only the pages the
    selected elements lie in."""

    def __init__(self, handle: safe_open, name: str, file: SafetensorsFile):
        self._device = handle._device
        self._name = name
        self._dtype, self._shape, _b, _e = file.entries[name]
        # the tensor's bytes mapped now, read on first touch: the slice stays usable after the
        # handle is closed, as safetensors' does
        self._full = handle._read(file, lambda: file.private_view(name, populate=False))

    def get_shape(self) -> list[int]:
        """The shape written in the header."""
        return list(self._shape)

    def get_dtype(self) -> str:
        """The safetensors dtype name ("F32", "BF16", ...)."""
        return self._dtype

    def __getitem__(self, index: Any) -> Any:
        out = self._full[index]
        return out if self._device.type == "cpu" else out.to(self._device)

    def __repr__(self) -> str:
        return f"<diffsynth_c SafeSlice '{self._name}' {self._dtype} {self.get_shape()}>"


class safe_open:  # the name safetensors gives it
    """``safetensors.safe_open`` on the C core: ``safe_open(filename, framework="pt",
    device="cpu", *, backend="mmap")``. Reads always come from the file opened here."""

    def __init__(self, filename: Any, framework: str = "pt", device: Any = "cpu", *, backend: str = "mmap"):
        if framework not in _FRAMEWORKS:
            raise _error_class()(
                f"framework {framework} is invalid: diffsynth_c.safe_open returns torch tensors ('pt')"
            )
        if backend not in _BACKENDS:
            raise _error_class()(f"backend {backend} is invalid: expected one of {', '.join(_BACKENDS)}")
        self._device = _device_of(device)
        self._backend = backend
        self._path = os.fsdecode(filename) if isinstance(filename, (str, bytes, os.PathLike)) else str(filename)
        try:
            self._file: SafetensorsFile | None = SafetensorsFile(filename)
        except _core.FormatError as e:
            raise _error_class()(str(e)) from None

    def _open_file(self) -> SafetensorsFile:
        f = self._file
        if f is None:
            raise _error_class()(f"{self._path}: File is closed")
        return f

    def _entry_file(self, name: str) -> SafetensorsFile:
        f = self._open_file()
        if name not in f.entries:
            raise _error_class()(f"{f.path}: File does not contain tensor '{name}'")
        return f

    def keys(self) -> list[str]:
        """The tensor names, sorted."""
        return list(self._open_file().entries)

    def offset_keys(self) -> list[str]:
        """The tensor names in the order of their bytes in the file."""
        entries = self._open_file().entries
        return sorted(entries, key=lambda k: (entries[k][2], entries[k][3]))

    def metadata(self) -> dict[str, str] | None:
        """The header's ``__metadata__`` (None when it has none)."""
        meta = self._open_file().metadata
        return dict(meta) if meta is not None else None

    def _read(self, f: SafetensorsFile, read: Any) -> Any:
        """read(), with our errors as SafeOpenError (a handle closed by another thread meanwhile
        included)."""
        try:
            return read()
        except _core.FormatError as e:
            raise _error_class()(str(e)) from None
        except ValueError:
            if f.file.closed:
                raise _error_class()(f"{self._path}: File is closed") from None
            raise

    def get_tensor(self, name: str) -> Any:
        """The tensor under name on this handle's device."""
        f = self._entry_file(name)
        t = self._read(f, lambda: f.shared_view(name) if self._backend == "mmap" else f.read_copy(name))
        return t if self._device.type == "cpu" else t.to(self._device)

    def get_tensors(self) -> dict[str, Any]:
        """Every tensor, in the order of offset_keys()."""
        return {k: self.get_tensor(k) for k in self.offset_keys()}

    def get_slice(self, name: str) -> SafeSlice:
        """A SafeSlice of the tensor under name: index it to read part of the tensor."""
        return SafeSlice(self, name, self._entry_file(name))

    def __enter__(self) -> Self:
        self._open_file()
        return self

    def __exit__(self, *exc: object) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def __repr__(self) -> str:
        f = self._file
        return f"<diffsynth_c.safe_open {f.path!r}>" if f is not None else "<diffsynth_c.safe_open (closed)>"
