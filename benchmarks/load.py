"""Loading benchmark: diffsynth_c.load_state_dict against DiffSynth and the peers, same files, same run.

    python benchmarks/load.py [--size-gib 4] [--shards 4] [--repeat 3] [--markdown FILE] [--json FILE]

Scenarios: warm page cache; cold (each file's pages dropped before the load); warm with a dtype
conversion (BF16 file to F32, F32 file to BF16). Every load runs in a fresh process and is timed
until one byte of every 4 KiB page of every tensor has been read (a lazily mapped tensor costs
nothing until touched). Reported per loader: the median total (call + touch) and the call alone,
GB/s of file bytes, peak RSS above the process's baseline, whether its tensors equal DiffSynth's
bit for bit; and the machine's own ceilings on the same files: pread into a pre-faulted buffer (a
copy and nothing else), pread into fresh memory, and memcpy.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    Result,
    drop_cache,
    generate_model,
    machine,
    mem_available_gib,
    memcpy_ceiling,
    pread_ceiling,
    run_one,
    table,
    table_record,
    warm_cache,
    write_json,
)
from peers import UNAVAILABLE, files_read_by, prepare

OURS = "diffsynth_c"
REFERENCE = "diffsynth"


def available_loaders() -> list[str]:
    from peers import available_peers

    return [OURS] + [p for p in available_peers() if p != OURS]


def measure(
    loaders: list[str], paths: list[str], dtype: str | None, cold: bool, repeat: int
) -> dict[str, list[Result]]:
    results: dict[str, list[Result]] = {name: [] for name in loaders}
    for r in range(repeat):
        order = loaders if r % 2 == 0 else list(reversed(loaders))  # no loader always goes first
        for name in order:
            if not cold:
                warm_cache(files_read_by(name, paths))
            res = run_one(name, paths, dtype, cold, verify=(r == 0))
            results[name].append(res)
            print(
                f"  {name:22s} {'cold' if cold else 'warm'} {dtype or '-':9s} run {r + 1}: "
                + (
                    f"{res.total_s:7.3f} s  {res.gbps:6.2f} GB/s  peak +{res.peak_rss_mib:7.0f} MiB"
                    if res.total_s
                    else f"failed: {res.error}"
                )
                + ("" if res.ok is None else f"  identical={res.ok}{' (' + res.error + ')' if res.error else ''}"),
                flush=True,
            )
    return results


HEADER = ["loader", "total s (median)", "call s", "GB/s", "peak RSS MiB", "time vs diffsynth_c", "identical"]


def summarize(title: str, results: dict[str, list[Result]], ceiling_gbps: float | None) -> tuple[str, dict, list]:
    """The scenario's table (markdown text), its figures by loader (for --json), and its rows."""
    rows, summary = [], {}
    ours = [r.total_s for r in results.get(OURS, []) if r.total_s]
    ours_med = statistics.median(ours) if ours else None
    for name, runs in results.items():
        ok_runs = [r for r in runs if r.total_s]
        if not ok_runs:
            rows.append([name, "failed", "", "", "", "", runs[0].error[:60] if runs else ""])
            summary[name] = {"error": runs[0].error if runs else "not run"}
            continue
        total = statistics.median(r.total_s for r in ok_runs)
        call = statistics.median(r.call_s for r in ok_runs)
        gbps = ok_runs[0].bytes / total / 1e9
        peak = max(r.peak_rss_mib for r in ok_runs)
        verified = next((r.ok for r in runs if r.ok is not None), None)
        ratio = f"{total / ours_med:.2f}x" if ours_med and name != OURS else ("1.00x" if name == OURS else "")
        rows.append(
            [
                name,
                f"{total:.3f}",
                f"{call:.3f}",
                f"{gbps:.2f}",
                f"{peak:.0f}",
                ratio,
                {True: "yes", False: "NO", None: "-"}[verified],
            ]
        )
        summary[name] = {
            "total": total,
            "call": call,
            "gbps": gbps,
            "peak": peak,
            "identical": verified,
            "runs_s": [r.total_s for r in ok_runs],
            "bytes": ok_runs[0].bytes,
        }
    text = f"### {title}\n\n" + table(rows, HEADER)
    if ceiling_gbps and OURS in summary:
        text += f"\n\ndiffsynth_c reaches {summary[OURS]['gbps'] / ceiling_gbps * 100:.0f}% of the pre-faulted pread ceiling ({ceiling_gbps:.2f} GB/s)."
    return text, summary, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--loaders", nargs="*", default=None)
    ap.add_argument("--scenarios", nargs="*", default=["warm", "cold", "bf16-to-f32", "f32-to-bf16"])
    ap.add_argument("--markdown", default=None, help="write the tables to this file")
    ap.add_argument("--json", default=None, help="also write the figures to this file (for benchmarks/report.py)")
    args = ap.parse_args()

    loaders = args.loaders or available_loaders()
    print(f"machine: {machine()}")
    print(f"loaders: {', '.join(loaders)}")
    bf16 = generate_model("qwen-image-dit", args.size_gib, args.shards, "bfloat16")
    f32 = (
        generate_model("qwen-image-dit", args.size_gib, args.shards, "float32")
        if "f32-to-bf16" in args.scenarios
        else None
    )
    size = sum(os.path.getsize(p) for p in bf16)
    prepare(loaders, bf16 + (f32 or []))
    print(f"model: {len(bf16)} shards, {size / 2**30:.2f} GiB (Qwen-Image DiT names and shapes, bf16)")

    warm_cache(bf16)
    ceil_warm = max(pread_ceiling(bf16, threads=t) for t in (1, 2, 4))
    ceil_fresh = max(pread_ceiling(bf16, threads=t, prefault=False) for t in (2, 4))
    ceil_copy = memcpy_ceiling()
    drop_cache(bf16)
    ceil_cold = pread_ceiling(bf16, threads=8)
    print(
        f"ceilings on these files: pread into pre-faulted memory {ceil_warm:.2f} GB/s, into fresh memory {ceil_fresh:.2f} GB/s, "
        f"memcpy {ceil_copy:.2f} GB/s, cold pread (8 threads) {ceil_cold:.2f} GB/s; MemAvailable {mem_available_gib():.1f} GiB"
    )

    sections, figures = [], {}
    scenarios = {
        "warm": ("Warm page cache, file dtype (bf16)", bf16, None, False, ceil_warm),
        "cold": ("Cold page cache (pages dropped before each load)", bf16, None, True, ceil_cold),
        "bf16-to-f32": ("Warm, BF16 file loaded as F32 (torch_dtype=torch.float32)", bf16, "float32", False, None),
        "f32-to-bf16": ("Warm, F32 file loaded as BF16 (torch_dtype=torch.bfloat16)", f32, "bfloat16", False, None),
    }
    for key in args.scenarios:
        title, paths, dtype, cold, ceiling = scenarios[key]
        print(f"\n== {title}")
        results = measure(loaders, paths, dtype, cold, args.repeat)
        text, summary, rows = summarize(title, results, ceiling)
        sections.append(text)
        figures[key] = {"title": title, "loaders": summary, "table": table_record(title, HEADER, rows)}
        print("\n" + text)

    report = [
        f"Measured {datetime.date.today()} on {machine()}.",
        (
            f"Model: {len(bf16)} shards, {size / 2**30:.2f} GiB, Qwen-Image DiT names and shapes; median of {args.repeat} runs, "
            "each in a fresh process, timed until every 4 KiB page of every tensor was read."
        ),
        (
            f"Ceilings on the same files: pread into pre-faulted memory {ceil_warm:.2f} GB/s; into fresh memory {ceil_fresh:.2f} GB/s; "
            f"memcpy {ceil_copy:.2f} GB/s; cold pread {ceil_cold:.2f} GB/s."
        ),
        "Command: `python benchmarks/load.py " + " ".join(sys.argv[1:]) + "`",
        "",
        *[s + "\n" for s in sections],
    ]
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(report))
        print(f"\nwrote {args.markdown}")
    ceilings = {"pread_prefaulted": ceil_warm, "pread_fresh": ceil_fresh, "memcpy": ceil_copy, "pread_cold": ceil_cold}
    write_json(
        args.json,
        "load",
        {
            "size_gib": args.size_gib,
            "size_bytes": size,
            "shards": len(bf16),
            "repeat": args.repeat,
            "ceilings_gbps": ceilings,
            "scenarios": figures,
            "unavailable": dict(UNAVAILABLE),
        },
    )


if __name__ == "__main__":
    main()
