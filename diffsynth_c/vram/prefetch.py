"""The prefetch scheduler of the VRAM-managed layers: weights arrive before the layer that needs them.

A wrapped layer whose weights are stored away from its computation (on the CPU, on disk, or in
another dtype) asks its model's ``Scheduler`` for them with a ``Need``: which tensors, where they
are, and the dtype and device the computation wants. The scheduler learns the order in which the
layers of a model run (the first pass records it) and, on later passes, starts fetching the next
layers' weights while the current one computes:

- on a CUDA computation device (``CudaTransport``) a layer's resident CPU weights are packed once
  into one contiguous page-locked slab (exact size, registered with ``cudaHostRegister``, no
  power-of-two rounding), copied in one ``cudaMemcpyAsync`` on a copy stream, and the compute
  stream waits on an event: no host synchronisation. The bus carries the stored dtype (fp8 storage:
  one byte per parameter); the cast to the computation dtype runs on the GPU after the copy (our
  cast kernel, bit-identical to torch's ``.to()``). Weights on disk are read ahead by worker threads
  into pinned staging slabs, then copied the same way. Device buffers come from torch's caching
  allocator on the copy stream and are recycled by it (``record_stream`` on the compute stream).
- on a CPU computation device (``ThreadTransport``, what CI runs) the same schedule runs on worker
  threads: disk reads and dtype conversions of the next layers happen while the current one
  computes.

If a layer arrives out of the learned order (another pipeline branch, a layer skipped), everything
in flight is dropped, the layer is fetched on demand and the order is learned again. A fetched
weight is used only if its source is still the same tensor at the same version (``_version``
counts in-place writes such as a fused LoRA): never a stale weight.

Settings: ``DIFFSYNTH_C_PREFETCH=0`` turns prefetching off (every fetch on demand, same results);
``DIFFSYNTH_C_PREFETCH_DEPTH`` (default 2) is how many layers ahead; ``DIFFSYNTH_C_PREFETCH_MIB``
(default 2048) bounds the bytes in flight (at least one layer always goes ahead).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from .direct_read import BufferPool

_ALIGN = 256  # slab offsets: aligned for vector loads of every dtype
_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable


def _clear_torch_cuda_error() -> None:
    """Clears the last error of the CUDA runtime torch uses (a failed cudaHostRegister leaves one,
    which torch's next kernel launch check would report as its own). Best effort: torch has no
    binding for cudaGetLastError, so it goes through ctypes to the libcudart already loaded."""
    import ctypes

    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()
    except (OSError, AttributeError):
        pass


def prefetch_enabled() -> bool:
    return os.environ.get("DIFFSYNTH_C_PREFETCH", "1") != "0"


def _depth() -> int:
    return max(1, int(os.environ.get("DIFFSYNTH_C_PREFETCH_DEPTH", "2")))


def _max_bytes() -> int:
    return max(0, int(os.environ.get("DIFFSYNTH_C_PREFETCH_MIB", "2048"))) << 20


@dataclass
class Need:
    """What a layer's computation needs: tensor ``names[i]`` comes from ``sources[i]`` (a resident
    tensor) or, when that is None, from ``disk_map[keys[i]]``; it must end up on ``device`` in
    ``dtypes[i]`` (None: the stored dtype)."""

    names: list
    sources: list
    keys: list
    dtypes: list
    device: Any
    disk_map: Any = None
    versions: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.versions = [None if s is None else s._version for s in self.sources]

    def same_sources(self, other: Need) -> bool:
        """True when other names the same tensors at the same versions (nothing was rewritten)."""
        if self.names != other.names or self.keys != other.keys or self.dtypes != other.dtypes:
            return False
        return all(a is b for a, b in zip(self.sources, other.sources)) and self.versions == other.versions

    def is_local(self) -> bool:
        """True when every tensor is already on the (non-CPU) computation device: only a cast on
        that device is left, nothing to fetch."""
        import torch

        want = torch.device(self.device)
        if want.type == "cpu":
            return False
        for s in self.sources:
            if s is None or s.device.type != want.type or (want.index is not None and s.device.index != want.index):
                return False
        return True

    def nbytes(self) -> int:
        total = 0
        for s, k in zip(self.sources, self.keys):
            if s is not None:
                total += s.numel() * s.element_size()
            else:
                total += _disk_nbytes(self.disk_map, k)
        return total


def _disk_nbytes(disk_map: Any, key: Any) -> int:
    size_of = getattr(disk_map, "stored_nbytes", None)
    return size_of(key) if size_of is not None else 0


def read_stored(disk_map: Any, key: Any) -> Any:
    """The tensor under key in the file's own dtype, on the CPU (diffsynth_c's DiskMap), or what the
    map returns (another DiskMap)."""
    read_host = getattr(disk_map, "read_host", None)
    return read_host(key) if read_host is not None else disk_map[key]


def _cast_on_cpu(src: Any, dtype: Any) -> Any:
    """src in dtype on the CPU, converted by the C core on several threads where it converts that
    pair exactly as torch does (bit for bit), else None."""
    import torch

    from .. import _core
    from ..core.conversion import c_converts
    from ..core.settings import threads
    from ..dlpack import safetensors_name_of

    s, d = safetensors_name_of(src.dtype), safetensors_name_of(dtype)
    if src.device.type != "cpu" or not src.is_contiguous() or s is None or d is None or not c_converts(s, d):
        return None
    # from a pool of buffers taken back when torch frees the tensor: a fresh allocation of this
    # size is mapped anew and faulted in page by page on every pass (fp8 storage of 0.5 GiB: ~175 ms
    # of CPU per forward on page faults, ten times the conversion itself)
    nbytes = src.numel() * torch.empty((), dtype=dtype).element_size()
    out = _CONVERT_POOL.fresh(nbytes).view(dtype).view(src.shape) if nbytes >= (1 << 20) else None
    if out is None:
        out = torch.empty(src.shape, dtype=dtype)
    # an 8-bit source into 16 bits is a vector table lookup (~15 G elements/s on one core): threads
    # would cost more to start than they save below 64M elements
    many = 1 << 26 if src.element_size() == 1 and out.element_size() == 2 else 1 << 20
    if src.numel():
        _core.convert_into(
            s,
            d,
            src.reshape(-1).view(torch.uint8).numpy(),
            out.reshape(-1).view(torch.uint8).numpy(),
            threads(per_cpu=1) if src.numel() >= many else 1,
        )
    return out


_CONVERT_POOL = BufferPool()


def materialize(need: Need) -> dict:
    """The computation's tensors, made on the calling thread: what DiffSynth's cast
    (``torch.empty_like(src, dtype, device).copy_(src)``) gives, bit for bit. On the CPU, dtype
    conversions run in the C core, and a tensor just read from disk in the wanted dtype is used
    as read (it is fresh already)."""
    import torch

    out = {}
    on_cpu = torch.device(need.device).type == "cpu"
    for name, src, key, dtype in zip(need.names, need.sources, need.keys, need.dtypes):
        fresh = src is None
        if fresh:
            src = read_stored(need.disk_map, key)
        want = dtype or src.dtype
        r = None
        if on_cpu and src.device.type == "cpu":
            if want == src.dtype and fresh:
                r = src
            elif want != src.dtype:
                r = _cast_on_cpu(src, want)
        if r is None:
            r = torch.empty_like(src, dtype=want, device=need.device)
            r.copy_(src)
        out[name] = r
    return out


class _Ticket:
    """One layer's fetch in flight."""

    __slots__ = ("handle", "layer", "nbytes", "need")

    def __init__(self, layer: Any, need: Need, handle: Any, nbytes: int):
        self.layer, self.need, self.handle, self.nbytes = layer, need, handle, nbytes


