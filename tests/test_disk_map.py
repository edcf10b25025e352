"""DiskMap against DiffSynth's DiskMap on the same files: a file replaced after the map was made,
writes into returned tensors, nested torch.save dicts (IP-adapter checkpoints), bad arguments."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")
from diffsynth.core.vram.disk_map import DiskMap as TheirDiskMap
from safetensors.torch import save_file

import diffsynth_c
from diffsynth_c import DiskMap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = (512, 1024)  # 2 MiB in float32: read through a private mapping of its own in mmap mode


def tensors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(*BIG, generator=g),
        "small": torch.randn(3, 5, generator=g),
        "half": torch.randn(64, generator=g).half(),
    }


def equal_values(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(equal_values(a[k], b[k]) for k in a)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.fixture(params=["mmap", "read"])
def load_mode(request, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_C_LOAD_MODE", request.param)
    return request.param


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_replaced_file_keeps_serving_the_version_the_map_was_made_from(tmp_path, load_mode, fmt):
    path, new = tmp_path / f"m.{fmt}", tmp_path / f"new.{fmt}"
    save = save_file if fmt == "safetensors" else torch.save
    save(tensors(0), path)
    ours, theirs = DiskMap(str(path), "cpu"), TheirDiskMap(str(path), "cpu")
    # a new version with other offsets, put in place as atomic writers do
    moved = {"aaa": torch.full((1000,), 9.0), **tensors(1)}
    save(moved, new)
    os.replace(new, path)
    for key in ("big", "small", "half"):
        assert equal_values(ours[key], theirs[key]), key
        assert equal_values(ours[key], tensors(0)[key])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32])
def test_reads_are_independent_and_never_write_the_file(tmp_path, load_mode, fmt, dtype):
    path = tmp_path / f"w.{fmt}"
    (save_file if fmt == "safetensors" else torch.save)(tensors(2), path)
    before = path.read_bytes()
    for key in ("big", "small", "half"):
        seen = []
        for cls in (TheirDiskMap, DiskMap):
            dm = cls(str(path), "cpu", torch_dtype=dtype)
            first = dm[key]
            first.fill_(7)  # a caller writes into what it got
            again = dm[key]
            seen.append((again.clone(), first.data_ptr() == again.data_ptr()))
        (theirs, theirs_shared), (ours, ours_shared) = seen
        assert equal_values(ours, theirs), key
        assert not theirs_shared and not ours_shared
    assert path.read_bytes() == before


def ip_adapter(tmp_path):
    """A small FluxIpAdapter saved in the InstantX/XLabs layout {"image_proj": {...}, "ip_adapter": {...}}."""
    from diffsynth.models.flux_ipadapter import FluxIpAdapter

    config = {
        "num_attention_heads": 2,
        "attention_head_dim": 4,
        "cross_attention_dim": 8,
        "num_tokens": 2,
        "num_blocks": 2,
    }
    torch.manual_seed(0)
    model = FluxIpAdapter(**config).half()
    sd = model.state_dict()
    nested = {
        "image_proj": {k[len("image_proj.") :]: v for k, v in sd.items() if k.startswith("image_proj.")},
        "ip_adapter": {k[len("ipadapter_modules.") :]: v for k, v in sd.items() if k.startswith("ipadapter_modules.")},
    }
    path = tmp_path / "ip-adapter.bin"
    torch.save(nested, path)
    return str(path), config, FluxIpAdapter, sd


def test_nested_dicts_come_back_as_tensors(tmp_path, load_mode):
    path, _config, _cls, _sd = ip_adapter(tmp_path)
    ours, theirs = (
        DiskMap(path, "cpu", torch_dtype=torch.bfloat16),
        TheirDiskMap(path, "cpu", torch_dtype=torch.bfloat16),
    )
    assert list(ours) == list(theirs) == ["image_proj", "ip_adapter"]
    for key in theirs:
        assert equal_values(ours[key], theirs[key])


def test_ip_adapter_loads_through_load_model_as_diffsynths(tmp_path):
    from diffsynth.core.loader.model import load_model as their_load_model
    from diffsynth.utils.state_dict_converters.flux_ipadapter import FluxIpAdapterStateDictConverter

    path, config, cls, sd = ip_adapter(tmp_path)
    args = (cls, path, config, torch.float16, "cpu", FluxIpAdapterStateDictConverter)
    theirs = their_load_model(*args, use_disk_map=True).state_dict()
    ours = diffsynth_c.load_model(*args, use_disk_map=True).state_dict()
    assert list(ours) == list(theirs)
    assert all(equal_values(ours[k], theirs[k]) and torch.equal(ours[k], sd[k]) for k in theirs)


def test_ip_adapter_through_auto_load_model_patched_and_not(tmp_path):
    path, config, _cls, _sd = ip_adapter(tmp_path)
    script = textwrap.dedent(
        f"""
        import torch
        from diffsynth.configs import MODEL_CONFIGS
        from diffsynth.core.loader import hash_model_file
        from diffsynth.models.model_loader import ModelPool
        import diffsynth_c

        path = {path!r}
        MODEL_CONFIGS.append({{
            "model_hash": hash_model_file(path),
            "model_name": "flux_ipadapter",
            "model_class": "diffsynth.models.flux_ipadapter.FluxIpAdapter",
            "extra_kwargs": {config!r},
            "state_dict_converter": "diffsynth.utils.state_dict_converters.flux_ipadapter.FluxIpAdapterStateDictConverter",
        }})
        results = []
        for patched in (False, True):
            if patched:
                assert diffsynth_c.patch_diffsynth() > 0
            pool = ModelPool()
            pool.auto_load_model(path)
            results.append(pool.fetch_model("flux_ipadapter").state_dict())
        theirs, ours = results
        assert list(ours) == list(theirs)
        for k in theirs:
            assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
        print("SAME", len(theirs))
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SAME" in out.stdout


