"""PyTorch checkpoint benchmark: hash_model_file and load_state_dict on a torch.save .bin file.

    python benchmarks/torch_bin.py [--size-gib 2] [--repeat 3] [--json FILE]

One file of about --size-gib (Qwen-Image DiT names and shapes, bf16), written once by torch.save.
Same run, warm page cache, each loader in a fresh process (benchmarks/one_load.py), timed until
one byte of every 4 KiB page of every tensor was read: diffsynth_c against diffsynth.core and
torch.load(mmap=True, weights_only=True). Hashing, in this process, median of --repeat:
diffsynth_c.hash_model_file against diffsynth.core.hash_model_file (which loads every tensor).
Ceiling: pread of the file into pre-faulted memory (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    GIB,
    bench_dir,
    layout_tensors,
    machine,
    pread_ceiling,
    run_one,
    table,
    table_record,
    truncated_layout,
    warm_cache,
    write_json,
)


def generate_bin(size_gib: float) -> str:
    import torch

    path = os.path.join(bench_dir(), f"qwen-image-dit-{size_gib:g}GiB.bin")
    if os.path.exists(path + ".complete"):
        return path
    sd = dict(layout_tensors(truncated_layout(int(size_gib * GIB), 2), torch.bfloat16))
    torch.save(sd, path)
    open(path + ".complete", "w").close()
    return path


def time_hash(fn, path: str, repeat: int) -> float:
    fn(path)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(path)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the figures to this file (for benchmarks/report.py)")
    args = ap.parse_args()
    path = generate_bin(args.size_gib)
    size = os.path.getsize(path)
    print(machine())
    print(f"file: {path} ({size / GIB:.2f} GiB)")

    from diffsynth.core import hash_model_file as ds_hash

    import diffsynth_c

    warm_cache([path])
    h_ours = time_hash(diffsynth_c.hash_model_file, path, max(args.repeat, 5))
    h_ds = time_hash(ds_hash, path, args.repeat)
    assert diffsynth_c.hash_model_file(path) == ds_hash(path)
    hash_rows = [
        ["diffsynth", f"{h_ds * 1e3:.1f}", "1"],
        ["diffsynth_c", f"{h_ours * 1e3:.2f}", f"{h_ds / h_ours:.0f}x faster"],
    ]
    hash_header = ["function", "ms", "vs diffsynth"]
    print("\nhash_model_file (warm page cache)")
    print(table(hash_rows, hash_header))

    ceiling = pread_ceiling([path])
    loaders = ["diffsynth_c", "diffsynth", "torch-mmap"]
    times: dict[str, list] = {n: [] for n in loaders}
    for r in range(args.repeat):
        for name in loaders if r % 2 == 0 else reversed(loaders):
            warm_cache([path])
            res = run_one(name, [path], None, False, verify=(r == 0))
            times[name].append(res)
            print(f"  {name:12s} run {r + 1}: {res.total_s:.3f} s  identical={res.ok} {res.error}")
    ours = statistics.median(x.total_s for x in times["diffsynth_c"])
    rows, load_figures = [], {}
    for name in loaders:
        s = statistics.median(x.total_s for x in times[name])
        ok = times[name][0].ok
        rows.append([name, f"{s:.3f}", f"{size / s / 1e9:.2f}", f"{s / ours:.2f}x", "yes" if ok else str(ok)])
        runs = [x.total_s for x in times[name]]
        load_figures[name] = {"total": s, "gbps": size / s / 1e9, "identical": ok, "runs_s": runs}
    load_title = f"load_state_dict, warm page cache (pread ceiling {ceiling:.2f} GB/s)"
    load_header = ["loader", "total s (median)", "GB/s", "time vs diffsynth_c", "identical to DiffSynth"]
    print(f"\n{load_title}")
    print(table(rows, load_header))
    print(f"diffsynth_c reaches {size / ours / 1e9 / ceiling:.0%} of the pre-faulted pread ceiling.")
    write_json(
        args.json,
        "torch_bin",
        {
            "size_gib": args.size_gib,
            "size_bytes": size,
            "repeat": args.repeat,
            "ceiling_gbps": ceiling,
            "hash_ms": {"diffsynth": h_ds * 1e3, "diffsynth_c": h_ours * 1e3},
            "loaders": load_figures,
            "tables": [
                table_record("hash_model_file of the .bin (warm page cache)", hash_header, hash_rows),
                table_record(load_title, load_header, rows),
            ],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