def _without_grad(fn: Callable, *args: Any) -> Any:
    """fn(*args) with autograd off, for the worker threads (grad mode is per thread, and on in a new
    one). With it on, a view of a weight that requires grad (a reshape in a cast) takes the
    weight's autograd lock and then waits for the GIL, while the main thread, holding the GIL,
    waits for that lock in ``module.to()``: a deadlock. Tensors that need autograd are fetched on
    the calling thread instead (Scheduler.fetch)."""
    import torch

    with torch.no_grad():
        return fn(*args)


def _detached(need: Need) -> Need:
    """need with its resident sources replaced by aliases made here, on the calling thread, for a
    worker to read. The layer's own tensors may be rewritten meanwhile (``module.to()`` sets their
    ``.data`` when the layer changes state), which torch does not allow while another thread reads
    the same tensor (a crash, or a deadlock over its autograd lock); an alias keeps the storage
    it was made from alive and is touched by no one else."""
    return replace(need, sources=[None if s is None else s.detach() for s in need.sources])


def _needs_grad(need: Need) -> bool:
    """Whether the caller records autograd through these weights: then they are cast on its own
    thread, in its graph, as DiffSynth does."""
    import torch

    return torch.is_grad_enabled() and any(s is not None and s.requires_grad for s in need.sources)