def test_a_zero_stride_tensor_reads_as_diffsynths(tmp_path):
    path = tmp_path / "zs.bin"
    torch.save({"z": torch.ones(1).expand(4), "w": torch.arange(3.0)}, path)
    ours, theirs = DiskMap(str(path), "cpu"), TheirDiskMap(str(path), "cpu")
    for key in ("z", "w"):
        assert equal_values(ours[key], theirs[key])
    # the same tensor whose storage lost its bytes: DiffSynth fails in torch.load, ours names the file
    bad = tmp_path / "short.bin"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            zout.writestr(name, b"" if name.endswith("data/0") else zin.read(name))
    with pytest.raises(RuntimeError):
        TheirDiskMap(str(bad), "cpu")
    with pytest.raises(diffsynth_c.FormatError, match="short.bin"):
        DiskMap(str(bad), "cpu")


def test_a_zero_stride_tensor_too_large_to_copy_names_the_file_and_key(tmp_path):
    path = tmp_path / "huge.bin"
    torch.save({"z": torch.ones(1).expand(2**50)}, path)  # 4 bytes on disk, 4 PiB once copied
    with pytest.raises(RuntimeError):
        TheirDiskMap(str(path), "cpu")["z"]
    with pytest.raises(RuntimeError, match=r"huge\.bin: tensor 'z': shape \[1125899906842624\], stride \[0\]"):
        DiskMap(str(path), "cpu")["z"]


def test_a_bytes_path_raises_the_type_error_diffsynth_raises(tmp_path):
    path = tmp_path / "b.safetensors"
    save_file({"a": torch.zeros(2)}, path)
    with pytest.raises(TypeError):
        TheirDiskMap(os.fsencode(path), "cpu")
    with pytest.raises(TypeError, match="b.safetensors"):
        DiskMap(os.fsencode(path), "cpu")
    assert list(DiskMap(path, "cpu")) == ["a"]  # an os.PathLike is taken


# ---- reads around the page cache (vram/direct_read.py) ------------------------------------------


