"""Download throughput against the local hub (tests/hub.py, a separate process on 127.0.0.1):
ours (libcurl, ranges over several connections), huggingface_hub.snapshot_download and
modelscope.snapshot_download, the same repo in the same run, with and without a per-connection
rate cap (the hub's own, to mimic a CDN's per-connection limit). Client `curl`, a plain curl of
each file in turn (one connection, to /dev/null), is the loopback reference. Times are of the
download call alone, in a fresh process per client (imports not counted); the hub clients write
to the same disk.

    python benchmarks/download.py                 # 3 files, 384 MiB, cap 40 MiB/s
    python benchmarks/download.py --size-mib 4096 # the issue's 4 GiB repo
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from common import ROOT, bench_dir, table_record, write_json

MODEL = "bench/download"


def serve(size: int, files: int, rate: float) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(
        [sys.executable, "-m", "tests.hub", MODEL, str(size), str(files), str(rate)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return p, p.stdout.readline().strip()


def run_client(client: str, url: str, folder: str, files: int) -> float:
    """Runs one client in a fresh process so that its imports and endpoint settings are its own;
    returns the seconds of the download call alone (imports not counted)."""
    env = dict(
        os.environ,
        MODELSCOPE_ENDPOINT=url,
        HF_ENDPOINT=url,
        HF_HUB_DISABLE_XET="1",
        DIFFSYNTH_C_PROGRESS="0",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    code = {
        "ours": "from diffsynth_c import ModelConfig\nt0 = time.perf_counter()\n"
        f"ModelConfig(model_id={MODEL!r}, origin_file_pattern='', local_model_path={folder!r}).download_if_necessary()",
        "huggingface_hub": "from huggingface_hub import snapshot_download\nt0 = time.perf_counter()\n"
        f"snapshot_download({MODEL!r}, local_dir={os.path.join(folder, MODEL)!r})",
        "modelscope": "from modelscope import snapshot_download\nt0 = time.perf_counter()\n"
        f"snapshot_download({MODEL!r}, local_dir={os.path.join(folder, MODEL)!r})",
        "curl": "import subprocess\nt0 = time.perf_counter()\n"
        "[subprocess.run(['curl', '-sf', '-o', '/dev/null', "
        f"{url!r} + '/{MODEL}/resolve/main/model-%05d-of-{files:05d}.safetensors' % (i + 1)], check=True) "
        f"for i in range({files})]",
    }[client]
    code = "import time\n" + code + "\nprint(time.perf_counter() - t0)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=384)
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--cap-mib", type=float, default=40.0, help="per-connection cap of the shaped runs")
    ap.add_argument("--clients", default="ours,huggingface_hub,modelscope,curl")
    ap.add_argument("--json", default=None, help="also write the figures to this file (for benchmarks/report.py)")
    args = ap.parse_args()
    size = args.size_mib << 20
    clients = args.clients.split(",")
    rows = []
    for label, rate in ((f"capped {args.cap_mib:g} MiB/s/conn", args.cap_mib * 2**20), ("unshaped", 0.0)):
        hub, url = serve(size, args.files, rate)
        try:
            for client in clients:
                folder = os.path.join(bench_dir(), "download-" + client.split()[0])
                shutil.rmtree(folder, ignore_errors=True)
                dt = run_client(client, url, folder, args.files)
                shutil.rmtree(folder, ignore_errors=True)
                rows.append((label, client, dt, size / dt / 2**20))
        finally:
            hub.stdin.close()
            hub.wait()
    title = f"{args.files} files, {args.size_mib} MiB in all; hub on 127.0.0.1; each client in a fresh process"
    print(title)
    print(f"{'link':24} {'client':20} {'seconds':>8} {'MiB/s':>8} {'ours / it':>10}")
    cells = []
    for label, client, dt, speed in rows:
        ours = next(s for lab, c, _, s in rows if lab == label and c == "ours")
        print(f"{label:24} {client:20} {dt:8.2f} {speed:8.1f} {ours / speed:10.2f}")
        cells.append([label, client, f"{dt:.2f}", f"{speed:.1f}", f"{ours / speed:.2f}"])
    write_json(
        args.json,
        "download",
        {
            "size_mib": args.size_mib,
            "files": args.files,
            "cap_mib": args.cap_mib,
            "runs": [{"link": lab, "client": c, "s": dt, "mib_s": sp} for lab, c, dt, sp in rows],
            "table": table_record(title, ["link", "client", "seconds", "MiB/s", "ours / it"], cells),
        },
    )


if __name__ == "__main__":
    main()
