"""The peer loaders that the benchmarks measure against diffsynth_c: each adapter loads a list of
.safetensors files into {name: tensor}, applying torch_dtype with .to() to every tensor as
DiffSynth's load_state_dict does, and returns tensors that stay valid after the call.

PEERS loads to the CPU (each adapter was run and compared bit for bit with safetensors, except
instanttensor, which has no CPU destination and raises NotImplementedError); GPU_PEERS loads to
CUDA (written from the libraries' sources and NOT run: there was no GPU). available_peers() says
which ones can run in this process and records why the others cannot in UNAVAILABLE.

tensorizer cannot read safetensors files: it reads its own format. Its adapter reads a
"twin" file written beforehand by write_tensorizer_twins() (see the tensorizer section).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch

Loader = Callable[[list[str], "torch.dtype | None"], dict[str, torch.Tensor]]


def _cast(sd: dict[str, torch.Tensor], torch_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """DiffSynth's conversion, in place: .to(torch_dtype) on every tensor (integers and bools
    included); each original is dropped as soon as it is converted."""
    if torch_dtype is not None:
        for k, v in sd.items():
            sd[k] = v.to(torch_dtype)
    return sd


def _cuda_device() -> str:
    return f"cuda:{torch.cuda.current_device()}"


# ---- diffsynth (the reference) ---------------------------------------------------------------
# Under the hood: per file, safetensors.safe_open, then get_tensor(k) key by key, then .to(dtype)
# at once for that tensor. On the CPU, safe_open maps the whole file with
# torch.UntypedStorage.from_file(shared=False), a MAP_PRIVATE mmap, and every tensor is a zero-copy
# view of it: nothing is read until pages are touched (the bytes come in by page faults, on the
# touching thread, one thread). A dtype conversion reads and copies at once. On CUDA
# (device="cuda", which safetensors takes as cuda:0), every tensor is copied from the mapping into a
# fresh pinned host tensor, then .to(cuda) one tensor at a time.


def load_diffsynth(paths: list[str], torch_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    from diffsynth.core import load_state_dict

    return load_state_dict(list(paths), torch_dtype=torch_dtype)


def load_diffsynth_cuda(paths: list[str], torch_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """UNTESTED (no GPU here)."""
    from diffsynth.core import load_state_dict

    sd = load_state_dict(list(paths), torch_dtype=torch_dtype, device="cuda")
    torch.cuda.synchronize()
    return sd


# ---- safetensors ------------------------------------------------------------------------------
# Under the hood: load_file(path) = safe_open(path).get_tensors(): the same MAP_PRIVATE mmap and
# zero-copy views as above (default backend="mmap"), so the call itself reads nothing but the
# header; pages come in when touched, single-threaded. safetensors >= 0.8 also has
# backend="pread" (one pread into a fresh bytearray per tensor, one thread), not measured here.
# Files are merged with dict.update, later files winning, as DiffSynth merges them. On CUDA: a
# pinned host tensor per tensor, memcpy from the mapping, synchronous .to(cuda).


def load_safetensors(paths: list[str], torch_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for p in paths:
        sd.update(_cast(load_file(p, device="cpu"), torch_dtype))
    return sd


def load_safetensors_cuda(paths: list[str], torch_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """UNTESTED (no GPU here)."""
    from safetensors.torch import load_file

    device = _cuda_device()
    sd: dict[str, torch.Tensor] = {}
    for p in paths:
        sd.update(_cast(load_file(p, device=device), torch_dtype))
    torch.cuda.synchronize()
    return sd


# ---- fastsafetensors ---------------------------------------------------------------------------
# Under the hood (0.5.0, nogds copier, the CPU path): one malloc'd buffer per file, the size of its
# data section; a native pool of max_threads=16 persistent threads (whatever the core count), each
# with two bounce slots of 16 MiB / 32 = 512 KiB, preads the file into a slot and memcpys the
# slot into the buffer; tensors are then zero-copy DLPack views of that buffer. Reads use O_DIRECT
# by default on local filesystems (ext4, xfs, ...; not on tmpfs or network filesystems), so the page
# cache is bypassed: a "warm" load still reads the disk. FASTSAFETENSORS_ODIRECT=0 makes it
# buffered. Since 0.5 the views share ownership of the file's buffer (it is freed when the last
# view dies), so nothing is cloned here; one live tensor keeps its whole file's buffer alive (so
# does one that .to(dtype) left as it was, being of that dtype already). A name present in two
# files is an error (DiffSynth lets the later file win). Its own online dtype conversion only
# narrows and is not DiffSynth's .to(), so .to() is applied afterwards instead.
# GPU path (SafeTensorsFileLoader with nogds=False, the default): GPUDirect Storage through cuFile
# when /dev/nvidia-fs0 and libcufile exist; otherwise it warns and falls back to the nogds copier,
# which preads (O_DIRECT) into pinned bounce buffers and cudaMemcpyAsyncs into one caching-allocator
# block per file; tensors are DLPack views of that block.


def _fastsafetensors(
    paths: list[str], torch_dtype: torch.dtype | None, device: str, nogds: bool
) -> dict[str, torch.Tensor]:
    from fastsafetensors import SafeTensorsFileLoader

    loader = SafeTensorsFileLoader(None, device, nogds=nogds)
    try:
        loader.add_filenames({0: list(paths)})
        buffers = loader.copy_files_to_device()
        try:
            sd = {name: buffers.get_tensor(name) for name in loader.get_keys()}
        finally:
            buffers.close()  # drops the loader's reference only: the tensors keep their memory
    finally:
        loader.close()  # releases the copier and its reader threads
    return _cast(sd, torch_dtype)


def load_fastsafetensors(paths: list[str], torch_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return _fastsafetensors(paths, torch_dtype, "cpu", nogds=True)


def load_fastsafetensors_cuda(paths: list[str], torch_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """UNTESTED (no GPU here)."""
    sd = _fastsafetensors(paths, torch_dtype, _cuda_device(), nogds=False)
    torch.cuda.synchronize()
    return sd


# ---- runai-model-streamer ----------------------------------------------------------------------
# Under the hood (0.17.0): a native streamer with RUNAI_STREAMER_CONCURRENCY=16 workers reads the
# tensors' byte ranges asynchronously, by default with io_uring on O_DIRECT descriptors
# (RUNAI_STREAMER_FS_STRATEGY=io_uring_direct,libaio_direct,sync_buffered: the first this host can
# serve; queue depth 64, 8 MiB chunks), into a ring of up to RUNAI_STREAMER_RING_BUFFERS=18 numpy
# buffers of about min(model, RUNAI_STREAMER_MEMORY_LIMIT = 40 GB) / 18 bytes each. Ranges are
# placed so that address and file offset agree modulo the direct-I/O block and read in place; the
# others are bounced through a scratch buffer, and a tensor left at an address its dtype cannot use
# is cloned by the library. Tensors are yielded in completion order as views of those buffers. With
# owned=True (the default, passed explicitly below) a drained buffer is handed to the caller and a
# fresh one takes its place in the ring, so the views are never overwritten and are not cloned
# here; one live tensor keeps its whole buffer alive. O_DIRECT bypasses the page cache: a "warm"
# load still reads the disk (RUNAI_STREAMER_FS_STRATEGY=sync_buffered reads through the cache).
# Process-wide effect: the first stream sets os.environ["RUNAI_STREAMER_PROCESS_GROUP_SIZE"]. On
# CUDA (no distributed group): the same host ring, then a synchronous tensor.to(device) per tensor.


def _runai(paths: list[str], torch_dtype: torch.dtype | None, device: str) -> dict[str, torch.Tensor]:
    from runai_model_streamer import SafetensorsStreamer

    sd: dict[str, torch.Tensor] = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(list(paths), device=device, owned=True)
        for name, tensor in streamer.get_tensors():
            sd[name] = tensor if torch_dtype is None else tensor.to(torch_dtype)
    return sd


def load_runai(paths: list[str], torch_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return _runai(paths, torch_dtype, "cpu")


def load_runai_cuda(paths: list[str], torch_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """UNTESTED (no GPU here)."""
    sd = _runai(paths, torch_dtype, _cuda_device())
    torch.cuda.synchronize()
    return sd


# ---- instanttensor ----------------------------------------------------------------------------
# Under the hood (0.2.2): CUDA only: safe_open raises ValueError for any non-CUDA device, there is
# no CPU destination. For CUDA it reads the files in 8 MiB chunks with io_uring or libaio on O_DIRECT
# descriptors by default (INSTANTTENSOR_BACKEND overrides; on tmpfs it maps the files and copies
# with worker threads) into a cudaHostRegister'ed host buffer, cudaMemcpyAsyncs them into a GPU ring
# buffer sized from the tensor sizes (at most half the free GPU memory), and yields the tensors in
# file-offset order; with copy=True (the default) each one is cloned out of the ring, so it owns its
# memory. It sorts the file list it is given in place, hence the copy passed to it.


def _instanttensor(paths: list[str], torch_dtype: torch.dtype | None, device: str) -> dict[str, torch.Tensor]:
    import instanttensor

    try:
        opened = instanttensor.safe_open(list(paths), framework="pt", device=device, copy=True)
    except ValueError as e:
        if "CUDA" in str(e) and not device.startswith("cuda"):
            raise NotImplementedError(f"instanttensor cannot load to {device}: {e}") from e
        raise
    sd: dict[str, torch.Tensor] = {}
    with opened as f:
        for name, tensor in f.tensors():
            sd[name] = tensor if torch_dtype is None else tensor.to(torch_dtype)
    return sd


def load_instanttensor(paths: list[str], torch_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Raises NotImplementedError: instanttensor 0.2.2 has no CPU destination."""
    return _instanttensor(paths, torch_dtype, "cpu")


