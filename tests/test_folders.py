"""Model folders as diffusers and transformers lay them out, and saving in shards."""

from __future__ import annotations

import json
import os
from typing import ClassVar

import pytest
import torch
from diffsynth.core import hash_model_file as ds_hash_model_file
from diffsynth.core import load_state_dict as ds_load_state_dict

import diffsynth_c
from diffsynth_c import save_state_dict
from diffsynth_c.loader.folder import parse_size, plan_shards, resolve

from .conftest import ALL_TORCH_DTYPES, random_tensor, same_tensor


def state_dict(n=12, seed=0):
    sd = {f"blocks.{i}.w": random_tensor((64, 32 + i), torch.bfloat16, seed + i) for i in range(n)}
    sd["norm.weight"] = random_tensor((64,), torch.float32, 99)
    sd["ids"] = torch.arange(7)
    sd["scalar"] = torch.tensor(1.5)
    return sd


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(123) == 123
    assert parse_size("1.5 kb") == 1500
    for bad in ("5 parsecs", "", -1, 0, "0GB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_shard_plan_equals_huggingface_hub():
    from huggingface_hub import split_torch_state_dict_into_shards

    sd = state_dict(30)
    sd["huge"] = torch.zeros(20000, dtype=torch.float32)  # bigger than a shard: a shard of its own
    for limit in (4000, 10000, 50000, 10**9):
        ours = plan_shards([(k, v.numel() * v.element_size()) for k, v in sd.items()], limit)
        theirs = split_torch_state_dict_into_shards(sd, max_shard_size=limit)
        assert sorted(sorted(s) for s in ours) == sorted(sorted(v) for v in theirs.filename_to_tensors.values())


@pytest.mark.parametrize("limit", ["10GB", "20KB"])
def test_save_round_trip_with_safetensors_and_diffsynth(tmp_path, limit):
    from safetensors.torch import load_file

    sd = state_dict()
    for i, dt in enumerate(ALL_TORCH_DTYPES):
        sd[f"dtype.{i}"] = random_tensor((3, 4), dt, 200 + i)
    sd["view"] = sd["blocks.0.w"][1:, 3:]  # non-contiguous: written as a contiguous copy
    files = save_state_dict(sd, tmp_path / "out", max_shard_size=limit, metadata={"format": "pt"})
    shards = [f for f in files if f.endswith(".safetensors")]
    if limit == "10GB":
        assert [os.path.basename(f) for f in files] == ["diffusion_pytorch_model.safetensors"]
    else:
        n = len(shards)
        assert n > 1 and os.path.basename(shards[0]) == f"diffusion_pytorch_model-00001-of-{n:05d}.safetensors"
        index = json.loads((tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(sd)
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
        text = (tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").read_text()
        assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    merged = {}
    for f in shards:
        merged.update(load_file(f))
        with open(f, "rb") as fh:
            assert (8 + int.from_bytes(fh.read(8), "little")) % 8 == 0
    assert set(merged) == set(sd) and all(same_tensor(merged[k], sd[k].contiguous()) for k in sd)
    ours = diffsynth_c.load_state_dict(str(tmp_path / "out"))
    assert all(same_tensor(ours[k], sd[k].contiguous()) for k in sd)
    ref = ds_load_state_dict(shards)
    assert list(diffsynth_c.load_state_dict(shards)) == list(ref)
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp-" in f]


def test_folder_layouts_and_hash(tmp_path):
    sd = state_dict()
    save_state_dict(sd, tmp_path / "m" / "transformer", max_shard_size="20KB")
    shards = resolve(tmp_path / "m", "transformer")
    assert len(shards) > 1 and shards == sorted(shards)
    assert diffsynth_c.hash_model_file(str(tmp_path / "m" / "transformer")) == ds_hash_model_file(shards)
    # transformers' names, a single file, and a bare set of shards without an index
    save_state_dict(sd, tmp_path / "t", weights_name="model", max_shard_size="20KB")
    assert all("model-0000" in os.path.basename(p) for p in resolve(tmp_path / "t"))
    save_state_dict(sd, tmp_path / "single")
    assert resolve(tmp_path / "single") == [str(tmp_path / "single" / "diffusion_pytorch_model.safetensors")]
    os.remove(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    assert resolve(tmp_path / "m" / "transformer") == shards
    with pytest.raises(IsADirectoryError, match="no index json"):
        resolve(tmp_path)


def test_bad_indexes(tmp_path):
    folder = tmp_path / "m"
    save_state_dict(state_dict(), folder, max_shard_size="20KB")
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    good = json.loads(index_path.read_text())

    def write(index):
        index_path.write_text(json.dumps(index) if isinstance(index, dict) else index)

    bad = json.loads(json.dumps(good))
    bad["weight_map"]["blocks.0.w"] = "diffusion_pytorch_model-00099-of-00099.safetensors"
    write(bad)
    with pytest.raises(FileNotFoundError, match="00099-of-00099.safetensors' is missing"):
        diffsynth_c.load_state_dict(str(folder))
    write('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}')
    with pytest.raises(ValueError, match="'a' is listed twice"):
        diffsynth_c.load_state_dict(str(folder))
    bad = json.loads(json.dumps(good))
    k = next(iter(bad["weight_map"]))
    other = next(v for v in bad["weight_map"].values() if v != bad["weight_map"][k])
    bad["weight_map"][k] = other
    write(bad)
    with pytest.raises(ValueError, match="does not hold what the index lists"):
        diffsynth_c.load_state_dict(str(folder))
    bad = json.loads(json.dumps(good))
    bad["metadata"]["total_size"] += 1
    write(bad)
    with pytest.raises(ValueError, match="total_size"):
        diffsynth_c.hash_model_file(str(folder))


def test_save_refuses_bad_input_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="cannot parse the size"):
        save_state_dict(state_dict(), tmp_path / "a", max_shard_size="lots")
    with pytest.raises(TypeError, match="only tensors"):
        save_state_dict({"a": torch.ones(2), "b": 3}, tmp_path / "b")
    assert not os.path.exists(tmp_path / "b") or not os.listdir(tmp_path / "b")
    from diffsynth_c import _core

    with pytest.raises(FileNotFoundError, match="cannot create"):
        _core.write_file(str(tmp_path / "nope" / "x.safetensors"), b"{}      ", [])


def test_disk_map_and_load_model_take_folders(tmp_path):
    from diffsynth_c import DiskMap

    sd = state_dict()
    save_state_dict(sd, tmp_path / "m" / "sub", max_shard_size="20KB")
    dm = DiskMap(str(tmp_path / "m" / "sub"), "cpu")
    assert sorted(dm) == sorted(sd) and same_tensor(dm["blocks.3.w"], sd["blocks.3.w"])


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    from diffsynth_c import _core

    calls = []
    real = _core.write_file

    def fail_second(path, header, items, threads=1):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (injected)")
        return real(path, header, items, threads)

    monkeypatch.setattr(_core, "write_file", fail_second)
    with pytest.raises(OSError, match="injected"):
        save_state_dict(state_dict(), tmp_path / "x", max_shard_size="20KB")
    left = os.listdir(tmp_path / "x")
    assert not [f for f in left if ".tmp-" in f] and not [f for f in left if f.endswith(".index.json")]


def test_convert_bin_to_shards_keeps_the_hash(tmp_path):
    from .conftest import run_python

    src = str(tmp_path / "model.bin")
    sd = state_dict()
    torch.save(sd, src)
    r = run_python(
        f"import sys; from diffsynth_c.__main__ import main; sys.exit(main(['convert', {src!r}, {str(tmp_path / 'out')!r}, '--max-shard-size', '20KB']))"
    )
    assert r.returncode == 0, r.stderr
    assert diffsynth_c.hash_model_file(str(tmp_path / "out")) == ds_hash_model_file(src)
    got = diffsynth_c.load_state_dict(str(tmp_path / "out"))
    assert all(same_tensor(got[k], sd[k]) for k in sd)
    r = run_python(
        f"import sys; from diffsynth_c.__main__ import main; sys.exit(main(['hash', {str(tmp_path / 'out')!r}]))"
    )
    assert r.stdout.strip() == ds_hash_model_file(src)
    nested = str(tmp_path / "nested.pt")
    torch.save({"a": torch.ones(1), "n": {"b": torch.ones(1)}}, nested)
    r = run_python(
        f"import sys; from diffsynth_c.__main__ import main; sys.exit(main(['convert', {nested!r}, {str(tmp_path / 'o2')!r}]))"
    )
    assert r.returncode == 1 and "nested dicts" in r.stderr


class KeepNorm(torch.nn.Module):
    _keep_in_fp32_modules: ClassVar[list[str]] = ["norm"]

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.block = torch.nn.Sequential(torch.nn.Linear(8, 8))


def test_keep_in_fp32_modules(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in KeepNorm().state_dict().items()}
    p = str(tmp_path / "k.safetensors")
    save_file(sd, p)
    for use_disk_map in (False, True):
        m = diffsynth_c.load_model(KeepNorm, p, torch_dtype=torch.float16, use_disk_map=use_disk_map)
        assert m.norm.weight.dtype == torch.float32 and torch.equal(m.norm.weight, sd["norm.weight"])
        assert m.proj.weight.dtype == torch.float16 and torch.equal(m.proj.weight, sd["proj.weight"].half())
        assert m.block[0].weight.dtype == torch.float16 and not m.training


@pytest.mark.parametrize(
    "case,text,pattern",
    [
        ("nested 100k deep", "[" * 100_000 + "]" * 100_000, "the JSON nests too deeply to be an index"),
        ("total_size 1e400", None, r"metadata.total_size must be a whole number of bytes, not inf"),
    ],
)
def test_index_that_breaks_pythons_json_names_the_file(tmp_path, case, text, pattern):
    folder = tmp_path / "m"
    save_state_dict(state_dict(), folder, max_shard_size="20KB")
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    if text is None:
        good = json.loads(index_path.read_text())
        text = json.dumps(good).replace(f'"total_size": {good["metadata"]["total_size"]}', '"total_size": 1e400')
    index_path.write_text(text)
    for api in (diffsynth_c.load_state_dict, diffsynth_c.hash_model_file):
        with pytest.raises(ValueError, match="^" + str(index_path).replace(".", r"\.") + ": " + pattern):
            api(str(folder))


def test_save_refuses_what_is_not_a_state_dict_and_names_that_leave_the_folder(tmp_path):
    with pytest.raises(TypeError, match=f"^{tmp_path / 'a'}: save_state_dict needs a dict of tensors, not NoneType"):
        save_state_dict(None, tmp_path / "a")
    (tmp_path / "b").mkdir()
    for name in ("../x", "/tmp/x", "sub/x", "..", ""):
        with pytest.raises(ValueError, match="weights_name must be a file name inside the folder"):
            save_state_dict({"w": torch.ones(2)}, tmp_path / "b", weights_name=name)
    assert sorted(os.listdir(tmp_path)) == ["b"]
    assert os.listdir(tmp_path / "b") == []


def versioned(value: float, n: int = 6) -> dict:
    """A state dict whose every element is value: a mix of two saves shows as two values."""
    return {f"blocks.{i}.w": torch.full((64, 64), value) for i in range(n)}


def test_resave_replaces_an_older_layout_and_leaves_no_stale_files(tmp_path):
    folder = tmp_path / "m"
    save_state_dict(versioned(1.0), folder, max_shard_size="20KB")  # 6 shards and an index
    save_state_dict(versioned(2.0, 4), folder, max_shard_size="40KB")  # 2 shards
    assert sorted(os.listdir(folder)) == [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
    ]
    assert diffsynth_c.load_state_dict(str(folder)).keys() == versioned(2.0, 4).keys()
    save_state_dict(versioned(3.0, 2), folder)  # one file: the index of the sharded save must go
    assert os.listdir(folder) == ["diffusion_pytorch_model.safetensors"]
    got = diffsynth_c.load_state_dict(str(folder))
    want = versioned(3.0, 2)
    assert got.keys() == want.keys() and all(same_tensor(got[k], want[k]) for k in want)


SAVE_KILLED = """
import os, sys, time, torch
import diffsynth_c
from diffsynth_c import _core
from diffsynth_c.loader import folder as F
where, path = sys.argv[1], sys.argv[2]
real_write, real_replace = _core.write_file, os.replace
def pause():
    print("paused", flush=True)
    time.sleep(60)
def write_then_pause(target, *a, **k):  # the first shard written, the others not yet
    real_write(target, *a, **k)
    pause()
def replace_then_pause(src, dst):  # the first file renamed into place, the others not yet
    real_replace(src, dst)
    if dst.endswith(".safetensors"):
        pause()
if where == "write":
    _core.write_file = write_then_pause
else:
    F.os.replace = replace_then_pause
F.threads = lambda: 1
F.save_state_dict({f"blocks.{i}.w": torch.full((64, 64), 2.0) for i in range(6)}, path, max_shard_size="20KB")
"""


@pytest.mark.parametrize("where", ["write", "rename"])
def test_a_save_killed_half_way_never_loads_as_a_mix(tmp_path, where):
    """A re-save of the same layout killed (SIGKILL) after one shard: the folder loads as the old
    save or is refused, never as a mix; the next save clears what the dead one left."""
    import signal
    import subprocess
    import sys

    folder = tmp_path / "m"
    save_state_dict(versioned(1.0), folder, max_shard_size="20KB")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen(
        [sys.executable, "-c", SAVE_KILLED, where, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env=dict(os.environ, PYTHONPATH=root),
    )
    try:
        assert child.stdout.readline().strip() == "paused"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    try:
        got = diffsynth_c.load_state_dict(str(folder))
    except diffsynth_c.FormatError as e:
        assert where == "rename" and f"has not finished (process {child.pid}, no longer running)" in str(e)
    else:
        values = {float(t.unique()[0]) for t in got.values()}
        assert values == {1.0} and all(t.unique().numel() == 1 for t in got.values()), values
    assert where == "rename" or not [f for f in os.listdir(folder) if ".saving" in f]
    left = [f for f in os.listdir(folder) if ".tmp-" in f and f.endswith(f"-{child.pid}")]
    assert left, "nothing left to clean: weak test"
    save_state_dict(versioned(3.0), folder, max_shard_size="20KB")
    assert not [f for f in os.listdir(folder) if ".tmp-" in f or ".saving" in f]
    got = diffsynth_c.load_state_dict(str(folder))
    assert got.keys() == versioned(3.0).keys() and all(same_tensor(got[k], versioned(3.0)[k]) for k in got)


def test_two_threads_saving_into_one_folder_leave_one_whole_save(tmp_path):
    """Their temporary names differ (thread and process), and their commits take turns (an flock on
    the folder): the folder ends as one save or the other, whole, with nothing left over."""
    import threading

    folder = tmp_path / "m"
    for _ in range(3):
        errors = []

        def save(value, errors=errors):
            try:
                save_state_dict(versioned(value), folder, max_shard_size="20KB")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=save, args=(v,)) for v in (1.0, 2.0)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        got = diffsynth_c.load_state_dict(str(folder))
        values = {float(v) for t in got.values() for v in t.unique()}
        assert got.keys() == versioned(1.0).keys() and len(values) == 1, values
        assert not [f for f in os.listdir(folder) if ".tmp-" in f or ".saving" in f]


def test_a_save_that_fails_while_renaming_leaves_the_folder_refused_then_repaired(tmp_path, monkeypatch):
    from diffsynth_c.loader import folder as F

    folder = tmp_path / "m"
    save_state_dict(versioned(1.0), folder, max_shard_size="20KB")
    real, calls = os.replace, []

    def fail_second(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # the marker, one shard, then this one
            raise OSError(5, "Input/output error (injected)")
        real(src, dst)

    monkeypatch.setattr(F.os, "replace", fail_second)
    with pytest.raises(OSError, match="injected"):
        save_state_dict(versioned(2.0), folder, max_shard_size="20KB")
    monkeypatch.setattr(F.os, "replace", real)
    assert not [f for f in os.listdir(folder) if ".tmp-" in f]
    with pytest.raises(diffsynth_c.FormatError, match=rf"has not finished \(process {os.getpid()}, still running\)"):
        diffsynth_c.load_state_dict(str(folder))
    save_state_dict(versioned(3.0), folder, max_shard_size="20KB")
    got = diffsynth_c.load_state_dict(str(folder))
    assert all(same_tensor(got[k], versioned(3.0)[k]) for k in got) and not [
        f for f in os.listdir(folder) if ".saving" in f
    ]
