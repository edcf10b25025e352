"""Offloaded inference: time per forward of a stack of DiT blocks, resident and offloaded, with
DiffSynth's VRAM-managed layers and with ours, same run.

    python benchmarks/offload.py                       # CUDA when there is a GPU: hidden 3072, 8 GiB bf16
    python benchmarks/offload.py --device cpu          # what a machine without a GPU can show
    python benchmarks/offload.py --gib 2 --tokens 1024 --repeat 5 --markdown out.md
    python benchmarks/offload.py --device cpu --pressure --gib 3 --hidden 2048 --tokens 16 --rounds 2

The blocks have Qwen-Image's shapes (hidden 3072: a 6x modulation linear, qkv, out, a 4x MLP, a
LayerNorm and an RMSNorm per block), as many as fit --gib of bf16 weights. Modes: resident (all
weights on the computation device), CPU offload in bf16, CPU offload with fp8 storage, disk offload
(weights read from a safetensors file each forward, bf16), each with ``vram_limit=0`` (nothing
kept on the device). Each forward is timed after one warm-up pass (the pass in which our scheduler
learns the layer order); the median of --repeat is printed with the ratios to resident and to
DiffSynth's layers, and, for offloaded modes, the bytes carried per forward and the GB/s achieved.
The pinned host-to-device bandwidth of the machine (one exact-size registered buffer) is measured
in the same run. DiffSynth's columns are left out where DiffSynth is not installed. On the CPU,
where torch has no mem_get_info, the CPU's memory is reported full to both implementations.

--pressure measures the smaller-than-the-model row instead: a model of --gib bf16 (these blocks,
4 shards, kept in the bench folder) loaded as a new user would, ``load_model`` with ``vram_config``
all "disk", computing bf16 on the CPU, inside a fresh cgroup v1 memory group (created under
ours in /sys/fs/cgroup/memory, removed at the end) limited to --limit times the weight bytes (default 0.5), --passes
forward passes of --tokens tokens. DiffSynth plain and DiffSynth patched by diffsynth_c run in fresh
processes, alternating, --rounds times, the files' pages dropped before each. Printed: load_model
time, the first pass (ours learns the layer order in it) and the median and range of the others,
peak memory of the group, whether the outputs are equal; the files' cold read ceiling in the same
group (8 threads streaming, through the page cache and with O_DIRECT), the bytes/ceiling bound of a
pass, and the pass with the weights resident (measured on as many blocks as fit a quarter of the
limit, scaled to the model's).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from common import (
    BenchError,
    bench_dir,
    drop_cache,
    machine,
    make_cgroup,
    peak_rss_mib,
    remove_cgroup,
    report,
    reset_peak_rss,
    rss_mib,
    stream_ceiling,
    table_record,
    write_json,
)

BF16, F8 = torch.bfloat16, torch.float8_e4m3fn


class Block(torch.nn.Module):
    """One DiT block with Qwen-Image's weight shapes (attention reduced to its projections)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mod = torch.nn.Linear(hidden, 6 * hidden)
        self.norm1 = torch.nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.out = torch.nn.Linear(hidden, hidden)
        self.norm2 = torch.nn.RMSNorm(hidden, eps=1e-6)
        self.fc1 = torch.nn.Linear(hidden, 4 * hidden)
        self.fc2 = torch.nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale, gate, shift2, scale2, gate2 = self.mod(temb).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale) + shift
        q, _k, v = self.qkv(h).chunk(3, dim=-1)
        x = x + gate * self.out(torch.nn.functional.silu(q) * v)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(torch.nn.functional.gelu(self.fc1(h), approximate="tanh"))


class Stack(torch.nn.Module):
    def __init__(self, hidden: int, blocks: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(hidden) for _ in range(blocks))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x, temb)
        return x


