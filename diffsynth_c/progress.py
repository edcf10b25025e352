"""Progress bars of long loads, saves, conversions and downloads: one mechanism for all of them.

A bar is shown when someone can see it: stderr is a terminal, or we run inside a Jupyter kernel.
``DIFFSYNTH_C_PROGRESS=1`` forces bars on (any size, any stream), ``=0`` turns them off. The bar is
tqdm's when tqdm can be imported (its notebook widget in Jupyter when ipywidgets is there), and
otherwise one line of text rewritten with ``\\r``. Everything counts bytes.

Callers report progress between C calls (after a file, a shard, or when the C download loop calls
back, about every 100 ms), never per tensor, so a load pays nothing on its hot path; with bars off a
``Progress`` is a few attribute writes, and tqdm is imported only when a bar is really drawn.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # only read by type checkers: annotations are not evaluated at run time (PEP 563)
    from typing_extensions import Self

ENV = "DIFFSYNTH_C_PROGRESS"
LOAD_MIN_BYTES = 256 << 20  # loads and saves smaller than this finish before a bar is worth drawing
DELAY_S = 0.5  # an unforced bar appears only once its work has lasted this long


def forced() -> bool | None:
    """True or False when DIFFSYNTH_C_PROGRESS says so ("1" / "0"), None when it says nothing."""
    return {"1": True, "0": False}.get(os.environ.get(ENV, ""))


def in_jupyter() -> bool:
    """Whether this process is a Jupyter (IPython) kernel. IPython is only looked at when already
    imported: a plain script never pays for importing it."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 - an odd IPython is not worth a failed load
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def wanted(total: int, min_total: int = 0, stream: TextIO | None = None) -> bool:
    """Whether a bar for total bytes should be drawn: forced by the environment, or total reaches
    min_total and stderr (or stream) is a terminal or a notebook is running."""
    flag = forced()
    if flag is not None:
        return flag
    if total < min_total:
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        if stream is not None and stream.isatty():
            return True
    except (AttributeError, ValueError, OSError):  # a closed or replaced stream
        pass
    return in_jupyter()


def _tqdm_class() -> Any:
    """tqdm's class for this process (the notebook widget in a kernel with ipywidgets), or None
    when tqdm cannot be imported."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    if in_jupyter():
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm
        except ImportError:
            pass
    return tqdm


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


class _TextBar:
    """The fallback without tqdm: "label: done/total MiB  speed MiB/s  ETA s" on one line of stderr,
    redrawn at most twice a second."""

    def __init__(self, total: int, label: str, delay: float, stream: TextIO) -> None:
        self.total, self.label, self.delay, self.stream = total, label, delay, stream
        self.t0 = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def draw(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and (now - self.last < 0.5 or now - self.t0 < self.delay):
            return
        if final and not self.drawn and now - self.t0 < self.delay:
            return  # finished before the bar was due: nothing to erase, nothing to print
        self.last, self.drawn = now, True
        speed = done / max(now - self.t0, 1e-6)
        eta = (self.total - done) / speed if speed > 0 else float("inf")
        self.stream.write(
            f"\r{self.label}: {_mib(done)}/{_mib(self.total)} MiB  {speed / 2**20:,.1f} MiB/s  ETA {eta:,.0f} s   "
        )
        if final:
            self.stream.write("\n")
        self.stream.flush()

    def close(self, done: int) -> None:
        self.draw(done, final=True)


class Progress:
    """A byte counter with a bar: ``update(n)`` adds n bytes, ``set(done)`` places the count,
    ``close()`` (or leaving the ``with`` block) ends the line. Silent unless ``wanted`` says a bar
    should be drawn; min_total is the size below which an unforced bar is not worth it."""

    def __init__(self, total: int, label: str, min_total: int = 0, stream: TextIO | None = None) -> None:
        self.total, self.label, self.done = int(total), label, 0
        self.on = wanted(self.total, min_total, stream)
        self._bar: Any = None
        self._text: _TextBar | None = None
        if not self.on:
            return
        out = stream if stream is not None else sys.stderr
        delay = 0.0 if forced() else DELAY_S
        cls = _tqdm_class()
        if cls is None:
            self._text = _TextBar(self.total, label, delay, out)
        else:
            self._bar = cls(
                total=self.total,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=out,
                delay=delay,
                leave=True,
            )

    def set(self, done: int) -> None:
        """Places the count at done bytes (it may go back, e.g. when a download restarts a file)."""
        self.update(int(done) - self.done)

    def update(self, n: int) -> None:
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(int(n))
        elif self._text is not None:
            self._text.draw(self.done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._text is not None:
            self._text.close(self.done)
            self._text = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
