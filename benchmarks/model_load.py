"""Model loading benchmark: load_model and DiskMap, diffsynth_c against DiffSynth, same run.

    python benchmarks/model_load.py [--size-gib 3] [--shards 4] [--repeat 3] [--json FILE]

The model is DiffSynth's own QwenImageDiT class with as many blocks as fit --size-gib (the files
come from benchmarks/common.py, bf16). Each load runs in a fresh process and is timed from the
call until one byte of every 4 KiB page of every parameter was read (DiffSynth's plain load
leaves the weights as lazy file mappings; a model is not loaded until its weights are in memory);
peak RSS is the process's high-water mark minus its size before the call. Variants: plain
(`load_model(..., use_disk_map=False)`) and ModelPool-style (`use_disk_map=True`, what
`ModelPool.auto_load_model` passes). DiskMap: time to first tensor of a fresh DiskMap (median of
--repeat over a few keys) and all keys read one by one, in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, generate_model, machine, table, table_record, warm_cache, write_json

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {bench!r})
from common import touch, rss_mib, peak_rss_mib, reset_peak_rss
from diffsynth.models.qwen_image_dit import QwenImageDiT
which, disk, paths, layers = sys.argv[1], sys.argv[2] == "1", json.loads(sys.argv[3]), int(sys.argv[4])
if which == "diffsynth_c":
    from diffsynth_c import load_model
else:
    from diffsynth.core import load_model

reset_peak_rss()
base = rss_mib()
t = time.perf_counter()
model = load_model(QwenImageDiT, paths, config=dict(num_layers=layers), torch_dtype=torch.bfloat16, device="cpu", use_disk_map=disk)
touch(dict(model.state_dict()))
dt = time.perf_counter() - t
print(json.dumps(dict(s=dt, peak=max(peak_rss_mib(), rss_mib()) - base)))
"""


def layers_in(paths: list[str]) -> int:
    import diffsynth_c

    keys = diffsynth_c.load_keys_dict(paths)
    return 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("transformer_blocks."))


def run_child(which: str, disk: bool, paths: list[str], layers: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        [sys.executable, "-c", code, which, "1" if disk else "0", json.dumps(paths), str(layers)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
        check=False,
    )
    line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode or not line.startswith("{"):
        raise RuntimeError(f"{which}: {r.stderr.strip()[-500:]}")
    return json.loads(line)


def disk_map_figures(paths: list[str], repeat: int) -> tuple[list[list[str]], dict]:
    """The DiskMap table's rows, and its figures by library (for --json)."""
    import torch
    from diffsynth.core import DiskMap as DsDiskMap

    from diffsynth_c import DiskMap

    rows, figures = [], {}
    for name, cls in (("diffsynth_c", DiskMap), ("diffsynth", DsDiskMap)):
        warm_cache(paths)
        keys = list(cls(paths, "cpu"))
        probe = [keys[0], keys[len(keys) // 2], keys[-1]]
        first = []
        for _ in range(repeat):
            for k in probe:
                t = time.perf_counter()
                dm = cls(paths, "cpu", torch_dtype=torch.bfloat16)
                dm[k]
                first.append(time.perf_counter() - t)
        dm = cls(paths, "cpu", torch_dtype=torch.bfloat16)
        t = time.perf_counter()
        nbytes = sum(dm[k].nbytes for k in dm)
        all_s = time.perf_counter() - t
        rows.append([name, f"{statistics.median(first) * 1e3:.2f}", f"{all_s:.2f}", f"{nbytes / all_s / 1e9:.2f}"])
        figures[name] = {
            "first_tensor_ms": statistics.median(first) * 1e3,
            "all_keys_s": all_s,
            "gbps": nbytes / all_s / 1e9,
            "first_tensor_runs_ms": [x * 1e3 for x in first],
        }
    return rows, figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=3.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the figures to this file (for benchmarks/report.py)")
    args = ap.parse_args()
    paths = generate_model("qwen-image-dit", args.size_gib, args.shards, "bfloat16")
    size = sum(os.path.getsize(p) for p in paths)
    layers = layers_in(paths)
    print(machine())
    print(f"QwenImageDiT(num_layers={layers}), {size / 2**30:.2f} GiB in {len(paths)} shards")
    rows, loads = [], {}
    for disk in (False, True):
        res: dict[str, list] = {"diffsynth_c": [], "diffsynth": []}
        for r in range(args.repeat):
            for which in ("diffsynth_c", "diffsynth") if r % 2 == 0 else ("diffsynth", "diffsynth_c"):
                warm_cache(paths)
                res[which].append(run_child(which, disk, paths, layers))
                print(
                    f"  {which:12s} disk_map={disk} run {r + 1}: {res[which][-1]['s']:.2f} s, peak +{res[which][-1]['peak']:.0f} MiB"
                )
        ours = statistics.median(x["s"] for x in res["diffsynth_c"])
        for which in ("diffsynth_c", "diffsynth"):
            s = statistics.median(x["s"] for x in res[which])
            peak = statistics.median(x["peak"] for x in res[which])
            call = f"load_model{' (use_disk_map)' if disk else ''}"
            rows.append([call, which, f"{s:.2f}", f"{peak:.0f}", f"{s / ours:.2f}x"])
            loads.setdefault(call, {})[which] = {"s": s, "peak_rss_mib": peak, "runs_s": [x["s"] for x in res[which]]}
    load_title = "load_model, warm page cache, until every weight page was read"
    load_header = ["call", "library", "s (median)", "peak RSS MiB", "time vs diffsynth_c"]
    print(f"\n{load_title}")
    print(table(rows, load_header))
    dm_title = "DiskMap (bf16), warm page cache"
    dm_header = ["library", "first tensor ms (median)", "all keys s", "GB/s"]
    dm_rows, dm = disk_map_figures(paths, args.repeat)
    print(f"\n{dm_title}")
    print(table(dm_rows, dm_header))
    write_json(
        args.json,
        "model_load",
        {
            "size_gib": args.size_gib,
            "size_bytes": size,
            "shards": len(paths),
            "layers": layers,
            "repeat": args.repeat,
            "load_model": loads,
            "disk_map": dm,
            "tables": [table_record(load_title, load_header, rows), table_record(dm_title, dm_header, dm_rows)],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
