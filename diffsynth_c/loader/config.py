"""Mirrors ``diffsynth.core.loader.config``: ``ModelConfig`` and model downloads.

Same fields, environment variables, local layout (``{base}/{model_id}/{path in repo}``), pattern
semantics and resulting ``path`` as DiffSynth's class. The downloads are ours: the listing and
every byte go through libcurl in the C core (``_core.http_get``, ``_core.fetch``), several files
and several ranges of a large file at once, resumed from partial files, SHA-256 and size checked
before a file is renamed into place. A small manifest (``.cache/diffsynth_c/manifest.json`` in
the model folder) records what was verified, so a model that is complete costs no request.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import glob
import hashlib
import json
import os
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .. import _core
from ..progress import Progress

MANIFEST = os.path.join(".cache", "diffsynth_c", "manifest.json")
PARTIAL = os.path.join(".cache", "diffsynth_c", "partial")  # partial files, out of the glob's sight
LOCK = os.path.join(".cache", "diffsynth_c", "download.lock")  # held while a download writes the folder
RANGE_MIN, RANGE_MAX = 16 << 20, 64 << 20  # bounds of the ranges large files are split into
HASH_RETRIES = 3


class DownloadError(RuntimeError):
    """A model file could not be downloaded; the message names the model and the file."""


@dataclass
class RemoteFile:
    """One file of a repository listing."""

    path: str
    size: int
    sha256: str | None
    url: str
    blob: str | None = None  # git blob id (Hugging Face, files kept in git rather than LFS)


def _env_true(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {"true": True, "false": False}.get(value.lower())


def matches(path: str, pattern: str) -> bool:
    """DiffSynth's and the hubs' rule: fnmatch on the whole path in the repo, ``*`` crossing ``/``,
    a trailing ``/`` meaning everything below."""
    if pattern.endswith("/"):
        pattern += "*"
    return fnmatch.fnmatchcase(path, pattern)


# ---- the hubs ------------------------------------------------------------------------------


def _header_value(raw: bytes, name: str) -> str | None:
    for line in raw.decode("latin-1").split("\r\n"):
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == name.lower():
            return value.strip()
    return None


def _get_json(url: str, headers: list[str], what: str) -> tuple[Any, bytes]:
    """GETs a JSON reply, retrying connection errors, 429 and 5xx with backoff."""
    for attempt in range(5):
        try:
            status, _, raw_headers, body = _core.http_get(url, headers, 64 << 20)
        except ConnectionError:
            if attempt == 4:
                raise DownloadError(f"{what}: cannot reach {url}") from None
        else:
            if status == 200:
                try:
                    return json.loads(body), raw_headers
                except ValueError:
                    raise DownloadError(f"{what}: the reply of {url} is not JSON") from None
            if status == 404:
                code = _header_value(raw_headers, "X-Error-Code") or ""
                if "Revision" in code:
                    raise DownloadError(f"{what}: revision not found ({url})")
                raise DownloadError(f"{what}: model not found (HTTP 404 from {url})")
            if status in (401, 403):
                raise DownloadError(f"{what}: access denied (HTTP {status}); set the hub's token")
            if status != 429 and status < 500 or attempt == 4:
                raise DownloadError(f"{what}: HTTP {status} from {url}")
        time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


_MISSING = object()


def _field(obj: Any, name: str, kind: type, what: str, default: Any = _MISSING) -> Any:
    """obj[name] when obj is a JSON object and the value has the kind wanted; default when the
    value is absent or null (and a default is given); DownloadError otherwise."""
    value = obj.get(name) if isinstance(obj, dict) else None
    if value is None and default is not _MISSING:
        return default
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DownloadError(
            f"{what}: unexpected reply: {name!r} is {type(value).__name__}, not {kind.__name__}: {str(obj)[:200]}"
        )
    return value


def _remote_file(what: str, path: Any, size: Any, sha256: Any, url: str, blob: Any = None) -> RemoteFile:
    """A listing entry, checked: the hub's path becomes a path below the model folder, so it must
    be relative and stay inside it; the size is a byte count; a SHA-256 is 64 hex digits, a git
    blob id 40."""
    if not isinstance(path, str) or not path:
        raise DownloadError(f"{what}: a listing entry has no path: {path!r}")
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise DownloadError(f"{what}: the listing names {path!r}, which is not a plain path inside the repo")
    if isinstance(size, str) and size.isdigit():
        size = int(size)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise DownloadError(f"{what}: {path}: the listing gives the size {size!r}")
    if sha256 is not None:
        if not isinstance(sha256, str) or len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower()):
            raise DownloadError(f"{what}: {path}: the listing gives the hash {sha256!r}, not a SHA-256")
        sha256 = sha256.lower()
    if blob is not None:
        if not isinstance(blob, str) or len(blob) != 40 or any(c not in "0123456789abcdef" for c in blob.lower()):
            raise DownloadError(f"{what}: {path}: the listing gives the git blob id {blob!r}, not a SHA-1")
        blob = blob.lower()
    return RemoteFile(path, size, sha256, url, blob)


class ModelScope:
    """ModelScope's API: revisions, the recursive file list, files by path."""

    def __init__(self) -> None:
        endpoint = os.environ.get("MODELSCOPE_ENDPOINT")
        if not endpoint:
            endpoint = "https://" + os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
        self.endpoint = endpoint.rstrip("/")
        token = os.environ.get("MODELSCOPE_API_TOKEN")
        self.headers = [f"Authorization: Bearer {token}", f"Cookie: m_session_id={token}"] if token else []

    def listing(self, model_id: str, revision: str = "master") -> tuple[str, list[RemoteFile]]:
        """(commit, files) of the model's repository at revision; DownloadError naming the model."""
        api = f"{self.endpoint}/api/v1/models/{model_id}"
        what = f"model {model_id!r} (ModelScope)"
        revs, _ = _get_json(f"{api}/revisions", self.headers, what)
        rev_map = _field(_field(revs, "Data", dict, what, {}), "RevisionMap", dict, what, {})
        branches = _field(rev_map, "Branches", list, what, []) + _field(rev_map, "Tags", list, what, [])
        names = [r.get("Revision") for r in branches if isinstance(r, dict)]
        if names and revision not in names:
            raise DownloadError(f"{what}: revision {revision!r} not found")
        q = urllib.parse.urlencode({"Revision": revision, "Recursive": "True"})
        reply, _ = _get_json(f"{api}/repo/files?{q}", self.headers, what)
        if not isinstance(reply, dict) or reply.get("Code") != 200 or not isinstance(reply.get("Data"), dict):
            raise DownloadError(f"{what}: unexpected listing reply: {str(reply)[:200]}")
        files, commit = [], revision
        for f in _field(reply["Data"], "Files", list, what, []):
            if not isinstance(f, dict):
                raise DownloadError(f"{what}: a listing entry is not an object: {str(f)[:200]}")
            if f.get("Type") != "blob" or f.get("Path") in (".gitignore", ".gitattributes"):
                continue
            revision_of = f.get("Revision")
            commit = revision_of if isinstance(revision_of, str) and revision_of else commit
            q = urllib.parse.urlencode({"Revision": revision, "FilePath": str(f.get("Path"))})
            files.append(_remote_file(what, f.get("Path"), f.get("Size"), f.get("Sha256") or None, f"{api}/repo?{q}"))
        return commit, files


