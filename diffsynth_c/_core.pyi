# Type stub of the C extension diffsynth_c._core (csrc/module.c and the files it assembles: the
# method tables of csrc/bind_*.c, the types of region.c, tensor.c, tensorref.c, openfile.c, the
# constants of module_exec). Every function, type and constant is listed here; tests/test_api_docs.py
# checks that this file and dir(diffsynth_c._core) name the same things. The friendly API is the
# Python package.

from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any, NamedTuple, TypeAlias

from typing_extensions import Buffer

_Path: TypeAlias = str | bytes | PathLike[str] | PathLike[bytes]

__version__: str
MAX_HEADER: int  # the safetensors header length limit (bytes)
ALIGN_HOST: int  # plan_buffers' alignment for buffers of our own (64; csrc/plan.h explains)
ALIGN_TORCH: int  # plan_buffers' alignment for buffers torch allocates, pinned or CUDA (256)

class FormatError(ValueError):
    """A model file breaks its format (the message names the file, the tensor and what is wrong)."""

class NotNativeError(FormatError):
    """A checkpoint the C reader does not represent: the caller may hand it to torch.load(weights_only=True)."""

class Region:
    """Memory that tensors point into; unmapped when the last of them dies."""

    @property
    def nbytes(self) -> int: ...
    @property
    def file_backed(self) -> bool: ...

