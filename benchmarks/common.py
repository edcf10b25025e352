"""Shared pieces of the benchmarks: realistic model files, the page-touch that makes a load count
only when its bytes are really in memory, page-cache control, the machine's own ceiling, and
running one load in a fresh process so each loader's time and peak memory are its own.

Model files take the names and shapes of a real DiffSynth model (Qwen-Image's DiT, built on the
meta device: no weights are downloaded), its first blocks up to the size asked for, sharded as
diffusers shards them, with random bf16 values.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # the scripts run as benchmarks/x.py from a checkout: the package is at ROOT
    sys.path.insert(1, ROOT)
GIB = 1 << 30


CGROUP_V1 = os.environ.get("DIFFSYNTH_C_CGROUP_V1", "/sys/fs/cgroup/memory")  # the tests point it elsewhere


class BenchError(Exception):
    """Bad input or a machine the benchmark cannot run on; the message says what to do."""


def bench_dir() -> str:
    d = os.environ.get("DIFFSYNTH_C_BENCH_DIR", os.path.join("/tmp", "diffsynth_c_bench"))
    os.makedirs(d, exist_ok=True)
    return d


# ---- model files ---------------------------------------------------------------------------


def qwen_image_layout() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of DiffSynth's QwenImageDiT at its published size, in
    state_dict order (built on the meta device)."""
    from diffsynth.core import skip_model_initialization
    from diffsynth.models.qwen_image_dit import QwenImageDiT

    with skip_model_initialization():
        model = QwenImageDiT()
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "transformer_blocks" else None


