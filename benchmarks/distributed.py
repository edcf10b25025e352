"""Loading under torch.distributed (gloo, local processes): bytes each rank reads and wall time,
with a process group (each byte read once across the ranks, then broadcast) against every rank
loading everything, same run.

    python benchmarks/distributed.py [--size-gib 0.5] [--shards 4] [--ranks 1 2 4] [--cold]

Wall time is the slowest rank's, from a barrier to its dict being complete (one byte of every page
of every tensor touched); "read" is what the
C reader read on each rank (and the kernel's rchar count for the process, which includes
headers and every other read). --cold drops the page cache before each run (needs root), as on a
first load from a network file system. One machine has one GPU at most, so NCCL cannot be shown;
these are gloo figures on CPU tensors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, drop_cache, generate_model, machine, report, table_record, warm_cache, write_json


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _rank(rank: int, world: int, store: str, paths: list, grouped: bool, out: str) -> None:
    sys.path.insert(0, ROOT)
    import torch.distributed as dist
    from common import touch

    import diffsynth_c
    from diffsynth_c.loader import distributed

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    dist.barrier()
    before, t = _rchar(), time.perf_counter()
    if grouped:
        sd = diffsynth_c.load_state_dict(paths, process_group=dist.group.WORLD)
        read = distributed.last_load_stats["bytes_read"]
    else:
        sd = diffsynth_c.load_state_dict(paths)
        read = sum(v.numel() * v.element_size() for v in sd.values())
    touch(sd)  # a mapped load is not complete until its pages are in
    elapsed = time.perf_counter() - t
    with open(os.path.join(out, f"{int(grouped)}-{rank}.json"), "w") as f:
        json.dump({"s": elapsed, "read": read, "rchar": _rchar() - before}, f)
    dist.destroy_process_group()


def run(world: int, paths: list, grouped: bool, cold: bool) -> list[dict]:
    import torch.multiprocessing as mp

    if cold:
        drop_cache(paths)
    else:
        warm_cache(paths)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "store"), paths, grouped, tmp))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return [json.load(open(os.path.join(tmp, f"{int(grouped)}-{r}.json"))) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=0.5)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--json", default=None, help="also write the figures to this file (for benchmarks/report.py)")
    args = ap.parse_args()
    paths = generate_model("qwen_image", args.size_gib, args.shards)
    total = sum(os.path.getsize(p) for p in paths)
    rows, runs = [], []
    for world in args.ranks:
        base = run(world, paths, False, args.cold)
        grouped = run(world, paths, True, args.cold)
        for label, reports in (("every rank loads all", base), ("process_group", grouped)):
            rows.append(
                [
                    str(world),
                    label,
                    f"{max(r['s'] for r in reports):.3f}",
                    " / ".join(f"{r['read'] / (1 << 20):.0f}" for r in reports),
                    f"{sum(r['read'] for r in reports) / total:.2f}x",
                    " / ".join(f"{r['rchar'] / (1 << 20):.0f}" for r in reports),
                ]
            )
            runs.append({"ranks": world, "mode": label, "ranks_figures": reports})
    head = ["ranks", "mode", "wall s (slowest)", "read per rank MiB", "read / file size", "rchar per rank MiB"]
    what = (
        f"distributed load, gloo, {total / (1 << 30):.2f} GiB in {len(paths)} shards, "
        f"{'cold' if args.cold else 'warm'} page cache"
    )
    report(f"# {what}; {machine()}", rows, head, args.markdown)
    write_json(
        args.json,
        "distributed",
        {
            "size_bytes": total,
            "shards": len(paths),
            "cold": args.cold,
            "runs": runs,
            "table": table_record(what, head, rows),
        },
    )


if __name__ == "__main__":
    main()
