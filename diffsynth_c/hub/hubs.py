"""The two hubs DiffSynth downloads from (ModelScope, Hugging Face): their repository listings,
read through the C core's libcurl (``_core.http_get``), as ``RemoteFile`` rows; and how a file
name matches DiffSynth's ``origin_file_pattern``."""

from __future__ import annotations

import fnmatch
import json
import os
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from .. import _core


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


def matches(path: str, pattern: str) -> bool:
    """DiffSynth's and the hubs' rule: fnmatch on the whole path in the repo, ``*`` crossing ``/``,
    a trailing ``/`` meaning everything below."""
    if pattern.endswith("/"):
        pattern += "*"
    return fnmatch.fnmatchcase(path, pattern)


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
