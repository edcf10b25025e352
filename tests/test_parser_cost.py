"""Cost is part of correctness: every parser does work and uses memory linear in its input. Each
bomb here is a small file built to cost a careless parser exponential or quadratic work, or memory
out of proportion to the file; it runs in a child process that reports its time and its peak
memory growth, and must finish quickly and small (or be refused with a FormatError where torch
itself would fail or where docs/migrating.md says we are stricter). Plus: many tensors scale
linearly (19.5), and a long parse stops on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch

from diffsynth_c import _core

from .torch_oracle import assert_same_as_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time, warnings
    warnings.simplefilter("ignore")
    import torch
    from diffsynth_c import _core
    from diffsynth_c.loader import file as f
    path, results = sys.argv[1], {}
    calls = {"read": lambda: _core.torch_read(path), "load": lambda: f.load_state_dict(path),
             "hash": lambda: f.hash_model_file(path)}
    if path.endswith(".safetensors"):
        calls.pop("read")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, call in calls.items():
        t = time.perf_counter()
        try:
            call()
            outcome = "ok"
        except Exception as e:
            outcome = f"{type(e).__name__}: {e}"[:400]
        results[name] = {"s": time.perf_counter() - t, "outcome": outcome}
    results["rss_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(json.dumps(results))
    """
)


def cost(path: str, timeout: float = 30) -> dict:
    """Runs our read, load and hash of path in a child; their times, outcomes and the child's
    peak memory growth over the three (MiB)."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# Under AddressSanitizer (scripts/sanitize.sh) every allocation and access costs several times more,
# and its quarantine holds freed memory: the bounds stretch, still far below what an exponential or
# quadratic bomb costs (seconds growing without end).
SANITIZED = os.environ.get("DIFFSYNTH_C_EXPECT_SANITIZED") == "1"
SLOWER, BIGGER = (10, 4) if SANITIZED else (1, 1)


def assert_cheap(r: dict, seconds: float = 2.0, mib: float = 64) -> None:
    seconds, mib = seconds * SLOWER, mib * BIGGER
    for name in ("read", "load", "hash"):
        if name in r:
            assert r[name]["s"] < seconds, f"{name} took {r[name]['s']:.2f} s ({r[name]['outcome']})"
    assert r["rss_mib"] < mib, f"peak memory grew by {r['rss_mib']:.0f} MiB"


def checkpoint(path, pkl: bytes, storages: dict[str, bytes] | None = None) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for k, v in (storages or {}).items():
            z.writestr(f"archive/data/{k}", v)
    return str(path)


# ---- pickle bombs -------------------------------------------------------------------------------


def test_shared_list_64_deep(tmp_path):
    a: list = []
    for _ in range(64):
        a = [a, a]
    p = str(tmp_path / "lists.pt")
    torch.save({"x": a, "w": torch.ones(2)}, p)
    assert os.path.getsize(p) < 4096
    r = cost(p)
    assert_cheap(r)
    assert r["read"]["outcome"] == r["load"]["outcome"] == "ok"
    assert r["hash"]["outcome"].startswith("AttributeError")  # DiffSynth's keys dict of a list value


def test_shared_dict_64_deep(tmp_path):
    """Loads (shared, as torch); hashing it would spell out 2**64 copies of the innermost key in
    DiffSynth's canonical string: refused (docs/migrating.md)."""
    d: dict = {"w": torch.ones(1)}
    for _ in range(64):
        d = {"a": d, "b": d}
    p = str(tmp_path / "dicts.pt")
    torch.save(d, p)
    r = cost(p)
    assert_cheap(r)
    assert r["read"]["outcome"] == r["load"]["outcome"] == "ok"
    assert r["hash"]["outcome"].startswith("FormatError") and "canonical key string" in r["hash"]["outcome"]


def test_shared_dict_a_few_deep_hashes_as_diffsynth(tmp_path):
    from diffsynth.core import hash_model_file as ds_hash_model_file

    import diffsynth_c

    d: dict = {"w": torch.ones(1)}
    for _ in range(8):
        d = {"a": d, "b": d}
    p = str(tmp_path / "dicts8.pt")
    torch.save(d, p)
    assert diffsynth_c.hash_model_file(p) == ds_hash_model_file(p)


