"""Loading under ``torch.distributed``: each rank reads its share of the bytes, the process group
does the rest.

``load_state_dict(paths, ..., process_group=pg)`` gives every rank of pg the full, bit-identical
state dict while each byte of the files is read from disk once:

1. **Plan** (the same on every rank, from the safetensors headers alone): the tensors the merged
   dict keeps, in file order, are cut into contiguous runs of about equal bytes, one run per
   reader rank; each run into buckets of at most ``bucket_mib`` MiB (a larger tensor is a bucket
   of its own). Readers are all ranks, or, with ``node_local=True``, one rank per host (the
   lowest), for network file systems where every rank hitting the files hurts. The C planner
   lays this out (``_core.plan_buffers``, csrc/plan.c), in integer arithmetic.
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

last_load_stats: dict = {}
_NO_BUFFER = bytearray()  # in read_into's buffer list for the buckets other ranks read


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


def plan(paths: list, readers: int, bucket_bytes: int) -> Any:
    """The BufferPlan (``_core.plan_buffers``) of a distributed load: the merged dict's tensors (a
    later file's tensor of a name wins, at the name's first place) in buckets, each filled by one
    reader. Deterministic from the headers, so every rank computes the same plan."""
    # ALIGN_HOST (64): buckets are our own torch.empty CPU buffers, as plan_load's conversion buffers
    return _core.plan_buffers(
        paths, _core.ALIGN_HOST, "buckets", merge=True, readers=readers, bucket_bytes=bucket_bytes
    )


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
    readers = _readers(group, size, node_local)
    layout, error = None, None
    try:
        layout = plan(paths, len(readers), max(1, bucket_mib) << 20)
    except (OSError, ValueError) as e:
        error = str(e)
    agree(group, rank, error, "reading the headers")
    digest = hashlib.sha256(
        repr(([tuple(t) for t in layout.tensors], [tuple(b) for b in layout.buffers])).encode()
    ).hexdigest()
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
        mine = [bi for bi, b in enumerate(layout.buffers) if b.reader == me]
        for bi in mine:
            buffers[bi] = torch.empty(max(layout.buffers[bi].nbytes, 1), dtype=torch.uint8)
        items = [t for t in layout.tensors if t.nbytes and t.buffer in buffers]
        # one call for every bucket of this rank: the reads of all of them spread over the threads
        if items:
            dests = [buffers.get(bi, _NO_BUFFER) for bi in range(len(layout.buffers))]
            _core.read_into(paths, dests, items, threads())
        read_bytes = sum(t.nbytes for t in items)
        if target.type != "cpu":
            for bi in mine:
                buffers[bi] = buffers[bi].to(target)
    except (OSError, ValueError, RuntimeError) as e:
        error = f"{e}"
    agree(group, rank, error, "reading")
    for bi, b in enumerate(layout.buffers):
        buf = buffers.get(bi)
        if buf is None:
            buf = buffers[bi] = torch.empty(max(b.nbytes, 1), dtype=torch.uint8, device=target)
        dist.broadcast(buf, src=_global(group, readers[b.reader]), group=group)
    result: dict[str, Any] = {}
    for t in layout.tensors:
        raw = buffers[t.buffer][t.buffer_offset : t.buffer_offset + t.nbytes]
        x = view_bytes(raw, t.dtype, t.shape, displays[t.file], t.key)
        if torch_dtype is not None and x.dtype != torch_dtype:
            x = x.to(torch_dtype)
        result[t.key] = x
    last_load_stats.clear()
    last_load_stats.update(
        rank=rank,
        readers=len(readers),
        bytes_read=read_bytes,
        buckets=len(layout.buffers),
        total_bytes=sum(b.nbytes for b in layout.buffers),
    )
    return result