class Tensor:
    """A tensor's bytes in memory owned by diffsynth_c, exported through DLPack."""

    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def data_ptr(self) -> int: ...
    @property
    def region(self) -> Region: ...
    def __dlpack__(
        self,
        *,
        stream: None = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...
    def bits(self) -> Tensor: ...

class OpenFile:
    """A model file opened once; every read sees the inode opened then (csrc/openfile.c)."""

    def __init__(self, path: _Path) -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def read_header(
        self,
    ) -> tuple[int, int, list[tuple[str, str, tuple[int, ...], int, int]], dict[str, str] | None]: ...
    def map(self) -> Region: ...
    def map_range(self, offset: int, nbytes: int, threads: int = 1, populate: bool = True) -> Tensor: ...
    def read_into(self, buffers: Sequence[_Destination], items: Sequence[_Item], threads: int = 1) -> None: ...
    def close(self) -> None: ...
    def fileno(self) -> int: ...

class TensorRef(NamedTuple):
    """A tensor of a checkpoint as data.pkl describes it: a view into one of its storages."""

    storage: int
    dtype: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool
    parameter: bool
    metadata: dict[str, Any] | None
    state: dict[str, Any] | None

class PlanBuffer(NamedTuple):
    """One buffer of a BufferPlan (a struct sequence)."""

    nbytes: int  # bytes the buffer must hold (a multiple of the alignment; 0 when empty)
    reader: int  # split="buckets": the reader that fills it; else 0
    file: int  # the file it belongs to, or -1 for a bucket (which may span files)

class PlannedTensor(NamedTuple):
    """One tensor of a BufferPlan (a struct sequence); also an item of read_into and cuda_upload."""

    key: str
    file: int  # index into paths
    offset: int  # absolute file offset of its bytes
    nbytes: int  # bytes to read
    dtype: str  # safetensors dtype in the file
    out_dtype: str  # safetensors dtype written (== dtype: copied as it is)
    shape: tuple[int, ...]
    buffer: int  # index into the plan's buffers (and read_into's)
    buffer_offset: int  # a multiple of the alignment
    out_nbytes: int  # bytes written into the buffer

class BufferPlan(NamedTuple):
    """What plan_buffers returns: the buffers to allocate and, per tensor, where its bytes come from and go."""

    buffers: list[PlanBuffer]
    tensors: list[PlannedTensor]

# A destination of read_into / cuda_upload: memory whose size C reads and checks every write against
# (a writable buffer-protocol object, a DLPack capsule, or an object with __dlpack__). No addresses.
_Destination: TypeAlias = Buffer | Any
# A PlannedTensor, or a tuple of its ten fields.
_Item: TypeAlias = PlannedTensor | tuple[str, int, int, int, str, str, tuple[int, ...], int, int, int]

# ---- safetensors headers and hashes
def read_header(
    path: _Path, /
) -> tuple[int, int, list[tuple[str, str, tuple[int, ...], int, int]], dict[str, str] | None]: ...
def hash_files(paths: Sequence[_Path], with_shape: bool = True) -> str: ...
def keys_string(entries: Sequence[tuple[str, Sequence[int] | bytes]], with_shape: bool = True) -> bytes: ...
def md5_hex(data: Buffer, /) -> str: ...

# ---- loads, reads and writes
def load(
    paths: Sequence[_Path],
    dtype: str | None = None,
    threads: int = 1,
    mode: str = "mmap",
    *,
    convert_from: Sequence[str] | None = None,
) -> list[list[tuple[str, Tensor]]]: ...
def read_into(
    paths: Sequence[_Path], buffers: Sequence[_Destination], items: Sequence[_Item], threads: int = 1
) -> None: ...
def plan_buffers(
    paths: Sequence[_Path],
    align: int,
    split: str = "file",  # "file", "tensor" or "buckets"
    *,
    merge: bool = False,
    target: str | None = None,
    convert_from: Sequence[str] = (),
    readers: int = 1,
    bucket_bytes: int = 0,
) -> BufferPlan: ...
def region_view(region: Region, offset: int, nbytes: int, threads: int = 1, /) -> Tensor: ...
def map_ranges(
    path: _Path, ranges: Sequence[tuple[int, int]], threads: int = 1, mode: str = "mmap"
) -> list[Tensor]: ...
def write_file(path: _Path, header: Buffer, items: Sequence[tuple[int, int]], threads: int = 1) -> None: ...
def torch_read(path: _Path, allowed: Sequence[str] = ()) -> tuple[Any, list[tuple[str, str | None, int, int]]]: ...
def _debug_pickle_delay(us: int, /) -> None: ...

# ---- dtype conversion on the CPU
def convert(
    src_dtype: str, dst_dtype: str, data: Buffer, *, portable: bool = False, rules: tuple[int, int] | None = None
) -> bytes: ...
def convert_into(src_dtype: str, dst_dtype: str, src: Buffer, dst: Buffer, threads: int = 1) -> None: ...

# ---- the SIGBUS guard of file mappings
def guard_install(notify: bool = True, /) -> None: ...
def guard_faults() -> list[str]: ...

# ---- CUDA (the library built from kernels/, opened on demand)
def cuda_open(path: _Path, /) -> str | None: ...
def cuda_device_count() -> tuple[int, str]: ...
def cuda_cast(
    src: Any, dst: Any, src_dtype: str, dst_dtype: str, stream: int, nan: int = 1, saturate: int = 0
) -> None: ...
def cuda_norm(
    layer: bool,
    x: Any,
    y: Any,
    weight: Any | None,
    bias: Any | None,
    dtype: str,
    weight_dtype: str,
    eps: float,
    stream: int,
    /,
) -> None: ...
def cuda_upload(
    paths: Sequence[_Path],
    buffers: Sequence[_Destination],
    items: Sequence[_Item],
    device: int,
    scratch: _Destination | None,
    staging_bytes: int,
    threads: int,
    stream: int,
    nan: int = 1,
    saturate: int = 0,
) -> None: ...

# ---- downloads (libcurl)
def http_get(url: str, headers: Sequence[str], max_body: int, /) -> tuple[int, str, bytes, bytes]: ...
def fetch(
    jobs: Sequence[tuple[str, int, int, int, int]],
    headers: Sequence[str],
    connections: int,
    retries: int,
    stall_seconds: float,
    progress: Callable[[int, tuple[int, ...]], object] | None,
    out: list[tuple[int, bool, int, int, int, str]],
    /,
) -> None: ...

# ---- the build
def build_info() -> dict[str, Any]: ...
