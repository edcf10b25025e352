"""Hardening: files truncated under their tensors, load-and-drop cycles, many threads at once,
Ctrl-C during a load, and inputs that claim more than they hold. Each case that could kill the
process runs in a child, so a crash is seen as a crash.

Long forms (opt-in, DIFFSYNTH_C_LONG_TESTS=1): the leak cycle with a 1 GiB model 200 times."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch

import diffsynth_c

from .conftest import sparse_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = os.environ.get("DIFFSYNTH_C_LONG_TESTS") == "1"


def child(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        check=False,
    )


CHANGES = {
    "truncated to one page": "os.truncate(p, 4096)",
    "truncated by 100 bytes": "os.truncate(p, os.path.getsize(p) - 100)",
    "truncated by another process": "subprocess.run([sys.executable, '-c', f'import os; os.truncate({p!r}, 4096)'], check=True)",
    "overwritten in place": "f = open(p, 'r+b'); f.seek(-8192, 2); f.write(b'\\xff' * 8192); f.close()",
    "rewritten by safetensors": "st.save_file({'a': torch.zeros(1 << 20), 'b': torch.zeros(1 << 20)}, p)",
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_file_changed_under_its_mapped_tensors_keeps_their_bytes(tmp_path, change):
    """mmap-mode tensors hold a read lease on their file: a writer waits while they are copied, so
    every thread (here a worker thread first) reads what was loaded."""
    r = child(
        """
        import os, subprocess, sys, threading, torch, safetensors.torch as st, diffsynth_c
        p = sys.argv[1]
        want = {"a": torch.arange(1 << 20, dtype=torch.float32), "b": torch.ones(1 << 20)}
        st.save_file(want, p)
        sd = diffsynth_c.load_state_dict(p)            # mmap mode: views of the file
        exec(sys.argv[2])
        got = {}
        worker = threading.Thread(target=lambda: got.update(b=sd["b"].clone()))
        worker.start(); worker.join()
        same = [torch.equal(got["b"], want["b"]), torch.equal(sd["a"], want["a"])]
        print("same", same)
    """,
        str(tmp_path / "m.safetensors"),
        CHANGES[change],
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "same [True, True]", r.stdout + r.stderr


def test_a_converting_load_keeps_the_bytes_of_the_tensors_it_did_not_convert(tmp_path):
    """With torch_dtype, a tensor already in that dtype stays a view of the mapping (only its range
    is copied when the file changes); the converted ones never depended on the file."""
    r = child(
        """
        import os, sys, threading, torch, safetensors.torch as st, diffsynth_c
        p = sys.argv[1]
        st.save_file({"f": torch.arange(1 << 20, dtype=torch.float32), "h": torch.ones(1 << 20, dtype=torch.bfloat16),
                      "z": torch.full((1 << 20,), 3, dtype=torch.bfloat16)}, p)
        want = {k: v.to(torch.bfloat16).clone() for k, v in st.load_file(p).items()}  # not views of its mapping
        sd = diffsynth_c.load_state_dict(p, torch_dtype=torch.bfloat16)
        os.truncate(p, 4096)
        got = {}
        worker = threading.Thread(target=lambda: got.update({k: v.clone() for k, v in sd.items()}))
        worker.start(); worker.join()
        print("same", [torch.equal(got[k], want[k]) for k in "fhz"])
    """,
        str(tmp_path / "m.safetensors"),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "same [True, True, True]", r.stdout + r.stderr


def test_a_torch_checkpoint_truncated_under_its_mapped_tensors_keeps_their_bytes(tmp_path):
    """The same for torch.save files (read through map_ranges): torch.load's tensors are the reference."""
    r = child(
        """
        import os, sys, threading, torch, diffsynth_c
        p = sys.argv[1]
        torch.save({"a": torch.arange(1 << 20, dtype=torch.float32), "b": torch.ones(1 << 20)}, p)
        want = torch.load(p, weights_only=True)
        sd = diffsynth_c.load_state_dict(p)
        os.truncate(p, os.path.getsize(p) // 2)
        got = {}
        worker = threading.Thread(target=lambda: got.update(b=sd["b"].clone()))
        worker.start(); worker.join()
        print("same", [torch.equal(got["b"], want["b"]), torch.equal(sd["a"], want["a"])])
    """,
        str(tmp_path / "m.bin"),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "same [True, True]", r.stdout + r.stderr


def test_without_leases_a_truncated_mapping_raises_not_sigbus_past_1024_mappings(tmp_path):
    """Where no lease can be had (here: the lease signal is taken), loads read files into memory
    of their own, and DiskMap's mappings (one per tensor of 1 MiB or more) fall back on the SIGBUS
    guard, which has no limit on the number of mappings: 1,100 mapped tensors, the file truncated
    under the last ones, gives FormatError naming it. The big file is sparse (no disk blocks)."""
    big = sparse_safetensors(tmp_path / "big.safetensors", {f"t{i:04d}": (1 << 18,) for i in range(1100)}, "F32", 4)
    r = child(
        """
        import os, signal, sys, torch, safetensors.torch as st
        signal.signal(signal.SIGRTMIN + 5, lambda *a: None)   # the lease's signal is someone else's
        import diffsynth_c
        folder, big = sys.argv[1], sys.argv[2]
        paths = [os.path.join(folder, f"m{i}.safetensors") for i in range(1100)]
        for i, p in enumerate(paths):
            st.save_file({"a": torch.full((4096,), float(i)), "b": torch.full((4096,), float(i))}, p)
        sds = [diffsynth_c.load_state_dict(p) for p in paths]
        os.truncate(paths[1050], 4096)
        print("loaded", float(sds[1050]["b"].sum()) == 1050.0 * 4096)
        dm = diffsynth_c.DiskMap(big, "cpu")
        views = [dm[f"t{i:04d}"] for i in range(1100)]
        os.truncate(big, os.path.getsize(big) - 60 * (1 << 20))
        try:
            views[1050].sum()
            print("no exception")
        except diffsynth_c.FormatError as e:
            print("FormatError:", e)
        print("alive", float(views[3].sum()) == 0.0)
    """,
        str(tmp_path),
        big,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "loaded True", r.stdout
    assert lines[1].startswith("FormatError: ") and "big.safetensors: the file was truncated" in lines[1], r.stdout
    assert lines[2] == "alive True"


def test_eleven_hundred_mapped_files_one_truncated_keeps_its_bytes(tmp_path):
    """With leases, 1,100 mapped files (more leases than a quarter of the descriptor limit falls
    back on copies): the truncated one's tensors keep their bytes."""
    r = child(
        """
        import os, resource, sys, torch, safetensors.torch as st
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # the usual default: 256 leases
        import diffsynth_c
        folder = sys.argv[1]
        paths = [os.path.join(folder, f"m{i}.safetensors") for i in range(1100)]
        for i, p in enumerate(paths):
            st.save_file({"a": torch.full((4096,), float(i)), "b": torch.full((4096,), float(i))}, p)
        sds = [diffsynth_c.load_state_dict(p) for p in paths]
        for k in (3, 1050):
            os.truncate(paths[k], 4096)
        print("same", all(float(sds[k][n].sum()) == k * 4096.0 for k in (3, 1050) for n in "ab"))
    """,
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "same True", r.stdout + r.stderr


def test_read_mode_tensors_do_not_depend_on_the_file(tmp_path, monkeypatch):
    p = str(tmp_path / "m.safetensors")
    safetensors.torch.save_file({"a": torch.arange(1 << 16, dtype=torch.float32)}, p)
    monkeypatch.setenv("DIFFSYNTH_C_LOAD_MODE", "read")
    sd = diffsynth_c.load_state_dict(p)
    os.truncate(p, 0)
    assert float(sd["a"].sum()) == float(torch.arange(1 << 16, dtype=torch.float32).sum())


def test_tensors_outlive_their_disk_map_and_file(tmp_path):
    import gc

    p = str(tmp_path / "m.safetensors")
    ref = torch.randn(1000, 100)
    safetensors.torch.save_file({"w": ref}, p)
    dm = diffsynth_c.DiskMap(p, "cpu")
    t = dm["w"]
    del dm
    gc.collect()
    os.unlink(p)  # the mapping keeps the inode
    assert torch.equal(t, ref)


LEAK = """
import gc, json, os, sys, torch, safetensors.torch as st, diffsynth_c
path, rounds = sys.argv[1], int(sys.argv[2])
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
for mode in ("mmap", "read"):
    os.environ["DIFFSYNTH_C_LOAD_MODE"] = mode
    for _ in range(2):  # warm-up: allocator arenas, imports
        sd = diffsynth_c.load_state_dict(path, torch_dtype=torch.float16); del sd
    gc.collect()
    start = rss()
    for _ in range(rounds):
        sd = diffsynth_c.load_state_dict(path)
        sd2 = diffsynth_c.load_state_dict(path, torch_dtype=torch.float16)
        del sd, sd2
    gc.collect()
    print(json.dumps({"mode": mode, "start": start, "end": rss()}))
"""


@pytest.mark.parametrize("size_mib,rounds", [(1024, 200)] if LONG else [(64, 200)])
def test_load_and_drop_returns_memory(tmp_path, size_mib, rounds):
    p = str(tmp_path / "m.safetensors")
    n = size_mib << 20
    safetensors.torch.save_file({f"t{i}": torch.zeros(n // 16 // 4) for i in range(16)}, p)
    r = child(LEAK, p, str(rounds), timeout=3000)
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():
        m = json.loads(line)
        # within 5% of the starting resident memory (plus one page-table's worth of slack)
        assert m["end"] <= m["start"] * 1.05 + (4 << 20), m


def test_sixteen_threads_on_one_disk_map_and_many_files(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    paths = []
    for i in range(4):
        p = str(tmp_path / f"f{i}.safetensors")
        g = torch.Generator().manual_seed(i)
        safetensors.torch.save_file(
            {f"k{j}": torch.randn(64, 64 + j, generator=g).to(torch.bfloat16) for j in range(40)}, p
        )
        paths.append(p)
    dm = diffsynth_c.DiskMap(paths[0], "cpu", torch_dtype=torch.float32)
    serial_keys = {k: dm[k] for k in dm}
    serial_files = [diffsynth_c.load_state_dict(p, torch_dtype=torch.float16) for p in paths]

    def job(i):
        if i % 2:
            return "map", {k: dm[k] for k in list(dm)[i % 7 :: 3]}
        return "file", (i % 4, diffsynth_c.load_state_dict(paths[i % 4], torch_dtype=torch.float16))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(job, range(64)))
    for kind, value in results:
        if kind == "map":
            assert all(torch.equal(v, serial_keys[k]) for k, v in value.items())
        else:
            i, sd = value
            assert list(sd) == list(serial_files[i]) and all(torch.equal(sd[k], serial_files[i][k]) for k in sd)


def test_ctrl_c_stops_a_long_load_promptly_and_frees_its_buffers(tmp_path):
    p = str(tmp_path / "big.safetensors")
    # F32 -> F16 is converted by the C core while it reads (U8 would be converted by torch afterwards)
    safetensors.torch.save_file({f"t{i}": torch.zeros(8 << 20, dtype=torch.float32) for i in range(16)}, p)  # 512 MiB
    r = child(
        """
        import json, os, signal, sys, threading, time, torch, diffsynth_c
        # a shell's background job starts with SIGINT ignored, and Python then keeps it ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        path = sys.argv[1]
        os.environ["DIFFSYNTH_C_LOAD_MODE"] = "read"; os.environ["DIFFSYNTH_C_THREADS"] = "1"
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        start = rss()
        outcomes = []
        for attempt in range(5):
            os.sync()  # dirty pages cannot be dropped: write them first
            fd = os.open(path, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
            threading.Timer(0.02, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
            t = time.perf_counter()
            try:
                diffsynth_c.load_state_dict(path, torch_dtype=torch.float16)  # converts: slow enough to interrupt
                outcomes.append("finished")
                time.sleep(0.1)
            except KeyboardInterrupt:
                outcomes.append(time.perf_counter() - t)
                break
        print(json.dumps({"outcomes": outcomes, "grown": rss() - start}))
    """,
        p,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    interrupted = [o for o in out["outcomes"] if o != "finished"]
    assert interrupted, f"the load always finished before Ctrl-C: {out}"
    assert interrupted[0] < 5.0  # promptly: well before a full 512 MiB conversion on a loaded machine
    assert out["grown"] < 64 << 20  # the 256 MiB output buffer was freed


def _raw_safetensors(path, header: dict, data: bytes = b"") -> str:
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)
    return str(path)


def test_a_header_claiming_huge_shapes_is_refused(tmp_path):
    p = _raw_safetensors(
        tmp_path / "huge.safetensors",
        {"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}},
        b"\0" * 16,
    )
    with pytest.raises(diffsynth_c.FormatError, match=r"huge.safetensors: .*'w'"):
        diffsynth_c.load_state_dict(p)
    with pytest.raises(diffsynth_c.FormatError):
        diffsynth_c.hash_model_file(p)


def test_a_header_over_the_format_cap_is_refused(tmp_path):
    p = tmp_path / "cap.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001) + b"{" + b" " * 16)
    with pytest.raises(diffsynth_c.FormatError, match=r"cap.safetensors: .*100000001"):
        diffsynth_c.load_state_dict(str(p))


@pytest.mark.skipif(
    os.environ.get("DIFFSYNTH_C_EXPECT_SANITIZED") == "1",
    reason="AddressSanitizer's shadow memory makes the memory bound meaningless (and large)",
)
def test_a_million_tiny_tensors_load(tmp_path):
    n = 1_000_000
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    p = _raw_safetensors(tmp_path / "many.safetensors", header, bytes(range(256)) * (n // 256) + bytes(range(n % 256)))
    r = child(
        """
        import sys, diffsynth_c
        sd = diffsynth_c.load_state_dict(sys.argv[1])
        assert len(sd) == 1_000_000 and int(sd["t999999"]) == 999999 % 256
        print(diffsynth_c.hash_model_file(sys.argv[1]))
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec
        with open("/proc/self/status") as f:
            print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) // 1024)
    """,
        p,
    )
    assert r.returncode == 0, r.stderr
    peak_mib = int(r.stdout.split()[-1])
    assert peak_mib < 4096, peak_mib  # a million tensors stay in the low gigabytes of Python objects
