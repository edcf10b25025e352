"""Loading across ranks (torch.distributed, gloo, 2 and 4 local processes): every rank ends with the
dict a single-process load gives, bit for bit and in the same order, while each rank reads about
1/N of the bytes (counted by the reader and by the kernel's read counter); a file missing on one
rank makes every rank raise, naming that rank and the file, instead of hanging."""

from __future__ import annotations

import json
import os
import time

import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp

from .conftest import random_tensor


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _worker(rank: int, world: int, store: str, paths: list, out: str, kwargs: dict, broken_rank: int) -> None:
    import datetime

    import torch.distributed as dist

    import diffsynth_c
    from diffsynth_c.loader import distributed

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    report: dict = {"rank": rank}
    try:
        mine = [p.replace("model-", "missing-") if rank == broken_rank and i == 0 else p for i, p in enumerate(paths)]
        reference = diffsynth_c.load_state_dict(paths, torch_dtype=kwargs.get("torch_dtype"))
        before = _rchar()
        got = diffsynth_c.load_state_dict(mine, process_group=dist.group.WORLD, **kwargs)
        report["rchar"] = _rchar() - before
        report["stats"] = dict(distributed.last_load_stats)
        report["same_keys"] = list(got) == list(reference)
        report["same_bits"] = all(
            got[k].dtype == reference[k].dtype
            and got[k].shape == reference[k].shape
            and torch.equal(got[k].reshape(-1).view(torch.uint8), reference[k].reshape(-1).view(torch.uint8))
            for k in reference
        )
    except Exception as e:  # noqa: BLE001 - any failure in the worker is reported to the test, which asserts on it
        report["error"] = f"{type(e).__name__}: {e}"
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        dist.destroy_process_group()