def build(hidden: int, gib: float) -> Stack:
    per_block = 2 * (hidden * 6 * hidden + hidden * 3 * hidden + hidden * hidden + 8 * hidden * hidden)
    blocks = max(1, int(gib * (1 << 30) // per_block))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Stack(hidden, blocks)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.data = (torch.randn(p.shape, generator=g) * 0.02).to(BF16)
    return model


def vram_config(stored: str, device: str) -> dict:
    dtype, where = {"cpu_bf16": (BF16, "cpu"), "cpu_fp8": (F8, "cpu"), "disk": ("disk", "disk")}[stored]
    prep = (BF16, device) if stored == "disk" else (dtype, where)
    return {
        "offload_dtype": dtype,
        "offload_device": where,
        "onload_dtype": dtype,
        "onload_device": where,
        "preparing_dtype": prep[0],
        "preparing_device": prep[1],
        "computation_dtype": BF16,
        "computation_device": device,
    }


def pinned_h2d_gbs(nbytes: int = 1 << 30) -> float | None:
    """GB/s of one host-to-device copy from an exact-size registered buffer (best of 3)."""
    if not torch.cuda.is_available():
        return None
    host = torch.empty(nbytes, dtype=torch.uint8)
    torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
    return best


def managed(impl: str, base: Stack, stored: str, device: str, path: str) -> torch.nn.Module:
    """base wrapped by impl's layers (diffsynth_c or diffsynth) for one offload mode, onloaded."""
    if impl == "diffsynth":
        from diffsynth.core.vram import layers as lib
    else:
        from diffsynth_c.vram import layers as lib
    mm = {
        torch.nn.Linear: lib.AutoWrappedLinear,
        torch.nn.LayerNorm: lib.AutoWrappedModule,
        torch.nn.RMSNorm: lib.AutoWrappedModule,
    }
    disk_map = None
    model = copy.deepcopy(base)
    if stored == "disk":
        from diffsynth_c import DiskMap as Ours

        if impl == "diffsynth":
            from diffsynth.core import DiskMap as Theirs
        disk_map = (Theirs if impl == "diffsynth" else Ours)(path, device)
        model = model.to("meta")
    model = lib.enable_vram_management(model, mm, vram_config(stored, device), vram_limit=0, disk_map=disk_map)
    for m in model.modules():
        if hasattr(m, "onload") and m is not model:
            m.onload()
    return model


def timed(model: torch.nn.Module, x: torch.Tensor, temb: torch.Tensor, repeat: int) -> tuple[float, float]:
    """(median seconds per forward after one warm-up, peak RSS MiB above the start)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    start = rss_mib()
    reset_peak_rss()
    times = []
    with torch.no_grad():
        for i in range(repeat + 1):
            sync()
            t = time.perf_counter()
            model(x, temb)
            sync()
            if i:
                times.append(time.perf_counter() - t)
    return statistics.median(times), max(0.0, peak_rss_mib() - start)


# ---- the smaller-than-the-model row (--pressure) --------------------------------------------

DISK_CONFIG_KEYS = ("offload", "onload", "preparing")


def pressure_files(hidden: int, gib: float, shards: int = 4) -> tuple[list[str], int]:
    """The model's shards (written once, one shard in memory at a time) and its block count."""
    import safetensors.torch

    per_block = 2 * 18 * hidden * hidden
    blocks = max(1, int(gib * (1 << 30) // per_block))
    folder = os.path.join(bench_dir(), f"offload-stack-h{hidden}-b{blocks}-{shards}x")
    paths = [os.path.join(folder, f"model-{i + 1:05d}-of-{shards:05d}.safetensors") for i in range(shards)]
    if not os.path.exists(os.path.join(folder, ".complete")):
        os.makedirs(folder, exist_ok=True)
        with torch.device("meta"):
            names = [(k, v.shape) for k, v in Stack(hidden, blocks).state_dict().items()]
        per = (len(names) + shards - 1) // shards
        g = torch.Generator().manual_seed(0)
        for i, path in enumerate(paths):
            sd = {k: (torch.randn(shape, generator=g) * 0.02).to(BF16) for k, shape in names[i * per : (i + 1) * per]}
            safetensors.torch.save_file(sd, path)
            del sd
        open(os.path.join(folder, ".complete"), "w").close()
    return paths, blocks


def _group_peak(group: str, reset: bool = False) -> int:
    name = os.path.join(group, "memory.max_usage_in_bytes")
    with open(name) as f:
        peak = int(f.read())
    if reset:
        with open(name, "w") as f:
            f.write("0")
    return peak


def run_in_group(group: str, argv: list[str], timeout: int = 1800) -> dict:
    """One child of this script in the memory group; its last stdout line (JSON), or its error."""

    def enter() -> None:
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    _group_peak(group, reset=True)
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv],
        preexec_fn=enter,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines or not lines[-1].startswith("{"):
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {r.returncode}: {tail[:300]}", "group_peak": _group_peak(group)}
    return {**json.loads(lines[-1]), "group_peak": _group_peak(group)}


def pressure_child(impl: str, paths: list[str], hidden: int, blocks: int, tokens: int, passes: int) -> None:
    """In the group: load_model with every state on disk, then the passes; prints one JSON line."""
    import hashlib

    if impl == "diffsynth_c":
        import diffsynth_c

        diffsynth_c.patch_diffsynth()
    from diffsynth.core.loader.model import load_model
    from diffsynth.core.vram import layers as lib

    if not hasattr(torch.cpu, "mem_get_info"):
        torch.cpu.mem_get_info = lambda device=None: (0, 1 << 40)
    mm = {torch.nn.Linear: lib.AutoWrappedLinear, torch.nn.LayerNorm: lib.AutoWrappedModule}
    mm[torch.nn.RMSNorm] = lib.AutoWrappedModule
    config = {f"{s}_{k}": "disk" for s in DISK_CONFIG_KEYS for k in ("dtype", "device")}
    config.update(computation_dtype=BF16, computation_device="cpu")
    t = time.perf_counter()
    model = load_model(
        Stack, paths, config={"hidden": hidden, "blocks": blocks}, module_map=mm, vram_config=config, vram_limit=0
    )
    load_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, hidden, generator=g).to(BF16)
    temb = torch.randn(1, hidden, generator=g).to(BF16)
    times = []
    with torch.no_grad():
        for _ in range(passes):
            t = time.perf_counter()
            y = model(x, temb)
            times.append(time.perf_counter() - t)
    digest = hashlib.sha256(y.contiguous().view(torch.int16).numpy().tobytes()).hexdigest()[:16]
    print(json.dumps({"load_s": load_s, "pass_s": times, "output": digest, "max_rss_mib": peak_rss_mib()}))


def ceiling_child(paths: list[str]) -> None:
    out = {}
    for direct in (False, True):
        drop_cache(paths)
        out["direct" if direct else "buffered"] = stream_ceiling(paths, threads=8, direct=direct)
    print(json.dumps(out))


def resident_child(hidden: int, blocks: int, tokens: int, passes: int) -> None:
    model = build(hidden, blocks * 2 * 18 * hidden * hidden / (1 << 30) + 1e-9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, hidden, generator=g).to(BF16)
    temb = torch.randn(1, hidden, generator=g).to(BF16)
    t, _ = timed(model, x, temb, passes)
    print(json.dumps({"pass_s": t, "blocks": len(model.blocks)}))


def pressure(args: argparse.Namespace) -> None:
    hidden = args.hidden or 2048
    gib = args.gib or 3.0
    tokens = args.tokens or 16
    per_block = 2 * 18 * hidden * hidden
    limit = int(max(1, int(gib * (1 << 30) // per_block)) * per_block * args.limit)
    try:
        group = make_cgroup(limit, "--pressure")  # first: without a group, no model is written
    except BenchError as e:
        print(f"offload: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        pressure_runs(args, group, hidden, gib, tokens, per_block, limit)
    finally:
        remove_cgroup(group)


def pressure_runs(
    args: argparse.Namespace, group: str, hidden: int, gib: float, tokens: int, per_block: int, limit: int
) -> None:
    paths, blocks = pressure_files(hidden, gib)
    weights = sum(os.path.getsize(p) for p in paths)
    common = ["--hidden", str(hidden), "--tokens", str(tokens), "--passes", str(args.passes)]
    ceiling = run_in_group(group, ["--child", "ceiling", *paths])
    fit = max(1, min(blocks, limit // 4 // per_block))
    resident = run_in_group(group, ["--child", "resident", "--blocks", str(fit), *common])
    results: dict[str, list] = {"diffsynth": [], "diffsynth_c": []}
    for _ in range(args.rounds):
        for impl, runs in results.items():
            drop_cache(paths)
            runs.append(run_in_group(group, ["--child", impl, "--blocks", str(blocks), *common, *paths]))
    best = max(ceiling.get("direct", 0.0), ceiling.get("buffered", 0.0))
    bound = weights / best / 1e9 if best else float("nan")
    resident_pass = resident["pass_s"] * blocks / resident["blocks"] if "pass_s" in resident else float("nan")
    outputs = {r.get("output") for rs in results.values() for r in rs if "output" in r}
    rows = []
    for impl, runs in results.items():
        ok = [r for r in runs if "pass_s" in r]
        later = [t for r in ok for t in r["pass_s"][1:]]
        first = [r["pass_s"][0] for r in ok]
        med = statistics.median(later) if later else float("nan")
        rows.append(
            [
                impl,
                f"{len(ok)}/{len(runs)}" + ("" if len(ok) == len(runs) else f" ({runs[0].get('error', '')})"),
                f"{statistics.median(r['load_s'] for r in ok):.2f}" if ok else "",
                f"{statistics.median(first):.2f}" if first else "",
                f"{med:.2f} [{min(later):.2f}-{max(later):.2f}]" if later else "",
                f"{med / bound:.2f}x" if later else "",
                f"{max(r['group_peak'] for r in runs) / (1 << 20):.0f}",
                f"{max(r['max_rss_mib'] for r in ok):.0f}" if ok else "",
            ]
        )
    head = ["layers", "finished", "load_model s", "pass 1 s", "passes 2+ s, median [range]", "vs bytes/ceiling"]
    head += ["group peak MiB", "max RSS MiB"]
    what = (
        f"offload --pressure: {blocks} blocks, hidden {hidden}, {weights / 1e9:.2f} GB bf16 in {len(paths)} shards, "
        f"disk offload, {tokens} tokens, cgroup limit {limit / (1 << 20):.0f} MiB, {args.rounds} rounds"
    )
    report(f"# {what}; {machine()}", rows, head, args.markdown)
    print(
        f"cold read ceiling (8 threads, in the group): {ceiling.get('buffered', 0):.2f} GB/s through the page cache, "
        f"{ceiling.get('direct', 0):.2f} GB/s O_DIRECT; bytes/ceiling {bound:.2f} s; resident pass "
        f"{resident_pass:.2f} s (measured on {resident.get('blocks')} blocks); same output: {len(outputs) == 1}"
    )
    write_json(
        args.json,
        "offload_pressure",
        {
            "blocks": blocks,
            "hidden": hidden,
            "tokens": tokens,
            "weights_bytes": weights,
            "limit_bytes": limit,
            "ceiling_gbps": ceiling,
            "bound_s": bound,
            "resident_pass_s": resident_pass,
            "runs": results,
            "same_output": len(outputs) == 1,
            "table": table_record(what, head, rows),
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--gib", type=float, default=None, help="bf16 weights (default 8 on CUDA, 0.5 on CPU)")
    ap.add_argument("--hidden", type=int, default=None, help="default 3072 on CUDA, 1024 on CPU")
    ap.add_argument("--tokens", type=int, default=None, help="default 4096 on CUDA, 256 on CPU")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="cpu_bf16,cpu_fp8,disk")
    ap.add_argument("--markdown", default=None, help="also write the table here")
    ap.add_argument("--json", default=None, help="also write the figures to this file (for benchmarks/report.py)")
    ap.add_argument("--pressure", action="store_true", help="the disk row in a memory cgroup smaller than the model")
    ap.add_argument("--limit", type=float, default=0.5, help="--pressure: the group's limit, times the weight bytes")
    ap.add_argument("--rounds", type=int, default=2, help="--pressure: processes per implementation, alternating")
    ap.add_argument("--passes", type=int, default=3, help="--pressure: forward passes per process")
    ap.add_argument("--blocks", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "ceiling":
        return ceiling_child(args.paths)
    if args.child == "resident":
        return resident_child(args.hidden, args.blocks, args.tokens, args.passes)
    if args.child is not None:
        return pressure_child(args.child, args.paths, args.hidden, args.blocks, args.tokens, args.passes)
    if args.pressure:
        return pressure(args)
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not cuda:
        print(f"offload: nothing to measure on {args.device}: torch sees no CUDA device", file=sys.stderr)
        sys.exit(1)
    gib = args.gib or (8.0 if on_gpu else 0.5)
    hidden = args.hidden or (3072 if on_gpu else 1024)
    tokens = args.tokens or (4096 if on_gpu else 256)
    try:
        import diffsynth.core.vram.layers  # noqa: F401

        impls = ["diffsynth", "diffsynth_c"]
    except ImportError:
        impls = ["diffsynth_c"]
        print("DiffSynth is not installed here: its columns are left out", file=sys.stderr)

    base = build(hidden, gib)
    n_blocks = len(base.blocks)
    weights = sum(p.numel() for p in base.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, hidden, generator=g).to(BF16).to(args.device)
    temb = torch.randn(1, hidden, generator=g).to(BF16).to(args.device)
    h2d = pinned_h2d_gbs() if on_gpu else None
    if not on_gpu and not hasattr(torch.cpu, "mem_get_info"):
        # DiffSynth reads the free memory of the computation device through torch.<type>.mem_get_info,
        # which torch has not for the CPU: report it full, so that vram_limit=0 keeps every weight
        # offloaded for both implementations
        torch.cpu.mem_get_info = lambda device=None: (0, 1 << 40)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stack.safetensors")
        import safetensors.torch

        safetensors.torch.save_file({k: v.contiguous() for k, v in base.state_dict().items()}, path)
        rows, results = [], {}
        resident = copy.deepcopy(base).to(args.device)
        results[("resident", "-")] = timed(resident, x, temb, args.repeat)
        del resident
        for stored in args.modes.split(","):
            for impl in impls:
                model = managed(impl, base, stored, args.device, path)
                results[(stored, impl)] = timed(model, x, temb, args.repeat)
                del model
                if on_gpu:
                    torch.cuda.empty_cache()
    t_res = results[("resident", "-")][0]
    for (stored, impl), (t, rss) in results.items():
        # bytes each forward moves or converts (CPU offload in bf16 on the CPU moves nothing)
        carried = (
            0
            if stored == "resident" or (stored == "cpu_bf16" and not on_gpu)
            else weights * (1 if stored == "cpu_fp8" else 2)
        )
        theirs = results.get((stored, "diffsynth"))
        rows.append(
            [
                stored,
                impl,
                f"{t * 1000:.1f}",
                f"{t / t_res:.2f}x",
                f"{theirs[0] / t:.2f}x" if theirs and impl == "diffsynth_c" else "",
                f"{carried / t / 1e9:.1f}" if carried else "",
                f"{rss:.0f}",
            ]
        )
    head = ["mode", "layers", "ms/forward", "vs resident", "DiffSynth/ours", "GB/s carried", "peak RSS +MiB"]
    what = (
        f"offload: {n_blocks} blocks, hidden {hidden}, {weights * 2 / (1 << 30):.2f} GiB bf16, {tokens} tokens, "
        f"{args.device}"
    )
    report(f"# {what}; {machine()}" + (f"; pinned H2D {h2d:.1f} GB/s" if h2d else ""), rows, head, args.markdown)
    write_json(
        args.json,
        "offload",
        {
            "device": args.device,
            "blocks": n_blocks,
            "hidden": hidden,
            "tokens": tokens,
            "repeat": args.repeat,
            "weights_bytes": weights * 2,
            "pinned_h2d_gbps": h2d,
            "modes": [
                {"mode": m, "layers": impl, "ms": t * 1e3, "peak_rss_mib": rss}
                for (m, impl), (t, rss) in results.items()
            ],
            "table": table_record(what, head, rows),
        },
    )


if __name__ == "__main__":
    main()