class ThreadTransport:
    """Fetches on worker threads (CPU computation; disk reads for any computation device)."""

    def __init__(self, workers: int = 2):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="diffsynth_c-vram")

    def start(self, need: Need) -> Future:
        return self.pool.submit(_without_grad, materialize, _detached(need))

    def finish(self, handle: Future, need: Need) -> dict:
        return handle.result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Scheduler:
    """The fetches of one model's wrapped layers, in the order they run (see the module's note).

    ``fetch(layer, need)`` returns the layer's computation tensors (a dict name -> tensor). The
    transport is chosen from the computation device on the first fetch."""

    def __init__(self, transport_for: Callable[[Any], Any] | None = None):
        self.order: list = []  # the learned sequence of layers (a layer may occur more than once)
        self.recording = True
        self.pos = 0
        self.inflight: dict[int, _Ticket] = {}
        self.transports: dict[str, Any] = {}
        self.transport_for = transport_for or default_transport
        self.lock = threading.Lock()
        # counters, for tests and benchmarks: hits (prefetched and used), misses (fetched on demand),
        # stale (prefetched, then dropped because the source changed), relearned (order changes)
        self.stats = {"hits": 0, "misses": 0, "stale": 0, "relearned": 0}

    # --- order learning ---------------------------------------------------------------------
    def _advance(self, layer: Any) -> bool:
        """Moves the cursor past layer; returns whether the learned order predicted it."""
        if self.recording:
            if self.order and self.order[0] is layer:
                self.recording = False
                self.pos = 1 % len(self.order)
                return True
            self.order.append(layer)
            return False
        if self.order[self.pos] is layer:
            self.pos = (self.pos + 1) % len(self.order)
            return True
        self.stats["relearned"] += 1
        self.drop()
        self.order = [layer]
        self.recording = True
        return False

    def drop(self) -> None:
        """Forgets everything in flight (its buffers are freed when the copies end)."""
        self.inflight.clear()

    def forget(self, layer: Any) -> None:
        """Drops what is in flight for one layer."""
        self.inflight.pop(id(layer), None)

    def __deepcopy__(self, memo: dict) -> Scheduler:
        return self  # copies of a layer (DiffSynth's computation copies) share their model's scheduler

    def reset(self) -> None:
        """Forgets the learned order too (after a layer changed state)."""
        self.drop()
        self.order = []
        self.recording = True
        self.pos = 0

    # --- fetching -----------------------------------------------------------------------------
    def _transport(self, need: Need) -> Any:
        key = str(need.device)
        t = self.transports.get(key)
        if t is None:
            t = self.transports[key] = self.transport_for(need.device)
        return t

    def _issue_ahead(self) -> None:
        if self.recording or not self.order:
            return
        budget = _max_bytes() - sum(t.nbytes for t in self.inflight.values())
        n = len(self.order)
        for step in range(min(_depth(), n - 1)):
            layer = self.order[(self.pos + step) % n]
            if id(layer) in self.inflight:
                continue
            need = layer.current_need()
            if need is None or need.is_local() or _needs_grad(need):  # nothing to fetch, or not ahead
                continue
            nbytes = need.nbytes()
            if self.inflight and nbytes > budget:
                break
            handle = self._transport(need).start(need)
            self.inflight[id(layer)] = _Ticket(layer, need, handle, nbytes)
            budget -= nbytes

    def fetch(self, layer: Any, need: Need) -> dict:
        if need.is_local():
            return materialize(need)
        if not prefetch_enabled() or _needs_grad(need):
            self.stats["misses"] += 1
            return materialize(need)
        with self.lock:
            predicted = self._advance(layer)
            ticket = self.inflight.pop(id(layer), None) if predicted else None
            if ticket is not None and not ticket.need.same_sources(need):
                self.stats["stale"] += 1
                ticket = None
            if ticket is None:
                self.stats["misses"] += 1
                transport = self._transport(need)
                ticket = _Ticket(layer, need, transport.start(need), 0)
            else:
                self.stats["hits"] += 1
            self._issue_ahead()  # the next layers' copies go out before this one is waited on
            return self._transport(need).finish(ticket.handle, ticket.need)

    def close(self) -> None:
        self.drop()
        for t in self.transports.values():
            t.close()
        self.transports.clear()


