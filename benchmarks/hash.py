"""Model-hash benchmark: diffsynth_c.hash_model_file against DiffSynth's, same files, same run.

    python benchmarks/hash.py [--repeat 20] [--json FILE]

The files are Qwen-Image's full DiT (20.4B parameters, 1933 tensors in 9 shards) with real headers
and sparse data sections: hashing reads the headers only, so no disk is spent on weights. The hash
both compute must be the one DiffSynth's MODEL_CONFIGS lists for Qwen-Image's DiT.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, sparse_full_size_qwen_image, table, table_record, write_json


def timed(fn, repeat: int) -> tuple[float, str]:
    fn()  # first call: imports, untimed
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the figures to this file (for benchmarks/report.py)")
    args = ap.parse_args()

    from diffsynth.configs.model_configs import MODEL_CONFIGS
    from diffsynth.core import hash_model_file as ds_hash_model_file

    import diffsynth_c

    paths = sparse_full_size_qwen_image(9)
    print(f"machine: {machine()}")
    rows = []
    t_ds, h_ds = timed(lambda: ds_hash_model_file(paths), args.repeat)
    t_ours, h_ours = timed(lambda: diffsynth_c.hash_model_file(paths), args.repeat)
    names = [c["model_name"] for c in MODEL_CONFIGS if c.get("model_hash") == h_ours]
    rows.append(["diffsynth.core.hash_model_file", f"{t_ds * 1e3:.2f}", h_ds, "1.0x"])
    rows.append(["diffsynth_c.hash_model_file", f"{t_ours * 1e3:.3f}", h_ours, f"{t_ds / t_ours:.1f}x faster"])
    title = f"hash_model_file, Qwen-Image DiT, 9 shards (median of {args.repeat})"
    header = ["function", "ms", "hash", "speed"]
    print(f"\n### {title}\n")
    print(table(rows, header))
    print(f"\nsame hash: {h_ours == h_ds}; MODEL_CONFIGS entry: {names or 'none'}")
    write_json(
        args.json,
        "hash",
        {
            "repeat": args.repeat,
            "files": len(paths),
            "same_hash": h_ours == h_ds,
            "model_configs": names,
            "ms": {"diffsynth": t_ds * 1e3, "diffsynth_c": t_ours * 1e3},
            "hash": h_ours,
            "table": table_record(title, header, rows),
        },
    )
    if h_ours != h_ds:
        sys.exit("hashes differ")


if __name__ == "__main__":
    main()
