"""skip_model_initialization, DiskMap, load_model and the DiffSynth drop-in, against DiffSynth's own."""

from __future__ import annotations

import importlib
import threading

import pytest
import torch
from diffsynth.core import DiskMap as DsDiskMap
from diffsynth.core import load_model as ds_load_model
from diffsynth.core import skip_model_initialization as ds_skip

import diffsynth_c
from diffsynth_c import DiskMap, load_model, skip_model_initialization

from .conftest import random_tensor, run_python, same_tensor

MODEL_CLASS = "diffsynth.models.wan_video_motion_controller.WanMotionControllerModel"


def model_class(name=MODEL_CLASS):
    mod, cls = name.rsplit(".", 1)
    return getattr(importlib.import_module(mod), cls)


def write_model_file(path, cls, config=None, dtype=torch.float32, drop=(), add=None, reshape=None) -> str:
    """A safetensors file with the keys and shapes of cls(**config), random values."""
    from safetensors.torch import save_file

    with ds_skip():
        m = cls(**(config or {}))
    sd = {}
    for i, (k, v) in enumerate(m.state_dict().items()):
        if k in drop:
            continue
        shape = reshape[1] if reshape and k == reshape[0] else v.shape
        sd[k] = (torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.02).to(dtype)
    sd.update(add or {})
    save_file(sd, str(path))
    return str(path)


# ---- skip_model_initialization ----


class Special(torch.nn.Parameter):
    pass


class Net(torch.nn.Module):
    def __init__(self, tag=False):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        p = Special(torch.zeros(5))
        if tag:
            p.tag = "kept"
        self.special = p
        self.register_buffer("buf", torch.ones(3))


@pytest.mark.parametrize("ctx", [skip_model_initialization, ds_skip])
def test_skip_initialization_semantics(ctx):
    with ctx():
        net = Net()
    assert all(p.is_meta for p in net.parameters())
    assert not net.frozen.requires_grad and net.lin.weight.requires_grad
    assert type(net.special) is Special
    assert not net.buf.is_meta  # buffers are not parameters


def test_skip_initialization_keeps_plain_attributes():
    """DiffSynth's version raises TypeError for a parameter carrying a plain attribute; ours keeps it."""
    with pytest.raises(TypeError), ds_skip():
        Net(tag=True)
    with skip_model_initialization():
        net = Net(tag=True)
    assert net.special.is_meta and type(net.special) is Special and net.special.tag == "kept"


def test_skip_initialization_same_as_diffsynth_and_restored():
    original = torch.nn.Module.register_parameter
    with skip_model_initialization():
        ours = Net()
        with skip_model_initialization():  # nested
            inner = torch.nn.Linear(2, 2)
        assert inner.weight.is_meta
        assert torch.nn.Module.register_parameter is not original  # the outer block is still on
        assert torch.nn.Linear(2, 2).weight.is_meta
    with ds_skip():
        theirs = Net()
    assert [(n, type(p), p.device, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, type(p), p.device, p.requires_grad) for n, p in theirs.named_parameters()
    ]
    assert torch.nn.Module.register_parameter is original
    with pytest.raises(ZeroDivisionError), skip_model_initialization():
        raise ZeroDivisionError("raised inside the block")
    assert torch.nn.Module.register_parameter is original


# ---- DiskMap ----


@pytest.fixture
def dm_files(tmp_path):
    from safetensors.torch import save_file

    a, b, c = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), str(tmp_path / "c.bin")
    save_file(
        {
            "z.w": random_tensor((8, 8), torch.float32, 1),
            "m.b": random_tensor((8,), torch.bfloat16, 2),
            "ids": torch.arange(5),
        },
        a,
    )
    save_file({"b.only": random_tensor((3, 4), torch.float16, 3), "z.w": random_tensor((8, 8), torch.float32, 4)}, b)
    torch.save(
        {"bin.w": random_tensor((6,), torch.float32, 5), "bin.t": random_tensor((4, 2), torch.bfloat16, 6).t()}, c
    )
    return a, b, c


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32])
def test_disk_map_equals_diffsynth(dm_files, dtype):
    for paths in (list(dm_files[:2]), dm_files[0], [dm_files[2]], list(dm_files)):
        ours, theirs = DiskMap(paths, "cpu", torch_dtype=dtype), DsDiskMap(paths, "cpu", torch_dtype=dtype)
        assert list(ours) == list(theirs)
        for k in theirs:
            assert k in ours
            assert same_tensor(ours[k], theirs[k]), k
        assert "nope" not in ours


def test_disk_map_renames_like_diffsynth(dm_files):
    conv = lambda sd: {("renamed." + k): v for k, v in sd.items()}
    ours, theirs = (
        DiskMap(list(dm_files[:2]), "cpu", state_dict_converter=conv),
        DsDiskMap(list(dm_files[:2]), "cpu", state_dict_converter=conv),
    )
    assert list(ours) == list(theirs) and "renamed.z.w" in ours
    assert same_tensor(ours["renamed.z.w"], theirs["renamed.z.w"])