def test_deep_nesting(tmp_path):
    n = 200_000
    p = checkpoint(tmp_path / "deep.pt", b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b".")
    r = cost(p)
    assert_cheap(r)
    assert all("1000 deep" in r[k]["outcome"] for k in ("read", "load", "hash"))


def test_huge_memo_indices(tmp_path):
    """BINPUT takes any 32-bit index: torch's memo is a dict; ours must not be an array that size."""
    pkl = b"\x80\x02]" + b"r\xfe\xff\xff\x00" + b"r\xff\xff\xff\xff" + b"j\xfe\xff\xff\x00" + b"a" + b"."
    p = checkpoint(tmp_path / "memo.pt", pkl)
    assert_cheap(cost(p))
    ours = assert_same_as_torch(p)
    assert ours[0] is ours


def test_many_memo_entries_stay_linear(tmp_path):
    """MEMOIZE-like growth: 100k BINPUTs at spread-out indices, then each fetched back."""
    n = 100_000
    idx = [(i * 2654435761) & 0xFFFFFFFF for i in range(n)]
    puts = b"".join(b"K\x01r" + struct.pack("<I", i) for i in idx)
    gets = b"".join(b"j" + struct.pack("<I", i) for i in idx)
    p = checkpoint(tmp_path / "memo_many.pt", b"\x80\x02](" + puts + b"e(" + gets + b"e.")
    assert_cheap(cost(p))
    ours = assert_same_as_torch(p)
    assert len(ours) == 2 * n and set(ours) == {1}


def test_many_storages_named_again_and_again(tmp_path):
    """100k persistent ids naming 20k distinct storages: each lookup must be O(1)."""

    class _S:
        def __init__(self, k):
            self.k = k

    import io
    import pickle

    class P(pickle.Pickler):
        def persistent_id(self, o):
            return ("storage", torch.FloatStorage, o.k, "cpu", 1) if isinstance(o, _S) else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump([_S(str(i % 20_000)) for i in range(100_000)])
    p = checkpoint(tmp_path / "stor.pt", buf.getvalue(), {str(i): b"\0\0\0\0" for i in range(20_000)})
    r = cost(p)
    assert_cheap(r, mib=128)  # 20k zip entries and storages, 100k list items


# ---- zip directories that lie -----------------------------------------------------------------


def _zip(entries: list[tuple[str, bytes]], aliases: list[tuple[str, str]] = (), cd_count: int | None = None) -> bytes:
    """A stored zip of entries; aliases: extra directory records (new name, existing name) that
    point at an existing entry's local header."""
    out, records = bytearray(), {}
    for name, data in entries:
        n = name.encode()
        records[name] = (len(out), len(data), n)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, len(data), len(data), len(n), 0) + n + data
    cd = bytearray()
    listed = [(name, records[name]) for name, _ in entries] + [(new, records[old]) for new, old in aliases]
    for name, (off, size, _) in listed:
        n = name.encode()
        cd += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, 0, size, size, len(n), 0, 0, 0, 0, 0, off
        )
        cd += n
    count = len(listed) if cd_count is None else cd_count
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count & 0xFFFF, count & 0xFFFF, len(cd), len(out), 0)
    return bytes(out + cd + eocd)


def _tensor_dict_pickle(n: int, numel: int) -> bytes:
    import collections
    import io
    import pickle

    class _S:
        def __init__(self, k):
            self.k = k

    class _T:
        def __init__(self, s):
            self.s = s

        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (self.s, 0, (numel,), (1,), False, collections.OrderedDict())

    class P(pickle.Pickler):
        def persistent_id(self, o):
            return ("storage", torch.FloatStorage, o.k, "cpu", numel) if isinstance(o, _S) else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({f"t{i}": _T(_S(str(i))) for i in range(n)})
    return buf.getvalue()


