"""The main job: a real load of a generated model, with a printed report.

    python benchmarks/demo.py [--size-gib 2] [--shards 4] [--repeat 2]

1. Generates (once) a multi-shard model with the names and shapes of Qwen-Image's DiT (the first
   blocks, bf16, written by safetensors' own writer, named as diffusers names shards).
2. Loads it with diffsynth_c and with every peer installed (DiffSynth, safetensors,
   fastsafetensors, runai-model-streamer, instanttensor, ...), each in a fresh process, the page
   cache warm, timed until every 4 KiB page of every tensor has been read.
3. Checks that each loader's tensors equal DiffSynth's bit for bit, and prints times and ratios.
4. Hashes the model and Qwen-Image's full 9-shard layout with DiffSynth and with diffsynth_c,
   and shows that DiffSynth's MODEL_CONFIGS recognises the latter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import generate_model, machine, run_one, sparse_full_size_qwen_image, table, warm_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from peers import UNAVAILABLE, available_peers

    print(f"machine: {machine()}")
    t = time.perf_counter()
    paths = generate_model("qwen-image-dit", args.size_gib, args.shards, "bfloat16")
    size = sum(os.path.getsize(p) for p in paths)
    print(
        f"model: {len(paths)} shards, {size / 2**30:.2f} GiB in {os.path.dirname(paths[0])} (ready in {time.perf_counter() - t:.1f} s)"
    )

    loaders = ["diffsynth_c"] + [p for p in available_peers() if p != "diffsynth_c"]
    from peers import files_read_by, prepare

    prepare(loaders, paths)
    for name, why in UNAVAILABLE.items():
        print(f"not measured: {name} ({why})")
    runs: dict[str, list] = {name: [] for name in loaders}
    for r in range(args.repeat):
        for name in loaders if r % 2 == 0 else reversed(loaders):
            warm_cache(files_read_by(name, paths))
            runs[name].append(run_one(name, paths, None, cold=False, verify=(r == 0)))

    ours = statistics.median(x.total_s for x in runs["diffsynth_c"] if x.total_s)
    rows, all_identical = [], True
    for name in loaders:
        good = [x for x in runs[name] if x.total_s]
        if not good:
            rows.append([name, "failed", "", "", "", runs[name][0].error[:70]])
            continue
        total = statistics.median(x.total_s for x in good)
        identical = runs[name][0].ok
        if name == "diffsynth_c":
            all_identical &= bool(identical)
        rows.append(
            [
                name,
                f"{total:.3f}",
                f"{good[0].bytes / total / 1e9:.2f}",
                f"{max(x.peak_rss_mib for x in good):.0f}",
                "1.00x" if name == "diffsynth_c" else f"{total / ours:.2f}x",
                "yes" if identical else f"NO {runs[name][0].error}",
            ]
        )
    print(
        f"\nLoad, warm page cache, median of {args.repeat} (each run a fresh process; time until every page is read):\n"
    )
    print(
        table(rows, ["loader", "seconds", "GB/s", "peak RSS MiB", "time vs diffsynth_c", "same tensors as DiffSynth"])
    )

    from diffsynth.configs.model_configs import MODEL_CONFIGS
    from diffsynth.core import hash_model_file as ds_hash_model_file

    import diffsynth_c

    print("\nModel hashes (DiffSynth identifies models by them):\n")
    hash_rows = []
    full = sparse_full_size_qwen_image(9)
    for label, files in [("this model", paths), ("Qwen-Image DiT, full size, 9 shards", full)]:
        t = time.perf_counter()
        h_ds = ds_hash_model_file(files)
        t_ds = time.perf_counter() - t
        t = time.perf_counter()
        h_ours = diffsynth_c.hash_model_file(files)
        t_ours = time.perf_counter() - t
        known = [c["model_name"] for c in MODEL_CONFIGS if c.get("model_hash") == h_ours]
        hash_rows.append(
            [
                label,
                h_ours,
                "yes" if h_ours == h_ds else "NO",
                f"{t_ds * 1e3:.2f}",
                f"{t_ours * 1e3:.2f}",
                ", ".join(known) or "-",
            ]
        )
        all_identical &= h_ours == h_ds
    print(table(hash_rows, ["files", "hash", "same as DiffSynth", "DiffSynth ms", "diffsynth_c ms", "MODEL_CONFIGS"]))
    print(
        "\n"
        + (
            "diffsynth_c returned DiffSynth's tensors and hashes"
            if all_identical
            else "diffsynth_c DIFFERS FROM DIFFSYNTH"
        )
    )
    sys.exit(0 if all_identical else 1)


if __name__ == "__main__":
    main()