def test_disk_map_buffer_size_env(dm_files, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_DISK_MAP_BUFFER_SIZE", "70")
    dm = DiskMap(dm_files[0], "cpu")
    assert dm.buffer_size == 70
    dm["z.w"]  # 64 elements
    assert dm.num_params == 64
    dm["m.b"]  # 72 > 70: the counter restarts, as DiffSynth's flush does
    assert dm.num_params == 0


@pytest.mark.parametrize("mode", ["mmap", "read"])
def test_disk_map_reads_only_the_tensor_asked_for(tmp_path, monkeypatch, mode):
    """mmap mode maps the file and reads in the tensor's pages only (the resident set grows by that
    much); read mode preads exactly its bytes."""
    from safetensors.torch import save_file

    monkeypatch.setenv("DIFFSYNTH_C_LOAD_MODE", mode)
    p = str(tmp_path / "big.safetensors")
    save_file({f"w{i}": torch.zeros(1 << 20) for i in range(16)} | {"small": torch.ones(16)}, p)  # 64 MiB
    dm = DiskMap(p, "cpu")

    def status(field):
        with open("/proc/self/status") as f:
            return int(next(x for x in f if x.startswith(field)).split()[1]) * 1024

    def rchar():
        with open("/proc/self/io") as f:
            return int(next(x for x in f if x.startswith("rchar")).split()[1])

    rss, read = status("RssFile:"), rchar()
    small = dm["small"]
    assert torch.equal(small, torch.ones(16))
    assert rchar() - read < 1 << 16 and status("RssFile:") - rss < 1 << 20
    assert same_tensor(dm["w3"], torch.zeros(1 << 20))


def test_an_unknown_load_mode_is_refused_by_loads_and_disk_maps(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    p = str(tmp_path / "m.safetensors")
    save_file({"w": torch.ones(4)}, p)
    dm = DiskMap(p, "cpu")
    monkeypatch.setenv("DIFFSYNTH_C_LOAD_MODE", "mapped")
    for call in (lambda: dm["w"], lambda: diffsynth_c.load_state_dict(p)):
        with pytest.raises(ValueError, match="DIFFSYNTH_C_LOAD_MODE must be 'mmap' or 'read', not 'mapped'"):
            call()


def test_disk_map_threads_and_prefetch(dm_files):
    paths = list(dm_files)
    ref = DsDiskMap(paths, "cpu")
    dm = DiskMap(paths, "cpu")
    results, errors = {}, []

    def work(k):
        try:
            results[k] = dm[k]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in list(dm) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(same_tensor(results[k], ref[k]) for k in ref)
    dm2 = DiskMap(paths, "cpu", torch_dtype=torch.bfloat16)
    dm2.prefetch(list(dm2))
    ref2 = DsDiskMap(paths, "cpu", torch_dtype=torch.bfloat16)
    assert all(same_tensor(dm2[k], ref2[k]) for k in ref2)


# ---- load_model ----


@pytest.mark.parametrize("use_disk_map", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_model_equals_diffsynth(tmp_path, use_disk_map, dtype):
    cls = model_class()
    p = write_model_file(tmp_path / "m.safetensors", cls)
    ours = load_model(cls, p, torch_dtype=dtype, use_disk_map=use_disk_map)
    theirs = ds_load_model(cls, p, torch_dtype=dtype, use_disk_map=use_disk_map)
    assert type(ours) is type(theirs) and not ours.training
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(same_tensor(a[k], b[k]) for k in b)
    assert not any(p.is_meta for p in ours.parameters())
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        assert same_tensor(ours.linear(x), theirs.linear(x))  # identical outputs on the same input


def test_load_model_with_converter(tmp_path):
    cls = model_class()
    p = write_model_file(tmp_path / "m.safetensors", cls)
    conv = lambda sd: {k: sd[k] for k in sd}
    ours = load_model(cls, p, state_dict_converter=conv)
    theirs = ds_load_model(cls, p, state_dict_converter=conv)
    assert all(same_tensor(x, y) for x, y in zip(ours.state_dict().values(), theirs.state_dict().values()))


def test_load_model_errors_name_the_file(tmp_path):
    cls = model_class()
    with ds_skip():
        keys = list(cls().state_dict())
    missing = write_model_file(tmp_path / "missing.safetensors", cls, drop=(keys[0],))
    with pytest.raises(
        RuntimeError, match=r"(?s)missing\.safetensors: Error\(s\) in loading state_dict.*Missing key\(s\)"
    ):
        load_model(cls, missing)
    extra = write_model_file(tmp_path / "extra.safetensors", cls, add={"not.in.model": torch.ones(1)})
    with pytest.raises(RuntimeError, match=r"(?s)extra\.safetensors: .*Unexpected key\(s\).*not\.in\.model"):
        load_model(cls, extra)
    shape = write_model_file(tmp_path / "shape.safetensors", cls, reshape=(keys[0], (3, 3)))
    with pytest.raises(RuntimeError, match=rf"(?s)shape\.safetensors: .*size mismatch for {keys[0]}"):
        load_model(cls, shape)
    with pytest.raises(FileNotFoundError):
        load_model(cls, str(tmp_path / "nope.safetensors"))


# ---- the drop-in ----


def lpips_file(tmp_path) -> str:
    """A file whose hash DiffSynth's MODEL_CONFIGS knows (image_metrics_lpips_squeeze), random values."""
    from diffsynth.configs import MODEL_CONFIGS

    config = next(c for c in MODEL_CONFIGS if c["model_name"] == "image_metrics_lpips_squeeze")
    p = write_model_file(tmp_path / "lpips.safetensors", model_class(config["model_class"]), config.get("extra_kwargs"))
    assert diffsynth_c.hash_model_file(p) == config["model_hash"]
    return p


def test_patched_model_pool_loads_identical_models(tmp_path):
    import diffsynth.core.loader.file as ds_file
    import diffsynth.models.model_loader as ds_loader
    from diffsynth.models.model_loader import ModelPool

    p = lpips_file(tmp_path)
    plain = ModelPool()
    plain.auto_load_model(p)
    assert diffsynth_c.patch_diffsynth() > 0
    try:
        assert ds_loader.hash_model_file is diffsynth_c.hash_model_file
        assert ds_file.load_state_dict is diffsynth_c.load_state_dict
        patched = ModelPool()
        patched.auto_load_model(p)
    finally:
        assert diffsynth_c.unpatch_diffsynth() > 0
    assert ds_loader.hash_model_file is not diffsynth_c.hash_model_file
    a, b = plain.model[0].state_dict(), patched.model[0].state_dict()
    assert type(plain.model[0]) is type(patched.model[0])
    assert list(a) == list(b) and all(same_tensor(a[k], b[k]) for k in a)


def test_unpatch_restores_modules_imported_while_patched():
    """A DiffSynth module first imported while patched takes our objects by name from the patched
    modules; unpatching puts DiffSynth's back there too."""
    r = run_python(
        "import sys, diffsynth.core, diffsynth_c\n"
        "assert 'diffsynth.models.model_loader' not in sys.modules\n"
        "from diffsynth.core.loader import model as ds_model\n"
        "theirs = ds_model.load_model\n"
        "diffsynth_c.patch_diffsynth()\n"
        "import diffsynth.models.model_loader as ml\n"
        "assert ml.load_model is diffsynth_c.load_model and ml.hash_model_file is diffsynth_c.hash_model_file\n"
        "diffsynth_c.unpatch_diffsynth()\n"
        "assert ml.load_model is theirs, ml.load_model\n"
        "assert ml.hash_model_file.__module__.startswith('diffsynth.core'), ml.hash_model_file.__module__\n"
        "assert diffsynth_c.unpatch_diffsynth() == 0\n"
        "print('ok')\n"
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_auto_import_and_environment_patch():
    code = (
        "import diffsynth.core.loader.file as f, diffsynth_c\nprint(f.load_state_dict is diffsynth_c.load_state_dict)\n"
    )
    r = run_python("import diffsynth.core\nimport diffsynth_c.auto\n" + code)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
    import os

    env_before = os.environ.get("DIFFSYNTH_C_PATCH")
    os.environ["DIFFSYNTH_C_PATCH"] = "1"
    try:
        r = run_python("import diffsynth.core\n" + code)
    finally:
        if env_before is None:
            del os.environ["DIFFSYNTH_C_PATCH"]
        else:
            os.environ["DIFFSYNTH_C_PATCH"] = env_before
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


def test_detect_and_auto_load(tmp_path):
    from diffsynth.models.model_loader import ModelPool

    p = lpips_file(tmp_path)
    found = diffsynth_c.detect_model(p)
    assert [c["model_name"] for c in found] == ["image_metrics_lpips_squeeze"]
    models = diffsynth_c.load_model_auto(p)
    ref = ModelPool()
    ref.auto_load_model(p)
    a, b = models[0].state_dict(), ref.model[0].state_dict()
    assert list(a) == list(b) and all(same_tensor(a[k], b[k]) for k in a)
    assert not diffsynth_c.patch.is_patched()
    other = write_model_file(tmp_path / "other.safetensors", model_class())
    assert diffsynth_c.detect_model(other) == [] or all(
        c["model_class"] == MODEL_CLASS for c in diffsynth_c.detect_model(other)
    )


@pytest.mark.parametrize(
    "model_name",
    ["wan_video_motion_controller", "flux_value_controller", "flux_lora_patcher", "qwen_image_dit"],
)
def test_full_size_real_models_hash_to_their_model_configs(model_name):
    """Real DiffSynth classes at their published size, on the meta device (no download, no memory):
    the hash of their keys and shapes is the one MODEL_CONFIGS lists, so detection works on them."""
    from diffsynth.configs import MODEL_CONFIGS

    configs = [c for c in MODEL_CONFIGS if c["model_name"] == model_name and "state_dict_converter" not in c]
    assert configs, model_name
    hashes = set()
    for c in configs:
        with skip_model_initialization():
            m = model_class(c["model_class"])(**c.get("extra_kwargs", {}))
        hashes.add(diffsynth_c.hash_state_dict_keys(m.state_dict()))
    assert hashes & {c["model_hash"] for c in configs}
