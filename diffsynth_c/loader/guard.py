"""Truncated files become a Python exception, not a SIGBUS.

Tensors a ``DiskMap`` hands out are views of private file mappings: until written, their pages are
the file's page-cache pages. If the file is truncated while they are alive, the kernel drops those
pages and the next touch would kill the process with SIGBUS. (A load's own mappings hold a read
lease and are copied before their file changes: csrc/lease.c; the guard is their last line.) The C
core guards every mapping it makes (csrc/guard.c, any number of them): the faulting page is
replaced by zeros, so the instruction that touched it completes, and Python's SIGBUS handler,
installed here, raises ``FormatError`` naming the file at the next bytecode boundary of the main
thread (right after the torch operation that touched the page, when the main thread touched it;
a fault on another thread leaves that thread with the zeros). A SIGBUS outside our mappings keeps
its default action. ``DIFFSYNTH_C_SIGBUS_GUARD=0`` leaves SIGBUS alone; loading with
``DIFFSYNTH_C_LOAD_MODE=read`` makes tensors independent of their files altogether.
"""

from __future__ import annotations

import os
import signal
import threading

from .. import _core

_installed = False


def _on_truncated(signum: int, frame: object) -> None:
    files = _core.guard_faults()
    names = ", ".join(files) if files else "a mapped model file"
    raise _core.FormatError(
        f"{names}: the file was truncated while tensors still mapped it; the pages past its new end read as "
        "zeros (load with DIFFSYNTH_C_LOAD_MODE=read to keep tensors independent of their files)"
    )


def install() -> bool:
    """Installs the guard (once; Python's part only from the main thread). Returns whether the
    Python exception is wired (False: the C guard alone, zeros without an exception)."""
    global _installed
    if _installed or os.environ.get("DIFFSYNTH_C_SIGBUS_GUARD", "1") == "0":
        return _installed
    on_main = threading.current_thread() is threading.main_thread()
    if on_main:
        signal.signal(signal.SIGBUS, _on_truncated)  # Python's C handler first, then ours over it
    _core.guard_install(on_main)
    _installed = on_main
    return _installed
