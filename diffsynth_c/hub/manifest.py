"""What a model folder holds: the manifest of verified files (``.cache/diffsynth_c/manifest.json``),
the stamps that tell whether a file changed since, and the lock one download holds on the folder."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator

from .hubs import DownloadError, RemoteFile

MANIFEST = os.path.join(".cache", "diffsynth_c", "manifest.json")
LOCK = os.path.join(".cache", "diffsynth_c", "download.lock")  # held while a download writes the folder


def read_manifest(folder: str) -> dict:
    """The model folder's manifest, or {} when it is missing or unreadable (every file is then checked)."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            m = json.load(f)
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def write_manifest(folder: str, manifest: dict) -> None:
    """Writes the manifest under a temporary name, then renames it into place (never half-written)."""
    path = os.path.join(folder, MANIFEST)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    os.replace(tmp, path)


def file_stamp(path: str) -> list | None:
    """[size, mtime_ns, inode] of the file at path (what tells that it changed since verified), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def hash_mismatch(path: str, sha256: str | None, blob: str | None) -> str | None:
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


def manifest_entry(f: RemoteFile) -> dict:
    """What the manifest keeps of a listed file."""
    return {"size": f.size, "sha256": f.sha256, "blob": f.blob}


def is_present(folder: str, f: dict, rel: str, manifest_files: dict) -> bool:
    """Whether the file at rel is the listed file: size, then the recorded stamp or the hashes."""
    path = os.path.join(folder, rel)
    stamp = file_stamp(path)
    if stamp is None or stamp[0] != f["size"]:
        return False
    seen = manifest_files.get(rel)
    if seen and seen.get("stamp") == stamp and seen.get("sha256") == f["sha256"] and seen.get("blob") == f.get("blob"):
        return True
    if hash_mismatch(path, f["sha256"], f.get("blob")):
        return False
    manifest_files[rel] = {"size": f["size"], "sha256": f["sha256"], "blob": f.get("blob"), "stamp": stamp}
    return True


@contextlib.contextmanager
def folder_lock(folder: str, what: str) -> Iterator[None]:
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