def run_ranks(tmp_path, world: int, paths: list, kwargs: dict | None = None, broken_rank: int = -1) -> list[dict]:
    ctx = mp.get_context("spawn")
    store = str(tmp_path / f"store-{world}-{broken_rank}")
    procs = [
        ctx.Process(target=_worker, args=(r, world, store, paths, str(tmp_path), kwargs or {}, broken_rank))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 240
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung"
    return [json.load(open(tmp_path / f"rank{r}.json")) for r in range(world)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    files = []
    for s in range(3):
        tensors = {
            f"blocks.{s}.{i}.weight": random_tensor((256, 256 + 64 * i), torch.bfloat16, 10 * s + i) for i in range(6)
        }
        tensors[f"blocks.{s}.scale"] = random_tensor((1024,), torch.float32, 100 + s)
        tensors[f"blocks.{s}.f8"] = random_tensor((333,), torch.float8_e4m3fn, 200 + s)
        tensors["shared.ids"] = torch.arange(7 + s, dtype=torch.int64)  # in every shard: the last one wins
        path = str(d / f"model-{s + 1:05d}-of-00003.safetensors")
        safetensors.torch.save_file(tensors, path)
        files.append(path)
    return files


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_gets_the_single_process_dict_reading_its_share(tmp_path, shards, world):
    reports = run_ranks(tmp_path, world, shards, {"bucket_mib": 1})
    total = reports[0]["stats"]["total_bytes"]
    assert all("error" not in r for r in reports), reports
    assert all(r["same_keys"] and r["same_bits"] for r in reports)
    read = [r["stats"]["bytes_read"] for r in reports]
    biggest = 256 * (256 + 64 * 5) * 2
    assert abs(sum(read) - sum(os.path.getsize(p) for p in shards)) < 64 * 1024  # each byte once (headers aside)
    assert all(abs(b - total / world) <= biggest for b in read), read
    # the kernel's count of bytes read by the process agrees: no rank read everything
    assert all(r["rchar"] < total / world + 2 * biggest + (1 << 20) for r in reports), [r["rchar"] for r in reports]


def test_dtype_conversion_after_the_exchange_is_bit_identical(tmp_path, shards):
    reports = run_ranks(tmp_path, 2, shards, {"torch_dtype": torch.float32})
    assert all("error" not in r and r["same_bits"] and r["same_keys"] for r in reports), reports


def test_node_local_reads_once_per_host(tmp_path, shards):
    reports = run_ranks(tmp_path, 2, shards, {"node_local": True})
    assert all("error" not in r and r["same_bits"] for r in reports), reports
    assert reports[0]["stats"]["readers"] == 1 and reports[1]["stats"]["bytes_read"] == 0


def test_a_file_missing_on_one_rank_fails_every_rank(tmp_path, shards):
    reports = run_ranks(tmp_path, 2, shards, broken_rank=1)
    for r in reports:
        assert r["error"].startswith("RuntimeError: distributed load failed while finding the files (rank 1: ")
        assert "missing-00001-of-00003.safetensors: no such file" in r["error"]


def _reference_plan(headers, readers, bucket_bytes, align=64):
    """The plan as loader/distributed.py computed it in Python before the C planner took it over:
    (order, buckets), the oracle the C layout is held to."""
    winner, first_seen = {}, []
    for fi, (data_start, tensors) in enumerate(headers):
        for name, dtype, shape, begin, end in tensors:
            if name not in winner:
                first_seen.append(name)
            winner[name] = (fi, data_start, dtype, shape, begin, end)
    runs = [(name, winner[name]) for name in first_seen]
    total = sum(e - b for _, (_, _, _, _, b, e) in runs)
    buckets, placed, current, done = [], {}, {}, 0
    for name, (fi, data_start, dtype, shape, begin, end) in runs:
        nbytes = end - begin
        reader = min(readers - 1, (2 * done + nbytes) * readers // (2 * total)) if total else 0
        done += nbytes
        b = current.get(reader)
        if b is None or (buckets[b][1] and buckets[b][1] + nbytes > bucket_bytes):
            buckets.append([reader, 0, []])
            b = current[reader] = len(buckets) - 1
        off = buckets[b][1]
        buckets[b][2].append((fi, data_start + begin, nbytes, dtype, off, name))
        buckets[b][1] = off + (nbytes + align - 1) // align * align
        placed[name] = (b, off)
    order = [(name, fi, *placed[name], e - b, dtype, tuple(shape)) for name, (fi, _, dtype, shape, b, e) in runs]
    return order, buckets


def test_the_plan_is_deterministic_and_balanced(shards):
    from diffsynth_c import _core
    from diffsynth_c.loader.distributed import plan

    layout = plan(shards, 3, 1 << 20)
    assert layout == plan(shards, 3, 1 << 20)
    order = layout.tensors
    assert [t.key for t in order][:2] == ["blocks.0.0.weight", "blocks.0.1.weight"]
    assert order[[t.key for t in order].index("shared.ids")].file == 2  # the last shard's copy wins
    per_reader = [sum(b.nbytes for b in layout.buffers if b.reader == r) for r in range(3)]
    assert max(per_reader) - min(per_reader) < 2 * 256 * 576 * 2
    assert all(b.nbytes <= 1 << 20 or sum(t.buffer == i for t in order) == 1 for i, b in enumerate(layout.buffers))
    headers = []
    for p in shards:
        _hl, start, tensors, _meta = _core.read_header(p)
        headers.append((start, [(n, d, tuple(s), b, e) for n, d, s, b, e in tensors]))
    for readers, bucket in [(1, 0), (3, 1 << 20), (2, 1), (5, 300_000), (64, 1 << 30)]:
        ref_order, ref_buckets = _reference_plan(headers, readers, bucket or 2**64)
        got = plan(shards, readers, bucket)
        assert [
            (t.key, t.file, t.buffer, t.buffer_offset, t.nbytes, t.dtype, t.shape) for t in got.tensors
        ] == ref_order
        assert [(b.reader, b.nbytes) for b in got.buffers] == [(r, n) for r, n, _ in ref_buckets]
        assert all(
            t.offset == headers[t.file][0] + {e[0]: e[3] for e in headers[t.file][1]}[t.key] for t in got.tensors
        )


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 128)
        self.b = torch.nn.Linear(128, 32, bias=False)


def _model_worker(rank: int, world: int, store: str, path: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    import diffsynth_c

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    report: dict = {"rank": rank}
    try:
        ref = diffsynth_c.load_model(TinyNet, path).state_dict()
        got = diffsynth_c.load_model(TinyNet, path, process_group=dist.group.WORLD).state_dict()
        report["model"] = list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
        dm = diffsynth_c.DiskMap(path, "cpu", torch_dtype=torch.float32, process_group=dist.group.WORLD)
        report["disk_map"] = all(torch.equal(dm[k], ref[k].float()) for k in dm)
    except Exception as e:  # noqa: BLE001 - any failure in the worker is reported to the test, which asserts on it
        report["error"] = f"{type(e).__name__}: {e}"
    finally:
        with open(os.path.join(out, f"model{rank}.json"), "w") as f:
            json.dump(report, f)
        dist.destroy_process_group()


def test_load_model_and_disk_map_take_the_process_group(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "tiny.safetensors")
    safetensors.torch.save_file({k: v.to(torch.bfloat16).contiguous() for k, v in TinyNet().state_dict().items()}, path)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_model_worker, args=(r, 2, str(tmp_path / "store"), path, str(tmp_path))) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    for p in procs:
        if p.is_alive():
            p.kill()
    reports = [json.loads((tmp_path / f"model{r}.json").read_text()) for r in range(2)]
    assert all(r.get("model") and r.get("disk_map") for r in reports), reports