def test_direct_reads_give_the_files_bytes_in_buffers_reused_once_freed(tmp_path, monkeypatch):
    """With DIFFSYNTH_C_DIRECT_READS=1 the layers' reads (read_host) go through O_DIRECT into pooled
    buffers: the same values as safetensors reads, a tensor no other read shares, and the buffer of a
    freed tensor serves the next read of its size (where the file system takes O_DIRECT)."""
    from diffsynth_c.vram import direct_read

    monkeypatch.setenv("DIFFSYNTH_C_DIRECT_READS", "1")
    g = torch.Generator().manual_seed(3)
    # odd sizes and a small tensor first: data offsets that are not multiples of 4 KiB
    sd = {
        "a": torch.randn(7, generator=g),
        "b": torch.randn(1000, 1037, generator=g).to(torch.bfloat16),
        "c": torch.randn(600, 999, generator=g),
    }
    path = tmp_path / "d.safetensors"
    save_file(sd, path)
    dm = DiskMap(str(path), "cpu")
    assert dm._direct() is not None
    b1 = dm.read_host("b")
    b2 = dm.read_host("b")
    assert equal_values(b1, sd["b"]) and equal_values(b2, sd["b"])
    assert b1.data_ptr() != b2.data_ptr()
    b1.fill_(1)
    assert equal_values(dm.read_host("c"), sd["c"]) and equal_values(dm.read_host("a"), sd["a"])
    if dm._direct().fds.get(id(dm.files[0])) is not None:  # O_DIRECT taken: the pool recycles
        ptr = b2.data_ptr()
        del b2
        again = dm.read_host("b")
        assert again.data_ptr() // 4096 == ptr // 4096 and equal_values(again, sd["b"])
    assert equal_values(dm["b"], TheirDiskMap(str(path), "cpu")["b"])
    monkeypatch.setenv("DIFFSYNTH_C_DIRECT_READS", "0")
    assert DiskMap(str(path), "cpu")._direct() is None
    assert not direct_read.use_direct(1 << 62)
    monkeypatch.setenv("DIFFSYNTH_C_DIRECT_READS", "auto")
    assert direct_read.use_direct(1 << 62) and not direct_read.use_direct(1)
    monkeypatch.setenv("DIFFSYNTH_C_DIRECT_READS", "yes")
    with pytest.raises(ValueError, match="DIFFSYNTH_C_DIRECT_READS"):
        direct_read.use_direct(1)


def test_disk_offloaded_layers_with_direct_reads_match_diffsynths(tmp_path, monkeypatch):
    """A disk-offloaded model computing on the CPU with every weight read around the page cache
    gives DiffSynth's output bit for bit, pass after pass (prefetched passes included)."""
    from diffsynth.core.vram import layers as theirs_layers

    from diffsynth_c.vram import layers as ours_layers

    monkeypatch.setenv("DIFFSYNTH_C_DIRECT_READS", "1")
    torch.manual_seed(0)
    base = torch.nn.Sequential(
        torch.nn.Linear(300, 2000), torch.nn.LayerNorm(2000), torch.nn.Linear(2000, 613), torch.nn.Linear(613, 64)
    ).to(torch.bfloat16)  # the first two linears take over 1 MiB: read around the cache
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, path)
    config = {k: "disk" for k in ("offload_dtype", "offload_device", "onload_dtype", "onload_device")}
    config.update(
        preparing_dtype="disk", preparing_device="disk", computation_dtype=torch.bfloat16, computation_device="cpu"
    )
    x = torch.randn(5, 300).to(torch.bfloat16)
    outs = []
    for lib, dm_cls in ((theirs_layers, TheirDiskMap), (ours_layers, DiskMap)):
        import copy

        model = copy.deepcopy(base).to("meta")
        mm = {torch.nn.Linear: lib.AutoWrappedLinear, torch.nn.LayerNorm: lib.AutoWrappedModule}
        dm = dm_cls(str(path), "cpu")
        model = lib.enable_vram_management(model, mm, config, vram_limit=None, disk_map=dm)
        with torch.no_grad():
            outs.append([model(x) for _ in range(3)])
    assert dm._direct() is not None and dm._direct().fds  # ours read through the direct reader
    for theirs, ours in zip(*outs):
        assert torch.equal(theirs, ours)
