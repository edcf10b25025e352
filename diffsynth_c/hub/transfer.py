"""The transfers: files fetched in parallel ranges by the C core (``_core.fetch``), resumed from
partial files, sealed (fsync, SHA-256, size) and renamed into place (``download_files``)."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

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


def download_files(
    folder: str, files: list[RemoteFile], headers: list[str], what: str, connections: int | None = None
) -> None:
    """Downloads files into folder (by their paths), in parallel, resuming partial files; each
    is verified (size, SHA-256) under a temporary name and then renamed into place."""
    connections = connections or int(os.environ.get("DIFFSYNTH_C_DOWNLOAD_CONNECTIONS", "16"))
    retries = int(os.environ.get("DIFFSYNTH_C_DOWNLOAD_RETRIES", "5"))
    stall = float(os.environ.get("DIFFSYNTH_C_DOWNLOAD_STALL", "30"))
    todo = {f.path: HASH_RETRIES for f in files}
    by_path = {f.path: f for f in files}
    progress = _Progress(sum(f.size for f in files), what)
    step = range_size(sum(f.size for f in files), connections)
    landed = 0  # bytes of the files already renamed into place: the bar's floor in later rounds
    while todo:
        plan, fds = [], {}
        early: dict = {}  # rel -> the Future of its _seal, started while other files transferred
        sealer = ThreadPoolExecutor(max_workers=4)  # fsync and hashlib release the GIL
        try:
            for rel in todo:
                f = by_path[rel]
                dest = os.path.join(folder, rel)
                part = os.path.join(folder, PARTIAL, rel) + ".incomplete"
                try:
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    os.makedirs(os.path.dirname(part), exist_ok=True)
                    ranges = _load_part(part, f, step)
                    fds[rel] = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
                except OSError as e:
                    raise DownloadError(f"{what}: cannot write {rel} under {folder}: {e.strerror}") from e
                progress.base += sum(r[2] for r in ranges)
                plan.append((rel, part, ranges))
            jobs = [(by_path[rel].url, fds[rel], a, b, d) for rel, _, ranges in plan for a, b, d in ranges]
            owner = [(rel, part) for rel, part, ranges in plan for _ in ranges]  # job index -> its file
            left = Counter(rel for rel, _ in owner)
            results: list = []

            def seal_early(
                finished: tuple,
                *,
                owner: list = owner,
                left: Counter = left,
                fds: dict = fds,
                early: dict = early,
                sealer: ThreadPoolExecutor = sealer,
            ) -> None:
                """A file whose ranges have all arrived is sealed (fsync, SHA-256) on the sealer's
                threads while the other files still transfer; the others when the transfer ends.
                This round's state is bound as defaults: the closure must not see a later round's."""
                for j in finished:
                    rel, part = owner[j]
                    left[rel] -= 1
                    if left[rel] == 0 and rel in fds:
                        f = by_path[rel]
                        early[rel] = sealer.submit(_seal, fds.pop(rel), part, f)

            progress.on_finished = seal_early
            try:
                if jobs:
                    _core.fetch(jobs, headers, connections, retries, stall, progress, results)
            except BaseException as e:
                # Ctrl-C or a failed write: keep what arrived, resumable by the next call (a file
                # being sealed is complete: it is sealed again, and renamed, by the next call).
                for fut in early.values():
                    fut.exception()  # waits; its fd is closed either way
                k = 0
                for rel, part, ranges in plan:
                    for r in ranges:
                        if k < len(results):
                            r[2] = results[k][0]
                        k += 1
                    _save_part(part, by_path[rel], ranges)
                if not isinstance(e, OSError):
                    raise
                names = ", ".join(rel for rel, _, _ in plan)
                raise DownloadError(f"{what}: cannot write {names} under {folder}: {e.strerror or e}") from e
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            sealer.shutdown(wait=True)
            raise
        finally:
            progress.on_finished = None
        # Settle each file: all ranges done -> verify and rename; else report.
        i = 0
        failures: list[str] = []
        complete: list = []
        for rel, part, ranges in plan:
            f = by_path[rel]
            res = results[i : i + len(ranges)]
            i += len(ranges)
            for r, (done, *_rest) in zip(ranges, res):
                r[2] = done
            if rel in early:  # every range arrived, and it is being sealed already
                complete.append((rel, part, None, f))
                continue
            fd = fds.pop(rel)
            bad = [x for x in res if not x[1]]
            if any(x[3] for x in bad):  # the server ignores Range: one whole-file request
                os.close(fd)
                _discard(part)
                with open(part + ".json", "w", encoding="utf-8") as fh:
                    json.dump({**manifest_entry(f), "ranges": [[0, f.size, 0]]}, fh)
                todo[rel] -= 1
                if todo[rel] <= 0:
                    failures.append(f"{rel}: the server ignores Range")
                continue
            if bad:
                os.close(fd)
                _save_part(part, f, ranges)
                failures.append(f"{rel}: {bad[0][5]} after {bad[0][4]} attempts")
                todo.pop(rel)
                continue
            complete.append((rel, part, fd, f))
        # Seal the other complete files on the same threads.
        try:
            futures = [
                early[rel] if rel in early else sealer.submit(_seal, fd, part, f) for rel, part, fd, f in complete
            ]
            sealed = [fut.result() for fut in futures]
        finally:
            sealer.shutdown(wait=True)
        for (rel, part, _, f), got in zip(complete, sealed):
            if os.path.getsize(part) != f.size or got:
                _discard(part)
                todo[rel] -= 1
                if todo[rel] <= 0:
                    failures.append(
                        f"{rel}: {got or 'the size differs from the listing'} after {HASH_RETRIES} downloads"
                    )
                    todo.pop(rel)
                continue
            os.replace(part, os.path.join(folder, rel))
            _discard(part)
            todo.pop(rel)
            landed += f.size
        progress.base = landed
        if failures:
            progress.close()
            raise DownloadError(f"{what}: " + "; ".join(failures))
    progress.close()