class HuggingFace:
    """Hugging Face's API: the revision's commit, the recursive tree (paged), files by commit."""

    def __init__(self) -> None:
        self.endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        token = os.environ.get("HF_TOKEN")
        self.headers = [f"Authorization: Bearer {token}"] if token else []

    def listing(self, model_id: str, revision: str = "main") -> tuple[str, list[RemoteFile]]:
        """(commit, files) of the model's repository at revision; DownloadError naming the model."""
        what = f"model {model_id!r} (Hugging Face)"
        rev = urllib.parse.quote(revision, safe="")
        info, _ = _get_json(f"{self.endpoint}/api/models/{model_id}/revision/{rev}", self.headers, what)
        commit = _field(info, "sha", str, what)
        if not commit or not all(c in "0123456789abcdefABCDEF" for c in commit):
            raise DownloadError(f"{what}: the revision reply names no commit: {str(info)[:200]}")
        url = f"{self.endpoint}/api/models/{model_id}/tree/{commit}?recursive=true"
        files = []
        while url:
            page, raw = _get_json(url, self.headers, what)
            if not isinstance(page, list):
                raise DownloadError(f"{what}: unexpected tree reply: {str(page)[:200]}")
            for e in page:
                if not isinstance(e, dict):
                    raise DownloadError(f"{what}: a tree entry is not an object: {str(e)[:200]}")
                if e.get("type") != "file":
                    continue
                lfs = e.get("lfs")
                if lfs is not None and not isinstance(lfs, dict):
                    raise DownloadError(f"{what}: {e.get('path')}: unexpected lfs field: {str(lfs)[:200]}")
                url_of = f"{self.endpoint}/{model_id}/resolve/{commit}/{urllib.parse.quote(str(e.get('path')))}"
                # An LFS file is checked by its SHA-256 (its oid is the pointer's blob id); a file kept
                # in git itself by its blob id, the SHA-1 of "blob <size>\0" and its bytes.
                sha256, blob = (lfs.get("oid"), None) if lfs is not None else (None, e.get("oid"))
                files.append(_remote_file(what, e.get("path"), e.get("size"), sha256, url_of, blob))
            link = _header_value(raw, "Link") or ""
            url = None
            for part in link.split(","):
                if 'rel="next"' in part:
                    url = part.split(";")[0].strip().strip("<>")
        return commit, files


