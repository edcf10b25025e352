"""A local model hub for tests and benchmarks: ModelScope's and Hugging Face's download protocols
over generated repositories, on 127.0.0.1 only.

Files are served with ``Range``/206 and ``Content-Range``, at an optional per-connection rate
cap, and faults can be queued per file path: each request for the file takes the next one.
Faults: ``reset`` (connection dropped mid-body), ``trickle`` (slow body), ``500``/``429``,
``wrong`` (a body with other bytes), ``short`` (Content-Length promises more than is sent),
``redirect`` (to the second host name, ``localhost``), ``ignore_range`` (200 to a range request),
``long`` (Content-Length 100 bytes short of the body, on a kept-alive connection: the rest of the
body is left in the socket), ``extra`` (100 bytes more than the range asked for, the Content-Length
counting them).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def fake_bytes(seed: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes (fast to make: a repeated SHA-256 block stream)."""
    block = b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(2048))  # 64 KiB
    reps = size // len(block) + 1
    return (block * reps)[:size]


def git_blob_id(data: bytes) -> str:
    """git's object id of a file: SHA-1 over "blob <size>\\0" and the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, size: int) -> bool:
    """Whether the hub keeps the file in LFS (as Hugging Face's default .gitattributes does for
    weights), else in git itself, as config.json and README.md are."""
    return path.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")) or size >= 10 << 20


class Hub:
    """The served repositories and the switches of the server; start() binds a port."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.hashes: dict[str, dict[str, str]] = {}
        self.faults: dict[str, list[str]] = {}
        self.requests: list[str] = []
        self.rate: float | None = None  # bytes per second per connection
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def add_repo(self, model_id: str, files: dict[str, bytes]) -> None:
        self.repos[model_id] = dict(files)
        self.hashes.pop(model_id, None)

    def sha256(self, model_id: str, path: str) -> str:
        """The file's SHA-256, computed once (every request of a large file would cost seconds)."""
        cached = self.hashes.setdefault(model_id, {})
        if path not in cached:
            cached[path] = hashlib.sha256(self.repos[model_id][path]).hexdigest()
        return cached[path]

    def commit(self, model_id: str) -> str:
        h = hashlib.sha1(model_id.encode())
        for path in sorted(self.repos[model_id]):
            h.update(path.encode() + self.sha256(model_id, path).encode())
        return h.hexdigest()

    def fault(self, path: str, *kinds: str) -> None:
        with self.lock:
            self.faults.setdefault(path, []).extend(kinds)

    def take_fault(self, path: str) -> str | None:
        with self.lock:
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def other_url(self) -> str:
        return f"http://localhost:{self.server.server_address[1]}"

    def start(self) -> Hub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class _QuietServer(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: a client opening more connections at once has its
    # extra SYNs dropped and retried a second later, which no real hub does to it
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:
        pass  # clients that hang up mid-body (retries, Ctrl-C tests) are expected here


class _Handler(BaseHTTPRequestHandler):
    hub: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        if self.client_address[0] not in ("127.0.0.1", "::1"):
            raise ConnectionAbortedError("loopback only")

    # ---- replies ----
    def send_json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def not_found(self, code: str = "RepoNotFound") -> None:
        self.send_json({"Code": 404, "Message": code, "error": code}, 404, {"X-Error-Code": code})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self.hub.requests.append(self.path)
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        path = urllib.parse.unquote(url.path)
        m = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)(/.*)?", path)
        if m:
            return self.modelscope(m.group(1), m.group(2) or "", query)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        if m:
            return self.huggingface_api(m.group(1), m.group(2), m.group(3), query)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo = self.hub.repos.get(m.group(1))
            if repo is None:
                return self.not_found()
            if m.group(2) not in ("main", self.hub.commit(m.group(1))):
                return self.not_found("RevisionNotFound")
            return self.serve_file(m.group(1), m.group(3), {"X-Repo-Commit": self.hub.commit(m.group(1))})
        self.not_found("NotFound")

    def modelscope(self, model_id: str, rest: str, query: dict) -> None:
        repo = self.hub.repos.get(model_id)
        if repo is None:
            return self.not_found()
        commit = self.hub.commit(model_id)
        revision = query.get("Revision", ["master"])[0]
        ok = revision in ("master", commit)

        def envelope(data):
            return {"Code": 200, "Data": data, "Message": "success", "RequestId": "local", "Success": True}

        if rest == "":
            return self.send_json(envelope({"Id": 1, "Name": model_id.split("/")[1], "Path": model_id.split("/")[0]}))
        if rest == "/revisions":
            branch = {"Revision": "master", "CreatedAt": 1700000000}
            return self.send_json(envelope({"RevisionMap": {"Branches": [branch], "Tags": []}}))
        if not ok:
            return self.not_found("RevisionNotFound")
        if rest == "/repo/files":
            files = [
                {
                    "Name": p.rsplit("/", 1)[-1],
                    "Path": p,
                    "Type": "blob",
                    "Size": len(b),
                    "Sha256": self.hub.sha256(model_id, p),
                    "Revision": commit,
                    "IsLFS": True,
                    "Mode": "33188",
                    "CommitMessage": "add",
                    "CommittedDate": 1700000000,
                    "CommitterName": "hub",
                    "InCheck": False,
                }
                for p, b in sorted(repo.items())
            ]
            dirs = sorted({p.rsplit("/", 1)[0] for p in repo if "/" in p})
            files += [
                {"Name": d.rsplit("/", 1)[-1], "Path": d, "Type": "tree", "Size": 0, "Revision": commit} for d in dirs
            ]
            return self.send_json(envelope({"Files": files}))
        if rest == "/repo":
            return self.serve_file(model_id, query.get("FilePath", [""])[0], {})
        self.not_found("NotFound")

    def huggingface_api(self, model_id: str, kind: str, rev: str, query: dict) -> None:
        repo = self.hub.repos.get(model_id)
        if repo is None:
            return self.not_found()
        commit = self.hub.commit(model_id)
        if rev not in ("main", commit):
            return self.not_found("RevisionNotFound")
        if kind == "revision":
            return self.send_json({"id": model_id, "sha": commit, "siblings": [{"rfilename": p} for p in sorted(repo)]})
        entries = []
        for p, b in sorted(repo.items()):
            if is_lfs(p, len(b)):  # oid: the blob id of the pointer file git keeps
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.hub.sha256(model_id, p)}\nsize {len(b)}\n"
                lfs = {"oid": self.hub.sha256(model_id, p), "size": len(b), "pointerSize": len(pointer)}
                entries.append(
                    {"type": "file", "path": p, "size": len(b), "oid": git_blob_id(pointer.encode()), "lfs": lfs}
                )
            else:  # kept in git itself: only the blob id of its bytes
                entries.append({"type": "file", "path": p, "size": len(b), "oid": git_blob_id(b)})
        dirs = sorted({p.rsplit("/", 1)[0] for p in repo if "/" in p})
        entries += [{"type": "directory", "path": d, "oid": "0" * 40} for d in dirs]
        # Two entries a page, to exercise Link paging.
        cursor = int(query.get("cursor", ["0"])[0])
        page = entries[cursor : cursor + 2]
        headers = {}
        if cursor + 2 < len(entries):
            nxt = f"{self.hub.url}/api/models/{model_id}/tree/{rev}?recursive=true&cursor={cursor + 2}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self.send_json(page, 200, headers)

    def serve_file(self, model_id: str, path: str, extra: dict) -> None:
        data = self.hub.repos[model_id].get(path)
        if data is None:
            return self.not_found("EntryNotFound")
        fault = self.hub.take_fault(path) if self.command == "GET" else None
        if fault in ("500", "429"):
            return self.send_json({"error": fault}, int(fault))
        if fault == "redirect" and not self.headers.get("Host", "").startswith("localhost"):
            self.send_response(302)
            self.send_header("Location", self.hub.other_url + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault == "redirect" and self.headers.get("Authorization"):
            return self.send_json({"error": "Authorization leaked to another host"}, 400)
        if fault == "wrong":
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start, end = 0, len(data)
        rng = self.headers.get("Range")
        status = 200
        if rng and fault != "ignore_range":
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)) + 1, len(data)) if m.group(2) else len(data)
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
        sha = self.hub.sha256(model_id, path)
        self.send_response(status)
        end_sent = end
        if fault == "extra":
            data, end_sent = data + b"\0" * 100, end + 100
        declared = (
            end_sent - start + (100 if fault == "short" else 0) - (min(100, end - start) if fault == "long" else 0)
        )
        self.send_header("Content-Length", str(declared))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{sha}"')
        self.send_header("X-Linked-Etag", f'"{sha}"')
        self.send_header("X-Linked-Size", str(len(data)))
        for k, v in extra.items():
            self.send_header(k, v)
        if fault == "short":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        body = memoryview(data)[start:end_sent]
        if fault == "reset":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.close_connection = True
            self.connection.close()
            return
        rate = 256 * 1024 if fault == "trickle" else self.hub.rate
        if not rate:
            self.wfile.write(body)
            return
        chunk = max(4096, int(rate / 20))
        t0 = time.monotonic()
        sent = 0
        while sent < len(body):
            self.wfile.write(body[sent : sent + chunk])
            sent += min(chunk, len(body) - sent)
            ahead = sent / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)


def main() -> None:
    """Serves a generated repo until stdin closes: `python -m tests.hub MODEL_ID SIZE FILES [RATE]`
    (RATE in bytes per second per connection, 0 for none). Prints the URL first."""
    import sys

    model_id, size, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    hub = Hub()
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    hub.add_repo(model_id, {name: fake_bytes(f"f{i}", size // n) for i, name in enumerate(names)})
    hub.rate = float(sys.argv[4]) if len(sys.argv) > 4 and float(sys.argv[4]) > 0 else None
    hub.commit(model_id)  # hashes every file now, not during the first client's run
    hub.start()
    print(hub.url, flush=True)
    sys.stdin.read()
    hub.stop()


if __name__ == "__main__":
    main()
