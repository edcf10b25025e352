"""Saving benchmark: diffsynth_c.save_state_dict against safetensors.torch.save_file, same run.

    python benchmarks/save.py [--size-gib 4] [--repeat 3] [--json FILE]

The state dict is the bf16 model of benchmarks/common.py, loaded once into memory. Each saver
writes it into a fresh folder: ours in shards of --shard-size (default 2GB, with the index json),
safetensors into one file per shard of the same plan (save_file), so both write the same bytes.
Times are medians of --repeat and include making the data durable: ours fsyncs every file before
renaming it into place; save_file does not, so its time is measured with and without an fsync of
its files afterwards. The files are deleted between runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import bench_dir, generate_model, machine, table, table_record, write_json


def fsync_all(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shard-size", default="2GB")
    ap.add_argument("--json", default=None, help="also write the figures to this file (for benchmarks/report.py)")
    args = ap.parse_args()
    from safetensors.torch import save_file

    import diffsynth_c
    from diffsynth_c.loader.folder import parse_size, plan_shards

    paths = generate_model("qwen-image-dit", args.size_gib, 4, "bfloat16")
    sd = {k: v.clone() for k, v in diffsynth_c.load_state_dict(paths).items()}  # in anonymous memory
    size = sum(v.numel() * v.element_size() for v in sd.values())
    plan = plan_shards([(k, v.numel() * v.element_size()) for k, v in sd.items()], parse_size(args.shard_size))
    out = os.path.join(bench_dir(), "save-out")
    print(machine())
    print(f"{size / 2**30:.2f} GiB, {len(sd)} tensors, {len(plan)} shards of at most {args.shard_size}")
    times: dict[str, list[float]] = {
        "diffsynth_c.save_state_dict (fsync)": [],
        "safetensors.save_file": [],
        "safetensors.save_file + fsync": [],
    }
    for r in range(args.repeat):
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        diffsynth_c.save_state_dict(sd, out, max_shard_size=args.shard_size)
        times["diffsynth_c.save_state_dict (fsync)"].append(time.perf_counter() - t)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        files = [os.path.join(out, f"shard-{i}.safetensors") for i in range(len(plan))]
        t = time.perf_counter()
        for keys, f in zip(plan, files):
            save_file({k: sd[k] for k in keys}, f)
        t1 = time.perf_counter()
        fsync_all(files)
        t2 = time.perf_counter()
        times["safetensors.save_file"].append(t1 - t)
        times["safetensors.save_file + fsync"].append(t2 - t)
        print(f"  run {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    shutil.rmtree(out, ignore_errors=True)
    ours = statistics.median(times["diffsynth_c.save_state_dict (fsync)"])
    rows = [
        [
            k,
            f"{statistics.median(v):.2f}",
            f"{size / statistics.median(v) / 1e9:.2f}",
            f"{statistics.median(v) / ours:.2f}x",
        ]
        for k, v in times.items()
    ]
    header = ["saver", "s (median)", "GB/s", "time vs diffsynth_c"]
    print(table(rows, header))
    title = f"save_state_dict, {size / 2**30:.2f} GiB in {len(plan)} shards of at most {args.shard_size}"
    write_json(
        args.json,
        "save",
        {
            "size_gib": args.size_gib,
            "size_bytes": size,
            "shards": len(plan),
            "repeat": args.repeat,
            "savers": {
                k: {"s": statistics.median(v), "gbps": size / statistics.median(v) / 1e9, "runs_s": v}
                for k, v in times.items()
            },
            "table": table_record(title, header, rows),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