def default_transport(device: Any) -> Any:
    import torch

    if torch.device(device).type == "cuda":
        return CudaTransport(device)
    return ThreadTransport()


class _PinnedSlab:
    """Page-locked host memory of exactly nbytes: a plain CPU tensor registered with CUDA (torch's
    pinned allocator would round the size up to a power of two). Unregistered when collected."""

    def __init__(self, nbytes: int):
        import torch

        self.tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        self.staging = False  # a reusable staging buffer (disk reads), not a layer's own weights
        self.registered = False
        # portable: pinned for every device's context, whichever device this thread has current
        # (disk staging slabs are registered on reader threads)
        err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.tensor.numel(), _HOST_REGISTER_PORTABLE)
        self.registered = int(err) == 0  # unregistered memory still works, only without async copies
        if not self.registered:
            _clear_torch_cuda_error()

    def __del__(self) -> None:
        if getattr(self, "registered", False):
            # at interpreter shutdown torch (or its CUDA runtime) may already be gone: nothing to undo then
            with contextlib.suppress(Exception):
                import torch

                torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())


def slab_layout(tensors: list) -> tuple[list[int], int]:
    """Offsets of the tensors packed one after another (each aligned), and the total bytes."""
    offsets, size = [], 0
    for t in tensors:
        offsets.append(size)
        size += (t.numel() * t.element_size() + _ALIGN - 1) // _ALIGN * _ALIGN
    return offsets, size


def pack_into_slab(tensors: list) -> tuple[Any, list]:
    """One pinned slab holding copies of the CPU tensors, and views of it shaped as they are."""

    offsets, size = slab_layout(tensors)
    slab = _PinnedSlab(size)
    views = []
    for t, off in zip(tensors, offsets):
        n = t.numel() * t.element_size()
        v = slab.tensor[off : off + n].view(t.dtype).view(t.shape)
        v.copy_(t)
        views.append(v)
    return slab, views


