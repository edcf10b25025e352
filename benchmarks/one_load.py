"""Loads model files with one loader, alone in this process, and prints one JSON line.

    python benchmarks/one_load.py LOADER DTYPE(none|bfloat16|...) warm|cold verify|noverify FILE...

Timed: the loader's call, then one touch per 4 KiB page of every tensor (common.touch). Before
timing, the loader runs once on a tiny file so that imports and first-call set-up are not timed.
Peak RSS is the rise of VmHWM over the resident size just before the call. Verification compares
every tensor with what DiffSynth's load_state_dict gives for it (safe_open().get_tensor(k) then
.to(dtype)), bit for bit, one tensor at a time so that memory stays bounded.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from common import bench_dir, drop_cache, peak_rss_mib, reset_peak_rss, rss_mib, touch


def loaders():
    from peers import PEERS

    import diffsynth_c

    table = {"diffsynth_c": lambda paths, dtype: diffsynth_c.load_state_dict(paths, torch_dtype=dtype)}
    table.update(PEERS)
    table["torch-mmap"] = load_torch_mmap  # PyTorch checkpoints (benchmarks/torch_bin.py)
    return table


def load_torch_mmap(paths: list[str], dtype) -> dict:
    sd: dict = {}
    for p in paths:
        sd.update(torch.load(p, mmap=True, weights_only=True))
    return {k: v.to(dtype) for k, v in sd.items()} if dtype is not None else sd


def verify_bin(sd: dict, paths: list[str], dtype) -> tuple[bool, str]:
    """Against torch.load(weights_only=True), which DiffSynth itself calls for these files."""
    ref: dict = {}
    for p in paths:
        ref.update(torch.load(p, weights_only=True))
    if list(sd) != list(ref):
        return False, "different keys or order"
    for k, r in ref.items():
        r = r.to(dtype) if dtype is not None else r
        if (
            sd[k].dtype != r.dtype
            or sd[k].shape != r.shape
            or not torch.equal(sd[k].reshape(-1).view(torch.uint8), r.reshape(-1).view(torch.uint8))
        ):
            return False, f"{k} differs"
    return True, ""


def reference_order(paths: list[str]) -> list[str]:
    from safetensors import safe_open

    order: dict[str, None] = {}
    for p in paths:
        with safe_open(p, "pt") as f:
            for k in f.keys():  # noqa: SIM118  safe_open handles have keys() but are not iterable
                order[k] = None
    return list(order)


def verify(sd: dict, paths: list[str], dtype, check_order: bool) -> tuple[bool, str]:
    from safetensors import safe_open

    expected = reference_order(paths)
    if sorted(sd) != sorted(expected):
        return False, "different keys"
    if check_order and list(sd) != expected:
        return False, "different key order"
    for p in paths:
        with safe_open(p, "pt") as f:
            for k in f.keys():  # noqa: SIM118  safe_open handles have keys() but are not iterable
                ref = f.get_tensor(k)
                if dtype is not None:
                    ref = ref.to(dtype)
                got = sd[k]
                if got.dtype != ref.dtype or got.shape != ref.shape:
                    return False, f"{k}: {got.dtype} {tuple(got.shape)} vs {ref.dtype} {tuple(ref.shape)}"
                if ref.numel() and not torch.equal(
                    got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)
                ):
                    return False, f"{k}: different bits"
    return True, ""


def main() -> None:
    name, dtype_name, cache, do_verify, *paths = sys.argv[1:]
    dtype = None if dtype_name == "none" else getattr(torch, dtype_name)
    fn = loaders()[name]
    is_bin = paths[0].endswith(".bin")
    tiny = os.path.join(bench_dir(), "tiny.bin" if is_bin else "tiny.safetensors")
    if not os.path.exists(tiny):
        from safetensors.torch import save_file

        tiny_sd = {"a": torch.ones(4, dtype=torch.bfloat16), "b": torch.ones(2, 2)}
        torch.save(tiny_sd, tiny + ".tmp") if is_bin else save_file(tiny_sd, tiny + ".tmp")
        os.replace(tiny + ".tmp", tiny)
    from peers import files_read_by, prepare

    prepare([name], [tiny])
    touch(fn([tiny], dtype))  # imports and first-call set-up, untimed
    if cache == "cold":
        drop_cache(files_read_by(name, paths))
    gc.collect()
    reset_peak_rss()
    base = rss_mib()
    t0 = time.perf_counter()
    sd = fn(paths, dtype)
    t1 = time.perf_counter()
    touch(sd)
    t2 = time.perf_counter()
    peak = max(peak_rss_mib(), rss_mib()) - base
    nbytes = sum(os.path.getsize(p) for p in paths)
    ok, why = (None, "")
    if do_verify == "verify":
        if is_bin:
            ok, why = verify_bin(sd, paths, dtype)
        else:
            ok, why = verify(sd, paths, dtype, check_order=name in ("diffsynth_c", "diffsynth"))
    print(
        json.dumps(
            {"call_s": t1 - t0, "total_s": t2 - t0, "peak_rss_mib": peak, "bytes": nbytes, "ok": ok, "error": why}
        )
    )


if __name__ == "__main__":
    main()