def test_directory_records_aliasing_one_entry(tmp_path):
    """300 storages whose directory records all point at one 256 KiB entry: loading them would
    read 75 MiB out of a 256 KiB file. Refused: the entries overlap."""
    n, numel = 300, 65536
    entries = [("archive/data.pkl", _tensor_dict_pickle(n, numel)), ("archive/version", b"3\n")]
    entries.append(("archive/data/0", bytes(4 * numel)))
    p = tmp_path / "alias.pt"
    p.write_bytes(_zip(entries, [(f"archive/data/{i}", "archive/data/0") for i in range(1, n)]))
    r = cost(str(p))
    assert_cheap(r)
    assert all("overlap" in r[k]["outcome"] for k in ("read", "load", "hash"))


@pytest.mark.parametrize("lie", ["size", "count"])
def test_directory_lying_about_sizes_or_counts(tmp_path, lie):
    entries = [
        ("archive/data.pkl", _tensor_dict_pickle(1, 4)),
        ("archive/version", b"3\n"),
        ("archive/data/0", bytes(16)),
    ]
    raw = bytearray(_zip(entries, cd_count=60_000 if lie == "count" else None))
    if lie == "size":  # data/0's directory record claims 1 GiB
        rec = raw.rfind(b"PK\x01\x02")
        struct.pack_into("<II", raw, rec + 20, 1 << 30, 1 << 30)
    p = tmp_path / f"lie_{lie}.pt"
    p.write_bytes(bytes(raw))
    r = cost(str(p))
    assert_cheap(r)
    assert all(r[k]["outcome"].startswith("FormatError") for k in ("read", "load", "hash")), r


# ---- JSON: many tiny tensors in a safetensors header ---------------------------------------------


def test_safetensors_header_of_many_tiny_tensors(tmp_path):
    n = 50_000
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    p = tmp_path / "tiny.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    r = cost(str(p))
    assert r["load"]["outcome"] == r["hash"]["outcome"] == "ok"
    assert_cheap(r, seconds=3, mib=64 * os.path.getsize(p) / 2**20)


# ---- 19.5: many tensors scale linearly --------------------------------------------------------


def _best(fn, k: int = 3) -> float:
    times = []
    for _ in range(k):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def test_many_tensors_scale_linearly(tmp_path):
    """Time for 4N tensors against N (best of 3): linear work gives about 4, the quadratic
    directory and storage lookups this replaced gave over 20 at these sizes."""
    import diffsynth_c

    paths = {}
    for n in (2500, 10_000):
        paths[n] = str(tmp_path / f"n{n}.pt")
        torch.save({f"blocks.{i}.w": torch.ones(1) for i in range(n)}, paths[n])
    for name, fn, limit in [
        ("read", _core.torch_read, 10),
        ("hash", diffsynth_c.hash_model_file, 10),
        ("load", diffsynth_c.load_state_dict, 9),
    ]:
        small = _best(lambda fn=fn: fn(paths[2500]))
        large = _best(lambda fn=fn: fn(paths[10_000]))
        assert large / small < limit, f"{name}: {small:.4f} s for 2500 tensors, {large:.4f} s for 10000"


# ---- Ctrl-C during a long parse -----------------------------------------------------------------


def test_ctrl_c_stops_a_long_parse(tmp_path):
    """A parse slowed down to 100 us per opcode (a test hook) would take 4 s; SIGINT after 0.3 s
    must surface as KeyboardInterrupt from inside torch_read well before that."""
    n = 40_000
    p = checkpoint(tmp_path / "long.pt", b"\x80\x02](" + b"K\x01" * n + b"e.")
    child = textwrap.dedent(
        f"""
        import sys, time
        from diffsynth_c import _core
        _core._debug_pickle_delay(100)
        t = time.perf_counter()
        result = None
        try:
            result = _core.torch_read({str(p)!r})
        except KeyboardInterrupt:
            print("interrupted", result is None, time.perf_counter() - t)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    time.sleep(0.3 + 0.5)  # the child's start (imports) and then 0.3 s into the parse
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    words = out.split()
    assert words[:2] == ["interrupted", "True"], out
    assert float(words[2]) < 2.5, out