# ---- the manifest --------------------------------------------------------------------------


def _read_manifest(folder: str) -> dict:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            m = json.load(f)
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_manifest(folder: str, manifest: dict) -> None:
    path = os.path.join(folder, MANIFEST)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    os.replace(tmp, path)


def _stamp(path: str) -> list | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _mismatch(path: str, sha256: str | None, blob: str | None) -> str | None:
    """None when the file's bytes have the hashes the hub gives (SHA-256, git blob id: whichever it
    gives), else what differs. One pass over the file for both."""
    if not sha256 and not blob:
        return None
    h256 = hashlib.sha256() if sha256 else None
    h1 = hashlib.sha1() if blob else None
    with open(path, "rb", buffering=0) as f:
        if h1 is not None:
            h1.update(b"blob %d\0" % os.fstat(f.fileno()).st_size)
        while chunk := f.read(8 << 20):
            if h256 is not None:
                h256.update(chunk)
            if h1 is not None:
                h1.update(chunk)
    if h256 is not None and h256.hexdigest() != sha256:
        return f"SHA-256 {h256.hexdigest()} does not match the hub's {sha256}"
    if h1 is not None and h1.hexdigest() != blob:
        return f"git blob id {h1.hexdigest()} does not match the hub's {blob}"
    return None


def _entry(f: RemoteFile) -> dict:
    """What the manifest keeps of a listed file."""
    return {"size": f.size, "sha256": f.sha256, "blob": f.blob}


def _present(folder: str, f: dict, rel: str, manifest_files: dict) -> bool:
    """Whether the file at rel is the listed file: size, then the recorded stamp or the hashes."""
    path = os.path.join(folder, rel)
    stamp = _stamp(path)
    if stamp is None or stamp[0] != f["size"]:
        return False
    seen = manifest_files.get(rel)
    if seen and seen.get("stamp") == stamp and seen.get("sha256") == f["sha256"] and seen.get("blob") == f.get("blob"):
        return True
    if _mismatch(path, f["sha256"], f.get("blob")):
        return False
    manifest_files[rel] = {"size": f["size"], "sha256": f["sha256"], "blob": f.get("blob"), "stamp": stamp}
    return True


