"""The environment settings every load reads (one place, so every path reads them alike)."""

from __future__ import annotations

import os

from .. import _core


def threads(per_cpu: int = 2) -> int:
    """Worker threads: DIFFSYNTH_C_THREADS, else per_cpu per CPU, between 4 and 16. Two per CPU for
    reads that may wait on the disk (more threads than cores keep it busy); one per CPU for copies
    that only use the CPU (page cache into pinned memory)."""
    env = os.environ.get("DIFFSYNTH_C_THREADS")
    if env:
        return max(1, int(env))
    return min(16, max(4, per_cpu * _core.build_info()["cpu_count"]))


def mode() -> str:
    """'mmap' (default: private mappings, pages read in by the workers) or 'read' (pread into
    anonymous memory: tensors never depend on the file again), from DIFFSYNTH_C_LOAD_MODE."""
    value = os.environ.get("DIFFSYNTH_C_LOAD_MODE", "mmap")
    if value not in ("mmap", "read"):
        raise ValueError(f"DIFFSYNTH_C_LOAD_MODE must be 'mmap' or 'read', not {value!r}")
    return value
