"""The transfers: files fetched in parallel ranges by the C core (``_core.fetch``), resumed from
partial files, sealed (fsync, SHA-256, size) and renamed into place (``download_files``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from .. import _core
from ..progress import Progress
from .hubs import DownloadError, RemoteFile
from .manifest import hash_mismatch, manifest_entry

PARTIAL = os.path.join(".cache", "diffsynth_c", "partial")  # partial files, out of the glob's sight
RANGE_MIN, RANGE_MAX = 16 << 20, 64 << 20  # bounds of the ranges large files are split into
HASH_RETRIES = 3


class _Progress:
    """The bar of a download (diffsynth_c/progress.py), shaped as _core.fetch calls it: with the
    bytes fetched so far in this round, to which base adds what was already on disk, and the jobs
    finished since the last call, which go to on_finished."""

    def __init__(self, total: int, label: str) -> None:
        self.bar = Progress(total, label, min_total=8 << 20)
        self.base = 0
        self.on_finished: Callable[[tuple], None] | None = None

    def __call__(self, done: int, finished: tuple = ()) -> None:
        self.bar.set(self.base + done)
        if finished and self.on_finished is not None:
            self.on_finished(finished)

    def close(self) -> None:
        self.bar.close()


def _seal(fd: int, part: str, f: RemoteFile) -> str | None:
    """Cuts the partial file to its size, makes it durable and closes it; then what differs from
    the hub's hashes, or None."""
    try:
        os.ftruncate(fd, f.size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return hash_mismatch(part, f.sha256, f.blob)


def range_size(total: int, connections: int) -> int:
    """Two ranges a connection for the whole download, within [RANGE_MIN, RANGE_MAX]: enough
    ranges that every connection stays busy to the end, few enough that requests stay cheap."""
    return max(RANGE_MIN, min(RANGE_MAX, total // (2 * connections)))


def _ranges(size: int, step: int) -> list[list[int]]:
    if size <= 2 * step:
        return [[0, size, 0]]
    return [[s, min(s + step, size), 0] for s in range(0, size, step)]


def _load_part(part: str, f: RemoteFile, step: int) -> list[list[int]]:
    """The ranges of a partial file and how much of each is on disk; fresh ranges when the
    partial file belongs to another version."""
    try:
        with open(part + ".json", encoding="utf-8") as fh:
            state = json.load(fh)
        if manifest_entry(f) == {k: state.get(k) for k in ("size", "sha256", "blob")} and os.path.exists(part):
            return [[int(a), int(b), int(d)] for a, b, d in state["ranges"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return _ranges(f.size, step)


def _save_part(part: str, f: RemoteFile, ranges: list[list[int]]) -> None:
    try:
        with open(part + ".json", "w", encoding="utf-8") as fh:
            json.dump({**manifest_entry(f), "ranges": ranges}, fh)
    except OSError:
        pass


def _discard(part: str) -> None:
    for p in (part, part + ".json"):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


class _Pending:
    """One file of a round: its partial file, its ranges ([start, end, bytes on disk]), the open
    descriptor until the sealer takes it, and the seal started early (a Future) once every range
    arrived."""

    def __init__(self, file: RemoteFile, part: str, ranges: list[list[int]], fd: int) -> None:
        self.file, self.part, self.ranges, self.fd = file, part, ranges, fd
        self.ranges_left = len(ranges)
        self.sealing: Future | None = None


class _Round:
    """One transfer round of a Download: the files still to do, opened; the fetch jobs (one per
    range, job j belonging to owner[j]); what _core.fetch reported per job; the sealer threads."""

    def __init__(self, download: Download) -> None:
        self.d = download
        self.pending: list[_Pending] = []
        self.owner: list[_Pending] = []
        self.results: list = []
        self.sealer = ThreadPoolExecutor(max_workers=4)  # fsync and hashlib release the GIL

    def open(self) -> None:
        """Opens (or resumes) the partial file of every file still to do."""
        d = self.d
        for rel in d.tries:
            f = d.by_path[rel]
            dest = os.path.join(d.folder, rel)
            part = os.path.join(d.folder, PARTIAL, rel) + ".incomplete"
            try:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.makedirs(os.path.dirname(part), exist_ok=True)
                ranges = _load_part(part, f, d.step)
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise DownloadError(f"{d.what}: cannot write {rel} under {d.folder}: {e.strerror}") from e
            d.progress.base += sum(r[2] for r in ranges)
            self.pending.append(_Pending(f, part, ranges, fd))
        self.owner = [p for p in self.pending for _ in p.ranges]

    def seal_early(self, finished: tuple) -> None:
        """A file whose ranges have all arrived is sealed (fsync, SHA-256) on the sealer's threads
        while the other files still transfer; the others when the transfer ends."""
        for j in finished:
            p = self.owner[j]
            p.ranges_left -= 1
            if p.ranges_left == 0 and p.fd is not None:
                fd, p.fd = p.fd, None
                p.sealing = self.sealer.submit(_seal, fd, p.part, p.file)

    def transfer(self) -> None:
        """Fetches every range. Ctrl-C or a failed write keeps what arrived, resumable by the next
        call (a file being sealed is complete: it is sealed again, and renamed, by the next call)."""
        d = self.d
        jobs = [(p.file.url, p.fd, a, b, done) for p in self.pending for a, b, done in p.ranges]
        d.progress.on_finished = self.seal_early
        try:
            if jobs:
                _core.fetch(jobs, d.headers, d.connections, d.retries, d.stall, d.progress, self.results)
        except BaseException as e:
            for p in self.pending:
                if p.sealing is not None:
                    p.sealing.exception()  # waits; its fd is closed either way
            k = 0
            for p in self.pending:
                for r in p.ranges:
                    if k < len(self.results):
                        r[2] = self.results[k][0]
                    k += 1
                _save_part(p.part, p.file, p.ranges)
            if not isinstance(e, OSError):
                raise
            names = ", ".join(p.file.path for p in self.pending)
            raise DownloadError(f"{d.what}: cannot write {names} under {d.folder}: {e.strerror or e}") from e
        finally:
            d.progress.on_finished = None

    def settle(self) -> list[str]:
        """Each file: all ranges arrived -> sealed, verified and renamed into place; else its state
        saved for the next round or call. Returns the failures."""
        d = self.d
        failures: list[str] = []
        complete: list[_Pending] = []
        i = 0
        for p in self.pending:
            rel = p.file.path
            res = self.results[i : i + len(p.ranges)]
            i += len(p.ranges)
            for r, (done, *_rest) in zip(p.ranges, res):
                r[2] = done
            if p.sealing is not None:  # every range arrived, and it is being sealed already
                complete.append(p)
                continue
            bad = [x for x in res if not x[1]]
            if any(x[3] for x in bad):  # the server ignores Range: one whole-file request
                self.close(p)
                _discard(p.part)
                with open(p.part + ".json", "w", encoding="utf-8") as fh:
                    json.dump({**manifest_entry(p.file), "ranges": [[0, p.file.size, 0]]}, fh)
                d.tries[rel] -= 1
                if d.tries[rel] <= 0:
                    failures.append(f"{rel}: the server ignores Range")
                continue
            if bad:
                self.close(p)
                _save_part(p.part, p.file, p.ranges)
                failures.append(f"{rel}: {bad[0][5]} after {bad[0][4]} attempts")
                d.tries.pop(rel)
                continue
            fd, p.fd = p.fd, None
            p.sealing = self.sealer.submit(_seal, fd, p.part, p.file)
            complete.append(p)
        try:
            sealed = [p.sealing.result() for p in complete]
        finally:
            self.sealer.shutdown(wait=True)
        for p, got in zip(complete, sealed):
            rel = p.file.path
            if os.path.getsize(p.part) != p.file.size or got:
                _discard(p.part)
                d.tries[rel] -= 1
                if d.tries[rel] <= 0:
                    failures.append(
                        f"{rel}: {got or 'the size differs from the listing'} after {HASH_RETRIES} downloads"
                    )
                    d.tries.pop(rel)
                continue
            os.replace(p.part, os.path.join(d.folder, rel))
            _discard(p.part)
            d.tries.pop(rel)
            d.landed += p.file.size
        return failures

    def close(self, p: _Pending) -> None:
        if p.fd is not None:
            fd, p.fd = p.fd, None
            os.close(fd)

    def abandon(self) -> None:
        """After an exception: the descriptors the sealer did not take are closed, the sealer's
        work waited for."""
        for p in self.pending:
            self.close(p)
        self.sealer.shutdown(wait=True)


class Download:
    """One download_files call: rounds of transfers until every file has landed (verified and
    renamed into place) or one has run out of tries. tries: the files still to do, with how many
    whole-file downloads each may still take; landed: bytes renamed into place (the progress bar's
    floor in later rounds)."""

    def __init__(
        self, folder: str, files: list[RemoteFile], headers: list[str], what: str, connections: int | None = None
    ) -> None:
        self.folder, self.headers, self.what = folder, headers, what
        self.connections = connections or int(os.environ.get("DIFFSYNTH_C_DOWNLOAD_CONNECTIONS", "16"))
        self.retries = int(os.environ.get("DIFFSYNTH_C_DOWNLOAD_RETRIES", "5"))
        self.stall = float(os.environ.get("DIFFSYNTH_C_DOWNLOAD_STALL", "30"))
        self.by_path = {f.path: f for f in files}
        self.tries = {f.path: HASH_RETRIES for f in files}
        total = sum(f.size for f in files)
        self.progress = _Progress(total, what)
        self.step = range_size(total, self.connections)
        self.landed = 0

    def run(self) -> None:
        """Runs rounds until done; raises DownloadError naming each file that failed and why."""
        while self.tries:
            r = _Round(self)
            try:
                r.open()
                r.transfer()
            except BaseException:
                r.abandon()
                raise
            failures = r.settle()
            self.progress.base = self.landed
            if failures:
                self.progress.close()
                raise DownloadError(f"{self.what}: " + "; ".join(failures))
        self.progress.close()


def download_files(
    folder: str, files: list[RemoteFile], headers: list[str], what: str, connections: int | None = None
) -> None:
    """Downloads files into folder (by their paths), in parallel, resuming partial files; each
    is verified (size, SHA-256) under a temporary name and then renamed into place."""
    Download(folder, files, headers, what, connections).run()