def load_instanttensor_cuda(paths: list[str], torch_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """UNTESTED (no GPU here)."""
    sd = _instanttensor(paths, torch_dtype, _cuda_device())
    torch.cuda.synchronize()
    return sd


# ---- tensorizer -------------------------------------------------------------------------------
# tensorizer (2.12.1) cannot read safetensors files, only its own format. So its adapter reads,
# for each x.safetensors, a twin x.tensors holding the same tensors, which write_tensorizer_twins()
# writes beforehand (the writing is not part of any timing). The twin is a different file: a
# benchmark that drops or warms the page cache must do it for tensorizer_twin(p) as well.
# Under the hood (deserializer, lazy_load=False): the whole file is read in the constructor by
# num_readers threads (8 for a local file), each reopening the file and reading its share of the
# tensors in order with readinto() into one fresh torch.empty buffer per tensor (owned, no reuse);
# tensors come back as nn.Parameter and are unwrapped to plain tensors here. On CUDA each reader
# reads into a pinned staging buffer and copies every tensor to the device on its own stream.
# Limitation: tensorizer 2.12.1 fails to open a file holding an EMPTY tensor of a dtype numpy lacks
# (bfloat16, float8_*, ...): TensorEntry.deserialized_length calls numpy.dtype() on its opaque
# dtype string. The writer refuses such tensors with NotImplementedError, and the reader turns that
# failure into NotImplementedError too. Its own dtype= argument skips bools, unlike DiffSynth's
# .to(), so .to() is applied afterwards instead.


def tensorizer_twin(path: str) -> str:
    """The tensorizer file that stands in for a .safetensors file."""
    return os.path.splitext(path)[0] + ".tensors"


def files_read_by(name: str, paths: list[str]) -> list[str]:
    """The files a loader really reads for these .safetensors paths: what a benchmark warms or
    drops from the page cache before timing it."""
    return [tensorizer_twin(p) for p in paths] if name == "tensorizer" else list(paths)


def prepare(names: Iterable[str], paths: list[str]) -> None:
    """Writes what some loaders need beside the files (tensorizer's twins) before any timing."""
    if "tensorizer" in names:
        write_tensorizer_twins(paths)


def _numpy_lacks(dtype: torch.dtype) -> bool:
    try:
        torch.empty(0, dtype=dtype).numpy()
        return False
    except TypeError:
        return True


def write_tensorizer_file(state_dict: dict[str, torch.Tensor], path: str) -> None:
    """Serializes a state dict to a tensorizer file (atomically: written aside, then renamed)."""
    from tensorizer import TensorSerializer

    for name, t in state_dict.items():
        if t.numel() == 0 and _numpy_lacks(t.dtype):
            raise NotImplementedError(
                f"tensorizer cannot read back an empty {t.dtype} tensor ({name!r}): its deserializer "
                "fails on empty tensors of dtypes numpy lacks"
            )
    tmp = f"{path}.tmp{os.getpid()}"
    serializer = TensorSerializer(tmp)
    try:
        serializer.write_state_dict(state_dict)
    finally:
        serializer.close()
    os.replace(tmp, path)


def write_tensorizer_twins(paths: Iterable[str], overwrite: bool = False) -> list[str]:
    """Writes tensorizer_twin(p) for every .safetensors p that lacks an up-to-date one; returns
    the twins' paths."""
    from safetensors.torch import load_file

    twins = []
    for p in paths:
        twin = tensorizer_twin(p)
        if overwrite or not _twin_fresh(p, twin):
            write_tensorizer_file(load_file(p), twin)
        twins.append(twin)
    return twins


def _twin_fresh(path: str, twin: str) -> bool:
    return os.path.exists(twin) and os.path.getmtime(twin) >= os.path.getmtime(path)


def load_tensorizer_files(
    tensorizer_paths: list[str], torch_dtype: torch.dtype | None = None, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Loads tensorizer files (not safetensors), later files winning on a shared name."""
    from tensorizer import TensorDeserializer

    sd: dict[str, torch.Tensor] = {}
    for p in tensorizer_paths:
        try:
            deserializer = TensorDeserializer(p, device=device, lazy_load=False)
        except TypeError as e:
            if "not understood" in str(e):
                raise NotImplementedError(
                    f"tensorizer cannot open {p}: an empty tensor of a dtype numpy lacks ({e})"
                ) from e
            raise
        with deserializer:
            for name, param in deserializer.items():
                t = param.data  # a plain tensor on the same storage, without requires_grad
                sd[name] = t if torch_dtype is None else t.to(torch_dtype)
    return sd


def _tensorizer_twins_of(paths: list[str]) -> list[str]:
    twins = []
    for p in paths:
        if p.endswith(".tensors"):
            twins.append(p)
            continue
        twin = tensorizer_twin(p)
        if not _twin_fresh(p, twin):
            raise FileNotFoundError(
                f"no up-to-date tensorizer twin {twin} for {p}: run peers.write_tensorizer_twins(paths) first"
            )
        twins.append(twin)
    return twins


def load_tensorizer(paths: list[str], torch_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Takes .safetensors paths (the benchmark's) and reads their twins; .tensors paths are read
    as given."""
    return load_tensorizer_files(_tensorizer_twins_of(paths), torch_dtype, "cpu")


def load_tensorizer_cuda(paths: list[str], torch_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """UNTESTED (no GPU here)."""
    sd = load_tensorizer_files(_tensorizer_twins_of(paths), torch_dtype, _cuda_device())
    torch.cuda.synchronize()
    return sd


# ---- registries -------------------------------------------------------------------------------

PEERS: dict[str, Loader] = {
    "diffsynth": load_diffsynth,
    "safetensors": load_safetensors,
    "fastsafetensors": load_fastsafetensors,
    "runai-model-streamer": load_runai,
    "instanttensor": load_instanttensor,
    "tensorizer": load_tensorizer,
}

# Not run here: no GPU. Written from the libraries' sources.
GPU_PEERS: dict[str, Loader] = {
    "diffsynth": load_diffsynth_cuda,
    "safetensors": load_safetensors_cuda,
    "fastsafetensors": load_fastsafetensors_cuda,
    "runai-model-streamer": load_runai_cuda,
    "instanttensor": load_instanttensor_cuda,
    "tensorizer": load_tensorizer_cuda,
}

# name -> why it is left out, filled by the last available_peers() call.
UNAVAILABLE: dict[str, str] = {}


def _probe(name: str, device: str) -> None:
    """Imports the peer's library and starts what it starts on first use; raises if it cannot run."""
    on_cpu = device == "cpu"
    if not on_cpu and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    if name == "diffsynth":
        from diffsynth.core import load_state_dict  # noqa: F401
    elif name == "safetensors":
        import safetensors.torch  # noqa: F401
    elif name == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader

        SafeTensorsFileLoader(None, "cpu" if on_cpu else _cuda_device(), nogds=on_cpu).close()
    elif name == "runai-model-streamer":
        from runai_model_streamer.libstreamer.libstreamer import runai_end, runai_start

        runai_end(runai_start())
    elif name == "instanttensor":
        import instanttensor  # noqa: F401

        if on_cpu:
            raise NotImplementedError(
                f"CUDA devices only (instanttensor {_version('instanttensor')} has no CPU destination)"
            )
    elif name == "tensorizer":
        import tensorizer  # noqa: F401
    else:
        raise KeyError(name)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def available_peers(device: str = "cpu", paths: list[str] | None = None) -> list[str]:
    """Names in PEERS (device "cpu") or GPU_PEERS (any other device) that can run in this process;
    UNAVAILABLE is refilled with the reasons for the others. With paths, tensorizer also needs an
    up-to-date twin of each."""
    registry = PEERS if device == "cpu" else GPU_PEERS
    UNAVAILABLE.clear()
    names = []
    for name in registry:
        try:
            _probe(name, device)
            if name == "tensorizer" and paths is not None:
                _tensorizer_twins_of(list(paths))
        except Exception as e:  # noqa: BLE001 - ImportError, OSError, a native library failing to start, ...
            UNAVAILABLE[name] = f"{type(e).__name__}: {e}".strip()
            continue
        names.append(name)
    return names
