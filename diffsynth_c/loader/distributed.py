"""Loading under ``torch.distributed``: each rank reads its share of the bytes, the process group
does the rest.

``load_state_dict(paths, ..., process_group=pg)`` gives every rank of pg the full, bit-identical
state dict while each byte of the files is read from disk once:

1. **Plan** (the same on every rank, from the safetensors headers alone): the tensors the merged
   dict keeps, in file order, are cut into contiguous runs of about equal bytes, one run per
   reader rank; each run into buckets of at most ``bucket_mib`` MiB (a larger tensor is a bucket
   of its own). Readers are all ranks, or, with ``node_local=True``, one rank per host (the
   lowest), for network file systems where every rank hitting the files hurts.
2. **Agree**: every rank reports whether it could read the headers, with a digest of its plan;
   one failure (a file missing on one node) makes every rank raise, naming the rank and the
   file, before any exchange starts.
3. **Read**: each reader reads its buckets with the C reader (threads, GIL released) straight into
   the buffers the tensors will live in; the ranks agree again on success.
4. **Exchange**: each bucket is broadcast from its reader (gloo on CPU tensors, NCCL on CUDA
   tensors); receivers allocate the bucket and receive into it. Tensors are views of their
   bucket; ``torch_dtype`` is applied after the exchange, so the wire carries the file's bytes.

Memory beyond the result: none for buckets (they are the result's storage), plus a dtype
conversion's output. The collectives use the process group's own timeout. torch.save checkpoints
in the list are read by every rank (their storages can be shared between tensors).
``last_load_stats`` holds what the last call read on this rank (for tests and benchmarks).
"""

from __future__ import annotations

import hashlib
import socket
from typing import Any

from .. import _core
from ..core.settings import threads
from ..dlpack import view_bytes

_ALIGN = 64
last_load_stats: dict = {}


def _rank_and_size(group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def _global(group: Any, group_rank: int) -> int:
    import torch.distributed as dist

    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def all_ranks(group: Any, value: Any) -> list:
    """value from every rank of group (a picklable object), in rank order."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def agree(group: Any, rank: int, error: str | None, what: str) -> None:
    """Raises on every rank when one rank failed, naming the ranks and their errors."""
    errors = all_ranks(group, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise RuntimeError(f"distributed load failed while {what} ({detail})")


def plan(headers: list[tuple[int, list]], readers: int, bucket_bytes: int) -> tuple[list, list]:
    """(order, buckets): order lists (key, file index, bucket index, offset in bucket, nbytes, dtype, shape) in the
    merged dict's key order; buckets lists (reader index, size, items) with items (file index,
    absolute offset, nbytes, dtype, offset in bucket, key). Deterministic from the headers."""
    winner: dict[str, tuple[int, tuple]] = {}
    first_seen: list[str] = []
    for fi, (data_start, tensors) in enumerate(headers):
        for entry in tensors:
            name = entry[0]
            if name not in winner:
                first_seen.append(name)
            winner[name] = (fi, (data_start,) + tuple(entry))
    runs = [(name, winner[name]) for name in first_seen]
    total = sum(ent[5] - ent[4] for _, (_, ent) in runs)
    buckets: list = []
    placed: dict[str, tuple[int, int]] = {}
    current: dict[int, int] = {}  # reader -> open bucket index
    done = 0
    for name, (fi, (data_start, _name, dtype, shape, begin, end)) in runs:
        nbytes = end - begin
        reader = min(readers - 1, int((done + nbytes / 2) * readers // total)) if total else 0
        done += nbytes
        b = current.get(reader)
        if b is None or (buckets[b][1] and buckets[b][1] + nbytes > bucket_bytes):
            buckets.append([reader, 0, []])
            b = current[reader] = len(buckets) - 1
        off = buckets[b][1]
        buckets[b][2].append((fi, data_start + begin, nbytes, dtype, off, name))
        buckets[b][1] = off + (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        placed[name] = (b, off)
    order = [
        (name, fi, placed[name][0], placed[name][1], ent[5] - ent[4], ent[2], tuple(ent[3])) for name, (fi, ent) in runs
    ]
    return order, buckets


def _readers(group: Any, size: int, node_local: bool) -> list[int]:
    """Group ranks that read: all, or the lowest rank of each host."""
    if not node_local:
        return list(range(size))
    hosts = all_ranks(group, socket.gethostname())
    first: dict[str, int] = {}
    for r, h in enumerate(hosts):
        first.setdefault(h, r)
    return sorted(first.values())


def load_safetensors_distributed(
    paths: list,
    displays: list[str],
    torch_dtype: Any,
    device: Any,
    group: Any,
    node_local: bool = False,
    bucket_mib: int = 256,
) -> dict:
    """The merged state dict of the safetensors files, read once across the group (see above)."""
    import torch
    import torch.distributed as dist

    rank, size = _rank_and_size(group)
    headers, error = [], None
    try:
        for p in paths:
            _hl, data_start, tensors, _meta = _core.read_header(p)
            headers.append((data_start, [(n, d, tuple(s), b, e) for n, d, s, b, e in tensors]))
    except (OSError, ValueError) as e:
        error = str(e)
    agree(group, rank, error, "reading the headers")
    readers = _readers(group, size, node_local)
    order, buckets = plan(headers, len(readers), max(1, bucket_mib) << 20)
    digest = hashlib.sha256(repr((order, [(b[0], b[1]) for b in buckets])).encode()).hexdigest()
    digests = all_ranks(group, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(
            "distributed load: the ranks see different files (their plans differ: "
            + ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
            + ")"
        )
    me = readers.index(rank) if rank in readers else None
    target = torch.device(device)
    buffers: dict[int, Any] = {}
    read_bytes, error = 0, None
    try:
        for bi, (reader, nbytes, items) in enumerate(buckets):
            if reader != me:
                continue
            host = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            base = host.data_ptr()
            _core.read_into(
                paths, [(fi, off, n, dt, dt, base + boff, key) for fi, off, n, dt, boff, key in items if n], threads()
            )
            read_bytes += sum(n for _, _, n, _, _, _ in items)
            buffers[bi] = host if target.type == "cpu" else host.to(target)
    except (OSError, ValueError, RuntimeError) as e:
        error = f"{e}"
    agree(group, rank, error, "reading")
    for bi, (reader, nbytes, _items) in enumerate(buckets):
        buf = buffers.get(bi)
        if buf is None:
            buf = buffers[bi] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=target)
        dist.broadcast(buf, src=_global(group, readers[reader]), group=group)
    result: dict[str, Any] = {}
    for name, fi, bi, off, nbytes, dtype, shape in order:
        x = view_bytes(buffers[bi][off : off + nbytes], dtype, shape, displays[fi], name)
        if torch_dtype is not None and x.dtype != torch_dtype:
            x = x.to(torch_dtype)
        result[name] = x
    last_load_stats.clear()
    last_load_stats.update(
        rank=rank,
        readers=len(readers),
        bytes_read=read_bytes,
        buckets=len(buckets),
        total_bytes=sum(b[1] for b in buckets),
    )
    return result