@contextlib.contextmanager
def _folder_lock(folder: str, what: str) -> Iterator[None]:
    """An exclusive lock on a model folder's downloads (flock on .cache/diffsynth_c/download.lock):
    the partial files, the renames and the manifest belong to one download at a time, across
    processes and threads (each holder opens the lock file itself). Waits for the holder; Ctrl-C
    while waiting raises KeyboardInterrupt. The kernel drops the lock of a process that dies."""
    path = os.path.join(folder, LOCK)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise DownloadError(f"{what}: cannot write {path}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---- transfers -----------------------------------------------------------------------------


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
    return _mismatch(part, f.sha256, f.blob)


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
        if _entry(f) == {k: state.get(k) for k in ("size", "sha256", "blob")} and os.path.exists(part):
            return [[int(a), int(b), int(d)] for a, b, d in state["ranges"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return _ranges(f.size, step)


def _save_part(part: str, f: RemoteFile, ranges: list[list[int]]) -> None:
    try:
        with open(part + ".json", "w", encoding="utf-8") as fh:
            json.dump({**_entry(f), "ranges": ranges}, fh)
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
                    json.dump({**_entry(f), "ranges": [[0, f.size, 0]]}, fh)
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


# ---- ModelConfig ---------------------------------------------------------------------------

# The download-source box DiffSynth prints before its first download: the four behaviours, the one
# in effect ticked. The same lines as DiffSynth's, with the shell syntax of the platform.
_SOURCES = (
    ("Download from https://modelscope.cn/", "(default behavior)"),
    ("Download from https://modelscope.ai/", "MODELSCOPE_ENDPOINT", "https://modelscope.ai"),
    ("Download from https://huggingface.co/", "DIFFSYNTH_DOWNLOAD_SOURCE", "HuggingFace"),
    ("Skip download and load only pre-downloaded model files", "DIFFSYNTH_SKIP_DOWNLOAD", "True"),
)


def _downloading_tips(windows: bool) -> str:
    lines = ["DiffSynth-Studio Model Downloader Configuration:", ""]
    for i, (what, *how) in enumerate(_SOURCES):
        lines.append(f"[{i}] {what}")
        if len(how) == 1:
            lines.append(f"    {how[0]}")
        elif windows:
            lines.append(f'    (enabled via `$env:{how[0]}="{how[1]}"`)')
        else:
            lines.append(f"    (enabled via `export {how[0]}={how[1]}`)")
    width = max(len(line) for line in lines)
    body = "\n".join(f"\u2502 {line:<{width}} \u2502" for line in lines)
    return f"\u250c{chr(0x2500) * (width + 2)}\u2510\n{body}\n\u2514{chr(0x2500) * (width + 2)}\u2518"


DOWNLOADING_TIPS = _downloading_tips(__import__("sys").platform.startswith("win"))
_download_tips_printed = False


@dataclass
class ModelConfig:
    """Where a model's files are, or which hub files to download (DiffSynth's fields)."""

    path: str | list | None = None
    model_id: str | None = None
    origin_file_pattern: str | list | None = None
    download_source: str | None = None
    local_model_path: str | None = None
    skip_download: bool | None = None
    offload_device: Any = None
    offload_dtype: Any = None
    onload_device: Any = None
    onload_dtype: Any = None
    preparing_device: Any = None
    preparing_dtype: Any = None
    computation_device: Any = None
    computation_dtype: Any = None
    clear_parameters: bool = False
    state_dict: dict[str, Any] | None = None
    quantize: Any = None

    def check_input(self) -> None:
        """Raises ValueError when neither path nor model_id is given."""
        if self.path is None and self.model_id is None:
            raise ValueError(
                'No valid model files. Please use `ModelConfig(path="xxx")` or '
                '`ModelConfig(model_id="xxx/yyy", origin_file_pattern="zzz")`. '
                "`skip_download=True` only supports the first one."
            )

    def parse_original_file_pattern(self) -> str:
        """The pattern to match: everything for None, "" or "./", a trailing "/" gets "*"."""
        if self.origin_file_pattern in (None, "", "./"):
            return "*"
        if self.origin_file_pattern.endswith("/"):
            return self.origin_file_pattern + "*"
        return self.origin_file_pattern

    def parse_download_source(self) -> str:
        """download_source, else DIFFSYNTH_DOWNLOAD_SOURCE, else "modelscope" (lower case)."""
        if self.download_source is not None:
            return self.download_source.lower()
        return os.environ.get("DIFFSYNTH_DOWNLOAD_SOURCE", "modelscope").lower()

    def parse_skip_download(self) -> bool | None:
        """skip_download, else DIFFSYNTH_SKIP_DOWNLOAD ("true"/"false"), else False."""
        if self.skip_download is not None:
            return self.skip_download
        if os.environ.get("DIFFSYNTH_SKIP_DOWNLOAD") is None:
            return False
        return _env_true("DIFFSYNTH_SKIP_DOWNLOAD")

    def require_downloading(self) -> bool:
        """Whether download_if_necessary goes to the hub (no path given, downloads not skipped)."""
        if self.path is not None:
            return False
        return not self.parse_skip_download()

    def reset_local_model_path(self) -> None:
        """DIFFSYNTH_MODEL_BASE_PATH overrides local_model_path; the default is ./models."""
        if os.environ.get("DIFFSYNTH_MODEL_BASE_PATH") is not None:
            self.local_model_path = os.environ.get("DIFFSYNTH_MODEL_BASE_PATH")
        elif self.local_model_path is None:
            self.local_model_path = "./models"

    def download(self) -> None:
        """Brings the matching files of the repo into {local_model_path}/{model_id}; no request
        when the manifest shows every matching file present and unchanged."""
        pattern = self.parse_original_file_pattern()
        source = self.parse_download_source()
        if source == "modelscope":
            hub: ModelScope | HuggingFace = ModelScope()
        elif source == "huggingface":
            hub = HuggingFace()
        else:
            raise ValueError("`download_source` should be `modelscope` or `huggingface`.")
        folder = os.path.join(self.local_model_path, self.model_id)
        what = f"model {self.model_id!r}"
        manifest = _read_manifest(folder)
        key = f"{source} {getattr(hub, 'endpoint', '')}"
        listing = manifest.get("listings", {}).get(key)
        seen = manifest.setdefault("files", {})
        if listing:
            wanted = {p: f for p, f in listing["files"].items() if matches(p, pattern)}
            if wanted and all(_present(folder, f, p, seen) for p, f in wanted.items()):
                try:
                    _write_manifest(folder, manifest)  # a re-hashed file gets its new stamp
                except OSError:
                    pass
                return
        commit, remote = hub.listing(self.model_id)
        wanted_files = [f for f in remote if matches(f.path, pattern)]
        if not wanted_files:
            raise DownloadError(f"{what}: no file of the repo matches {pattern!r}")
        entries = {f.path: _entry(f) for f in remote}
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise DownloadError(f"{what}: cannot create {folder}: {e.strerror}") from e
        # Another process (or thread) downloading into this folder holds the lock: wait for it, then
        # take what it landed and recorded, and download only what is still missing.
        with _folder_lock(folder, what):
            manifest = _read_manifest(folder)
            seen = manifest.setdefault("files", {})
            missing = [f for f in wanted_files if not _present(folder, entries[f.path], f.path, seen)]
            download_files(folder, missing, hub.headers, what)
            for f in missing:
                seen[f.path] = {**_entry(f), "stamp": _stamp(os.path.join(folder, f.path))}
            manifest.setdefault("listings", {})[key] = {"commit": commit, "files": entries}
            try:
                _write_manifest(folder, manifest)
            except OSError:
                pass

    def check_download_source(self) -> None:
        """Prints DiffSynth's download-source box (the behaviour in effect ticked: ModelScope,
        ModelScope's .ai endpoint, Hugging Face, or no download), once per process and on the main
        rank only, as DiffSynth does."""
        global _download_tips_printed
        source = self.parse_download_source().lower()
        if os.environ.get("DIFFSYNTH_SKIP_DOWNLOAD", "").lower() == "true":
            behavior = 3
        elif source == "modelscope":
            ai = "modelscope.ai" in os.environ.get("MODELSCOPE_ENDPOINT", "") or "modelscope.ai" in os.environ.get(
                "MODELSCOPE_DOMAIN", ""
            )
            behavior = 1 if ai else 0
        else:
            behavior = 2
        tips = DOWNLOADING_TIPS
        for i in range(4):
            tips = tips.replace(f"[{i}]", "[\u221a]" if i == behavior else "[ ]")
        if _download_tips_printed:
            return
        import sys

        dist = getattr(sys.modules.get("torch"), "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        print(tips)
        _download_tips_printed = True

    def download_if_necessary(self) -> None:
        """Downloads when needed, then sets path: one file as a string, several as a list, the
        model folder for an empty pattern. Prints DiffSynth's download-source box first."""
        self.check_download_source()
        self.check_input()
        self.reset_local_model_path()
        if self.require_downloading():
            self.download()
        if self.path is None:
            if self.origin_file_pattern in (None, "", "./"):
                self.path = os.path.join(self.local_model_path, self.model_id)
            else:
                self.path = glob.glob(os.path.join(self.local_model_path, self.model_id, self.origin_file_pattern))
        if isinstance(self.path, list) and len(self.path) == 1:
            self.path = self.path[0]

    def vram_config(self) -> dict:
        """The eight offload/onload/preparing/computation device and dtype fields."""
        return {
            "offload_device": self.offload_device,
            "offload_dtype": self.offload_dtype,
            "onload_device": self.onload_device,
            "onload_dtype": self.onload_dtype,
            "preparing_device": self.preparing_device,
            "preparing_dtype": self.preparing_dtype,
            "computation_device": self.computation_device,
            "computation_dtype": self.computation_dtype,
        }
