"""GPU loading benchmark: page cache -> GPU memory, diffsynth_c against DiffSynth and the peers.

    python benchmarks/gpu_load.py [--size-gib 4] [--shards 4] [--repeat 3] [--check] [--json FILE]

Same files, same run. For each loader: median seconds until every tensor is in GPU memory
(torch.cuda.synchronize() included) with the page cache warm, GB/s of file bytes, and whether its
tensors equal DiffSynth's bit for bit. Ceiling: this machine's pinned host-to-device copy
bandwidth (one large cudaMemcpy from pinned memory, as torch issues it). Then the kernels: cast
and norm bandwidth as a fraction of the device's own copy bandwidth (a large device-to-device
copy). --check exits 1 when a target of the issue is missed (load >= 80% of the ceiling and >= 3x
DiffSynth; cast >= 85% and norms >= 80% of copy bandwidth). Without a CUDA device it says why and
exits 0 (nothing to measure).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from common import generate_model, machine, table, table_record, warm_cache, write_json

OURS = "diffsynth_c"


def pinned_h2d_gbps(nbytes: int = 1 << 30, repeat: int = 5) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


def device_time(fn, repeat: int = 10) -> float:
    """Median seconds of fn on the GPU (CUDA events)."""
    fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def loaders() -> dict[str, object]:
    from peers import GPU_PEERS, UNAVAILABLE, available_peers

    import diffsynth_c

    def ours(paths, torch_dtype=None):
        sd = diffsynth_c.load_state_dict(paths, torch_dtype=torch_dtype, device="cuda")
        torch.cuda.synchronize()
        return sd

    out = {OURS: ours}
    for name in available_peers("cuda"):
        if name != "tensorizer":  # reads its own format: see benchmarks/load.py
            out[name] = GPU_PEERS[name]
    for name, why in UNAVAILABLE.items():
        print(f"  left out: {name}: {why}")
    return out


def same(a: dict, b: dict) -> bool:
    if list(a) != list(b) and sorted(a) != sorted(b):
        return False
    for k, y in b.items():
        x = a[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.numel() and not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    return True


def bench_loads(paths: list[str], dtype, repeat: int) -> list[list[str]]:
    nbytes = sum(os.path.getsize(p) for p in paths)
    runs = loaders()
    reference = runs["diffsynth"](paths, dtype) if "diffsynth" in runs else None
    times: dict[str, list[float]] = {n: [] for n in runs}
    identical: dict[str, str] = {}
    for r in range(repeat):
        for name, fn in runs.items() if r % 2 == 0 else reversed(list(runs.items())):
            warm_cache(paths)
            gc.collect()
            torch.cuda.empty_cache()
            t = time.perf_counter()
            try:
                sd = fn(paths, dtype)
            except Exception as e:  # noqa: BLE001 - a peer failing is a row, not a crash
                identical[name] = f"failed: {type(e).__name__}: {e}"[:120]
                continue
            times[name].append(time.perf_counter() - t)
            if r == 0:
                identical[name] = "reference" if reference is None else str(same(sd, reference))
            del sd
    ours = statistics.median(times[OURS])
    rows = []
    for name in runs:
        if not times[name]:
            rows.append([name, "-", "-", "-", identical.get(name, "")])
            continue
        s = statistics.median(times[name])
        rows.append([name, f"{s:.3f}", f"{nbytes / s / 1e9:.2f}", f"{s / ours:.2f}x", identical.get(name, "")])
    return rows


def bench_kernels() -> tuple[list[list[str]], dict[str, float]]:
    import diffsynth_c.kernels as k

    n = 1 << 28
    x = torch.randn(n, device="cuda")
    copy_s = device_time(lambda: torch.empty_like(x).copy_(x))
    copy_bw = 2 * x.nbytes / copy_s / 1e9
    rows, frac = [["D2D copy (torch)", f"{copy_bw:.0f}", "1.00", ""]], {}
    for src, dst in (
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float8_e4m3fn),
    ):
        a = x.to(src)
        out = torch.empty(n, dtype=dst, device="cuda")
        s = device_time(lambda a=a, out=out: k.cast(a, out))
        bw = n * (a.element_size() + out.element_size()) / s / 1e9
        torch_s = device_time(lambda a=a, out=out: out.copy_(a))
        name = f"cast {str(src)[6:]}->{str(dst)[6:]}"
        rows.append(
            [
                name,
                f"{bw:.0f}",
                f"{bw / copy_bw:.2f}",
                f"torch {n * (a.element_size() + out.element_size()) / torch_s / 1e9:.0f}",
            ]
        )
        frac[name] = bw / copy_bw
    for cols in (1024, 2048, 4096, 8192):
        rows_n = (1 << 27) // cols
        a = torch.randn(rows_n, cols, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
        for kind, fn in (
            ("rms_norm", lambda a=a, w=w: k.rms_norm(a, w, 1e-6)),
            ("layer_norm", lambda a=a, w=w, b=b: k.layer_norm(a, w, b, 1e-5)),
        ):
            s = device_time(fn)
            bw = 2 * a.nbytes / s / 1e9
            name = f"{kind} bf16 h={cols}"
            rows.append([name, f"{bw:.0f}", f"{bw / copy_bw:.2f}", ""])
            frac[name] = bw / copy_bw
        del a
    return rows, frac


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--check", action="store_true")
    ap.add_argument(
        "--json",
        default=None,
        help="also write the figures to this file (benchmarks/report.py); not written when there is no GPU",
    )
    args = ap.parse_args()
    import diffsynth_c
    from diffsynth_c.kernels import cuda_status

    if not (torch.cuda.is_available() and diffsynth_c.cuda_available()):
        print(
            f"gpu_load: nothing to measure here: torch CUDA {torch.cuda.is_available()}, diffsynth_c: {cuda_status()}"
        )
        return 0
    print(machine(), "|", torch.cuda.get_device_name())
    paths = generate_model("qwen-image-dit", args.size_gib, args.shards, "bfloat16")
    ceiling = pinned_h2d_gbps()
    print(f"pinned host-to-device ceiling: {ceiling:.2f} GB/s")
    misses, tables, loads = [], [], {}
    load_header = ["loader", "s", "GB/s", "time / ours", "identical to DiffSynth"]
    for label, dtype in (("bf16 file, as stored", None), ("bf16 file -> float32", torch.float32)):
        rows = bench_loads(paths, dtype, args.repeat)
        print(f"\n{label} (page cache warm -> GPU)")
        print(table(rows, load_header))
        tables.append(table_record(f"{label} (page cache warm -> GPU)", load_header, rows))
        loads[label] = {r[0]: {"s": float(r[1]), "gbps": float(r[2])} for r in rows if r[1] != "-"}
        ours = next(r for r in rows if r[0] == OURS)
        ds = next((r for r in rows if r[0] == "diffsynth"), None)
        share = float(ours[2]) / ceiling
        print(
            f"ours: {share:.0%} of the pinned copy ceiling"
            + (f", {ds[3]} DiffSynth's time" if ds and ds[3] != "-" else "")
        )
        if dtype is None:
            if share < 0.8:
                misses.append(f"load at {share:.0%} of the ceiling (target 80%)")
            if ds and ds[3] != "-" and float(ds[3][:-1]) < 3:
                misses.append(f"load {ds[3]} faster than DiffSynth (target 3x)")
    rows, frac = bench_kernels()
    print("\nkernels (GB/s moved, fraction of the device's copy bandwidth)")
    print(table(rows, ["kernel", "GB/s", "of copy", "reference"]))
    tables.append(
        table_record(
            "kernels (GB/s moved, fraction of the device's copy bandwidth)",
            ["kernel", "GB/s", "of copy", "reference"],
            rows,
        )
    )
    misses += [f"{n}: {f:.0%}" for n, f in frac.items() if f < (0.85 if n.startswith("cast") else 0.8)]
    for m in misses:
        print("MISSED:", m)
    write_json(
        args.json,
        "gpu_load",
        {
            "gpu": torch.cuda.get_device_name(),
            "size_bytes": sum(os.path.getsize(p) for p in paths),
            "repeat": args.repeat,
            "pinned_h2d_gbps": ceiling,
            "loads": loads,
            "kernels": {r[0]: float(r[1]) for r in rows},
            "kernel_fraction_of_copy": frac,
            "missed": misses,
            "tables": tables,
        },
    )
    return 1 if (args.check and misses) else 0


if __name__ == "__main__":
    sys.exit(main())