class CudaTransport:
    """Copies on a CUDA copy stream from pinned slabs, events for ordering, casts on the GPU."""

    def __init__(self, device: Any):
        import torch

        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self.readers = ThreadPoolExecutor(2, thread_name_prefix="diffsynth_c-vram-disk")
        self.lock = threading.Lock()
        self.retired: list = []  # (event, slab): host memory a copy may still be reading
        self.staging: list = []  # pinned slabs free for the next disk read

    def _upload(self, slab: _PinnedSlab, nbytes: int, layout: list) -> tuple[Any, Any, list]:
        """Starts the copy of the first nbytes of a pinned slab; returns (device buffer, event,
        layout). The slab stays referenced until the copy has ended."""
        import torch

        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            dev.copy_(slab.tensor[:nbytes], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        with self.lock:
            self.retired.append((event, slab))
        return dev, event, layout

    def _recycle(self) -> None:
        """Slabs whose copies have ended: staging ones go back to the free list."""
        with self.lock:
            busy = []
            for event, slab in self.retired:
                if not event.query():
                    busy.append((event, slab))
                elif slab.staging and len(self.staging) < 4:
                    self.staging.append(slab)
            self.retired = busy

    def _staging_slab(self, nbytes: int) -> _PinnedSlab:
        with self.lock:
            fits = [s for s in self.staging if s.tensor.numel() >= nbytes]
            if fits:
                slab = min(fits, key=lambda s: s.tensor.numel())
                self.staging.remove(slab)
                return slab
        slab = _PinnedSlab(nbytes)
        slab.staging = True
        return slab

    def _stage_from_disk(self, need: Need) -> tuple[Any, Any, list]:
        """On a reader thread: the layer's tensors read into a pinned staging slab (page cache to
        pinned memory, one copy), then its upload started."""
        tensors = [
            s.detach().cpu() if s is not None else read_stored(need.disk_map, k)
            for s, k in zip(need.sources, need.keys)
        ]
        offsets, size = slab_layout(tensors)
        slab = self._staging_slab(size)
        layout = []
        for t, off in zip(tensors, offsets):
            n = t.numel() * t.element_size()
            slab.tensor[off : off + n].view(t.dtype).view(t.shape).copy_(t)
            layout.append((off, t.dtype, tuple(t.shape)))
        return self._upload(slab, size, layout)

    def start(self, need: Need) -> Any:
        self._recycle()
        if any(s is None or s.device.type != "cpu" for s in need.sources):
            return self.readers.submit(_without_grad, self._stage_from_disk, _detached(need))
        slab, size, layout = _resident_slab(need)
        done: Future = Future()
        done.set_result(self._upload(slab, size, layout))
        return done

    def finish(self, handle: Future, need: Need) -> dict:
        import torch

        from ..dlpack import safetensors_name_of
        from ..kernels import KERNEL_DTYPES, cast, cuda_available

        dev, event, layout = handle.result()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)  # the compute stream waits on the GPU; the host goes on
        dev.record_stream(current)  # the allocator recycles the buffer only after this stream used it
        out = {}
        for name, (off, dtype, shape), want in zip(need.names, layout, need.dtypes):
            n = 1
            for d in shape:
                n *= d
            raw = dev[off : off + n * torch.empty((), dtype=dtype).element_size()].view(dtype).view(shape)
            if want is None or want == dtype:
                out[name] = raw
            elif cuda_available() and {safetensors_name_of(dtype), safetensors_name_of(want)} <= set(KERNEL_DTYPES):
                out[name] = cast(raw, torch.empty(shape, dtype=want, device=self.device))
            else:
                out[name] = raw.to(want)
        return out

    def close(self) -> None:
        # a reader in the middle of a layer finishes its upload; then no copy may still read a slab
        # when the slabs are dropped (and unregistered, and freed)
        self.readers.shutdown(wait=True, cancel_futures=True)
        with self.lock:
            retired, self.retired = self.retired, []
            self.staging.clear()
        for event, _slab in retired:
            event.synchronize()


def _resident_slab(need: Need) -> tuple[_PinnedSlab, int, list]:
    """The pinned slab holding a layer's resident CPU weights, its size and layout. The first time,
    the weights are copied into one slab and the layer's tensors are pointed at it (same values,
    one copy in host memory); later fetches find them there."""
    holder = getattr(need.sources[0], "_diffsynth_c_slab", None)
    if holder is not None and all(
        getattr(s, "_diffsynth_c_slab", None) is holder and s.data_ptr() == holder[0].tensor.data_ptr() + off
        for s, off in zip(need.sources, holder[1])
    ):  # still the slab's views (a move to another device and back would have replaced them)
        slab, offsets, size = holder
        return slab, size, [(off, s.dtype, tuple(s.shape)) for off, s in zip(offsets, need.sources)]
    slab, views = pack_into_slab([s.detach() for s in need.sources])
    offsets, size = slab_layout(views)
    holder = (slab, offsets, size)
    for s, v in zip(need.sources, views):
        s.data = v  # keeps the Parameter (and its _version); its storage is now the slab
        s._diffsynth_c_slab = holder
    need.versions = [s._version for s in need.sources]
    return slab, size, [(off, v.dtype, tuple(v.shape)) for off, v in zip(offsets, views)]
