"""Offloaded inference: time per forward of a stack of DiT blocks, resident and offloaded, with
DiffSynth's VRAM-managed layers and with ours, same run.

    python benchmarks/offload.py                       # CUDA when there is a GPU: hidden 3072, 8 GiB bf16
    python benchmarks/offload.py --device cpu          # what a machine without a GPU can show
    python benchmarks/offload.py --gib 2 --tokens 1024 --repeat 5 --markdown out.md

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
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from common import machine, peak_rss_mib, report, reset_peak_rss, rss_mib, table_record, write_json

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
    args = ap.parse_args()
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