def truncated_layout(target_bytes: int, element_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """The non-block tensors plus the first blocks of Qwen-Image's DiT, enough for target_bytes."""
    layout = qwen_image_layout()
    numel = lambda shape: int(__import__("math").prod(shape))
    base = [(k, s) for k, s in layout if _block_of(k) is None]
    total = sum(numel(s) for _, s in base) * element_size
    keep_blocks = 0
    blocks = sorted({b for k, _ in layout if (b := _block_of(k)) is not None})
    for b in blocks:
        if total >= target_bytes:
            break
        total += sum(numel(s) for k, s in layout if _block_of(k) == b) * element_size
        keep_blocks = b + 1
    return [(k, s) for k, s in layout if _block_of(k) is None or _block_of(k) < keep_blocks]


def layout_tensors(layout: list[tuple[str, tuple[int, ...]]], dtype):
    """(name, tensor) for each entry of layout: random values of dtype, sliced at varying offsets of
    one pool of 32M values (fast to make, not all alike)."""
    import math

    import torch

    g = torch.Generator().manual_seed(0)
    pool = torch.randn(1 << 25, generator=g).to(dtype)
    for i, (key, shape) in enumerate(layout):
        n = math.prod(shape)
        start = (i * 7919) % (pool.numel() // 2)
        t = (
            pool[start : start + n].clone()
            if n <= pool.numel() - start
            else pool.repeat(n // pool.numel() + 1)[:n].clone()
        )
        yield key, t.reshape(shape)


def generate_model(name: str, size_gib: float, shards: int, dtype_name: str = "bfloat16") -> list[str]:
    """Writes (once; reused when present) a sharded model of about size_gib with safetensors'
    own writer, named as diffusers names shards. Returns the shard paths."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    folder = os.path.join(bench_dir(), f"{name}-{size_gib:g}GiB-{shards}x-{dtype_name}")
    paths = [
        os.path.join(folder, f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors") for i in range(shards)
    ]
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return paths
    os.makedirs(folder, exist_ok=True)
    element = torch.empty((), dtype=dtype).element_size()
    layout = truncated_layout(int(size_gib * GIB), element)
    total = sum(int(__import__("math").prod(s)) * element for _, s in layout)
    per_shard = total / shards
    shard, shard_bytes, index = {}, 0, 0
    for key, t in layout_tensors(layout, dtype):
        shard[key] = t
        shard_bytes += t.numel() * element
        if shard_bytes >= per_shard and index < shards - 1:
            save_file(shard, paths[index], metadata={"format": "pt"})
            shard, shard_bytes, index = {}, 0, index + 1
    save_file(shard, paths[index], metadata={"format": "pt"})
    for j in range(index + 1, shards):  # fewer tensors than shards: should not happen at these sizes
        save_file({}, paths[j])
    open(done, "w").close()
    return paths


def sparse_full_size_qwen_image(shards: int = 9) -> list[str]:
    """Qwen-Image's full DiT (20.4B parameters, 1933 tensors, 9 shards) with real headers and
    sparse data sections: enough for hashing, which reads headers only, at no disk cost."""
    folder = os.path.join(bench_dir(), f"qwen-image-dit-sparse-{shards}x")
    paths = [
        os.path.join(folder, f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors") for i in range(shards)
    ]
    if os.path.exists(os.path.join(folder, ".complete")):
        return paths
    os.makedirs(folder, exist_ok=True)
    layout = qwen_image_layout()
    per = (len(layout) + shards - 1) // shards
    for i, path in enumerate(paths):
        # as safetensors writes them: tensors (all bf16 here) in name order, offsets in that order
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape in sorted(layout[i * per : (i + 1) * per]):
            nbytes = int(__import__("math").prod(shape)) * 2
            header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)
    open(os.path.join(folder, ".complete"), "w").close()
    return paths


# ---- page cache, touching, memory ----------------------------------------------------------


def drop_cache(paths: list[str]) -> None:
    """Evicts the files' pages from the page cache (POSIX_FADV_DONTNEED works unprivileged)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:
            pass
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def warm_cache(paths: list[str]) -> None:
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def touch(state_dict) -> int:
    """Reads one byte of every 4 KiB page of every tensor: a lazily mapped tensor is not loaded
    until its pages are faulted in, so every loader is timed until this returns."""
    import torch

    s = 0
    for v in state_dict.values():
        if v.numel() == 0:
            continue
        b = v.reshape(-1).view(torch.uint8) if v.is_contiguous() else v.contiguous().reshape(-1).view(torch.uint8)
        s += int(b[::4096].sum())
    return s


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so a later peak is the load's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / (1 << 20)
    return 0.0


def _cpu_and_ram() -> tuple[str, float]:
    """The CPU's model name (/proc/cpuinfo) and the RAM in GiB (/proc/meminfo)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / (1 << 20)
    return cpu, mem


def machine() -> str:
    cpu, mem = _cpu_and_ram()
    return (
        f"{os.cpu_count()} x {cpu}, {mem:.0f} GiB RAM, Linux {platform.release()}, Python {platform.python_version()}"
    )


def machine_info() -> dict:
    """The machine as the report labels its plots: CPU model, cores, RAM, kernel, Python, and the
    one-line description the tables print (machine())."""
    cpu, mem = _cpu_and_ram()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "text": machine(),
    }


def write_json(path: str | None, benchmark: str, data: dict) -> None:
    """Writes a benchmark's results for benchmarks/report.py (when path is given): what was run,
    when, on which machine, and data (each script's figures plus its printed tables). The file is
    written under a temporary name and renamed, so a report never reads half a file."""
    if not path:
        return
    import datetime

    argv, shown = sys.argv[1:], []
    skip = False
    for a in argv:  # the command as a reader would rerun it: without the --json destination
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            shown.append(a)
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    doc = {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "command": " ".join(["python", script, *shown]),
        **data,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def table_record(title: str, header: list[str], rows: list[list]) -> dict:
    """A printed table as the results file keeps it (the report renders it again as markdown)."""
    return {"title": title, "header": list(header), "rows": [[str(c) for c in r] for r in rows]}


# ---- the machine's own ceiling ------------------------------------------------------------


def _run_threads(work, threads: int) -> float:
    """Seconds for `threads` threads all running work() to finish."""
    t = time.perf_counter()
    ts = [threading.Thread(target=work) for _ in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    return time.perf_counter() - t


def pread_ceiling(paths: list[str], threads: int = 4, chunk: int = 8 << 20, prefault: bool = True) -> float:
    """GB/s of pread from the files into one buffer with `threads` threads. prefault=True writes the
    buffer first, so this is the cost of copying alone; False includes first-touch faults."""
    import numpy as np

    sizes = [os.path.getsize(p) for p in paths]
    buf = np.empty(sum(sizes), dtype=np.uint8)
    if prefault:
        buf.fill(1)
    jobs, base = [], 0
    for p, size in zip(paths, sizes):
        for off in range(0, size, chunk):
            jobs.append((p, off, min(chunk, size - off), base + off))
        base += size
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    lock, it = threading.Lock(), iter(jobs)

    def work():
        mv = memoryview(buf)
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                return
            p, off, n, dst = job
            got = 0
            while got < n:
                got += os.preadv(fds[p], [mv[dst + got : dst + n]], off + got)

    dt = _run_threads(work, threads)
    for fd in fds.values():
        os.close(fd)
    return sum(sizes) / dt / 1e9


def stream_ceiling(paths: list[str], threads: int = 8, chunk: int = 4 << 20, direct: bool = False) -> float:
    """GB/s of reading the files once with `threads` threads, each into one reused buffer of chunk
    bytes (what a pass of disk offload needs: the files read, not kept), through the page cache or
    with O_DIRECT. Unlike pread_ceiling it needs no memory the size of the files, so it runs in a
    memory cgroup smaller than them."""
    import mmap

    jobs = [(p, off) for p in paths for off in range(0, os.path.getsize(p), chunk)]
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = {p: os.open(p, flags) for p in paths}
    lock, it = threading.Lock(), iter(jobs)

    def work():
        buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                return
            os.preadv(fds[job[0]], [buf], job[1])

    dt = _run_threads(work, threads)
    for fd in fds.values():
        os.close(fd)
    return sum(os.path.getsize(p) for p in paths) / dt / 1e9


def memcpy_ceiling(nbytes: int = 1 << 30) -> float:
    """GB/s of a single-threaded copy between two pre-faulted buffers."""
    import numpy as np

    a = np.ones(nbytes, dtype=np.uint8)
    b = np.ones(nbytes, dtype=np.uint8)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


# ---- one load in a fresh process ----------------------------------------------------------


@dataclass
class Result:
    loader: str
    call_s: float
    total_s: float
    peak_rss_mib: float
    bytes: int
    ok: bool | None
    error: str = ""

    @property
    def gbps(self) -> float:
        return self.bytes / self.total_s / 1e9 if self.total_s else 0.0


def run_one(loader: str, paths: list[str], dtype: str | None, cold: bool, verify: bool, timeout: int = 1800) -> Result:
    """Loads the files with one loader in a fresh Python process (see one_load.py)."""
    cmd = [sys.executable, os.path.join(HERE, "one_load.py"), loader, dtype or "none", "cold" if cold else "warm"]
    cmd += ["verify" if verify else "noverify", *paths]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode != 0 or not line.startswith("{"):
        err = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return Result(loader, 0.0, 0.0, 0.0, 0, None, err[:200])
    d = json.loads(line)
    return Result(loader, d["call_s"], d["total_s"], d["peak_rss_mib"], d["bytes"], d["ok"], d.get("error", ""))


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def report(title: str, rows: list[list[str]], header: list[str], markdown: str | None) -> None:
    """Prints the title line and the table; also writes the table to markdown when given."""
    print(title)
    print(table(rows, header))
    if markdown:
        with open(markdown, "w") as f:
            f.write(table(rows, header) + "\n")


# ---- memory cgroups (pipeline.py --limited, offload.py --pressure) ---------------------------


def make_cgroup(limit: int, option: str) -> str:
    """A fresh cgroup v1 memory group under ours (or the root), limited to limit bytes; the caller
    removes it (remove_cgroup). Raises BenchError with what to do when there is none to make
    (option: the benchmark option that asked for it, named in the message)."""
    if not os.path.isdir(CGROUP_V1):
        raise BenchError(
            f"{option} needs the cgroup v1 memory controller at {CGROUP_V1}, and this machine has none "
            f"(a cgroup v2-only machine): run without {option}, or on a machine with cgroup v1"
        )
    parent = CGROUP_V1
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    parent = os.path.join(CGROUP_V1, path.lstrip("/"))
    except OSError:
        pass
    path = os.path.join(parent, f"diffsynth_c_bench_{os.getpid()}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
    except OSError as e:
        raise BenchError(
            f"cannot create a memory cgroup at {path}: {e.strerror}; {option} needs root (or a delegated "
            "cgroup v1 memory hierarchy)"
        ) from None
    return path


def remove_cgroup(path: str) -> None:
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.1)
