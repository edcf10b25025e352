"""Parity with the installed DiffSynth, name by name and case by case.

Walks every public name of ``diffsynth.core.loader`` and ``diffsynth.core.vram`` (the packages, and
what their submodules define) in the installed DiffSynth: each must exist at the same path in
diffsynth_c with a compatible signature (DiffSynth's parameters first, same names, kinds and
defaults; ours may add parameters after them). Then generated cases run on both and compare what
DiffSynth computes: values bit for bit, dtypes, devices, key order, aliasing, the state a forward
leaves, printed output, exceptions (ours must be caught by what catches DiffSynth's), graph breaks
under torch.compile. The patched cases run in fresh interpreters: patch before and after the
pipeline imports, and DiffSynth's own names give what DiffSynth gives unpatched.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json

import pytest
import safetensors
import safetensors.torch
import torch

import diffsynth_c
from diffsynth_c.patch import original

from .conftest import run_python

PACKAGES = {"diffsynth.core.loader": "diffsynth_c.loader", "diffsynth.core.vram": "diffsynth_c.vram"}
MODULES = {
    "diffsynth.core.loader.file": "diffsynth_c.loader.file",
    "diffsynth.core.loader.model": "diffsynth_c.loader.model",
    "diffsynth.core.loader.config": "diffsynth_c.loader.config",
    "diffsynth.core.vram.layers": "diffsynth_c.vram.layers",
    "diffsynth.core.vram.initialization": "diffsynth_c.vram.initialization",
    "diffsynth.core.vram.disk_map": "diffsynth_c.vram.disk_map",
}
MIRROR = {**PACKAGES, **MODULES}


def _walked() -> list[tuple[str, str]]:
    """(DiffSynth module, name): every name of the two packages, and every name the submodules
    define themselves (functions, classes, constants; private helpers the patch rebinds too)."""
    names = []
    for pkg in PACKAGES:
        module = importlib.import_module(pkg)
        names += [(pkg, n) for n, v in vars(module).items() if not n.startswith("__") and not inspect.ismodule(v)]
    for mod in MODULES:
        module = importlib.import_module(mod)
        for n, v in vars(module).items():
            if n.startswith("__") or inspect.ismodule(v):
                continue
            if getattr(v, "__module__", None) == mod or (n.isupper() and not callable(v)):
                names.append((mod, n))
    return sorted(set(names))


WALKED = _walked()


def _same_default(a, b) -> bool:
    if a is b:
        return True
    with contextlib.suppress(TypeError, RuntimeError):  # tensors, devices against strings
        if a == b:
            return True
    if isinstance(a, torch.device) or isinstance(b, torch.device):
        try:
            return torch.device(a) == torch.device(b)
        except (TypeError, RuntimeError):
            return False
    return repr(a) == repr(b)  # our torch-free stand-ins, e.g. load_model's torch.bfloat16


def _check_signature(theirs, ours, what: str) -> None:
    try:
        ts, os_ = inspect.signature(theirs), inspect.signature(ours)
    except (TypeError, ValueError):
        return
    tp, op = list(ts.parameters.values()), list(os_.parameters.values())
    var_kw = [p for p in op if p.kind is p.VAR_KEYWORD]
    for i, p in enumerate(tp):
        if p.kind is p.VAR_KEYWORD:
            assert var_kw, f"{what}: DiffSynth takes **{p.name}, ours does not"
            continue
        assert i < len(op), f"{what}: ours lacks parameter {p.name!r}"
        q = op[i]
        assert (q.name, q.kind) == (p.name, p.kind), f"{what}: parameter {i} is {q} here, {p} in DiffSynth"
        assert (p.default is p.empty) == (q.default is q.empty), (
            f"{what}: {p.name} default {q.default!r} vs {p.default!r}"
        )
        if p.default is not p.empty:
            assert _same_default(p.default, q.default), f"{what}: {p.name}={q.default!r}, DiffSynth {p.default!r}"


@pytest.mark.parametrize("ds_module,name", WALKED, ids=[f"{m}.{n}" for m, n in WALKED])
def test_name_is_mirrored_with_a_compatible_signature(ds_module, name):
    theirs = getattr(importlib.import_module(ds_module), name)
    ours_module = importlib.import_module(MIRROR[ds_module])
    assert hasattr(ours_module, name), f"{MIRROR[ds_module]} has no {name} ({ds_module} has)"
    ours = getattr(ours_module, name)
    if isinstance(theirs, type):
        assert isinstance(ours, type)
        _check_signature(theirs.__init__, ours.__init__, f"{name}.__init__")
        for attr, member in vars(theirs).items():
            if callable(member) and not attr.startswith("__"):
                assert hasattr(ours, attr), f"{name}.{attr} is missing"
                _check_signature(member, getattr(ours, attr), f"{name}.{attr}")
    elif callable(theirs):
        _check_signature(theirs, ours, name)
    elif name.isupper():
        assert type(ours) is type(theirs) and ours == theirs


def test_the_walk_covers_the_packages():
    assert len(WALKED) >= 50
    for pkg in PACKAGES:
        assert sum(m == pkg for m, _ in WALKED) >= 6


# --- files ---------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int64, torch.bool]


def _tensors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(DTYPES):
        if dtype == torch.bool:
            out[f"b.{i}.mask"] = torch.randint(0, 2, (3, 5), generator=g).bool()
        elif dtype == torch.int64:
            out[f"b.{i}.ids"] = torch.randint(-100, 100, (7,), generator=g)
        else:
            out[f"b.{i}.weight"] = torch.randn(4, 6, generator=g).to(dtype)
    out["scalar"] = torch.tensor(1.5)
    out["empty"] = torch.empty(0, 3)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    a, b = _tensors(1), _tensors(2)
    b = {k: v for k, v in list(b.items())[:4]} | {"extra.bias": torch.randn(6)}
    paths = {"a": str(d / "a.safetensors"), "b": str(d / "b.safetensors"), "bin": str(d / "a.bin")}
    safetensors.torch.save_file(a, paths["a"], metadata={"format": "pt", "layers": json.dumps(["x", "y"])})
    safetensors.torch.save_file(b, paths["b"], metadata={"layers": json.dumps(["y", "z"]), "other": "1"})
    torch.save(a, paths["bin"])
    torch.save({"state_dict": b}, str(d / "wrapped.pth"))
    paths["wrapped"] = str(d / "wrapped.pth")
    with open(paths["a"], "rb") as f:
        raw = f.read()
    with open(d / "truncated.safetensors", "wb") as f:
        f.write(raw[: len(raw) - 40])
    paths["truncated"] = str(d / "truncated.safetensors")
    paths["missing"] = str(d / "missing.safetensors")
    return paths


def _same_state_dict(x: dict, y: dict) -> None:
    assert list(x) == list(y)
    for k, a in x.items():
        b = y[k]
        if isinstance(a, dict):
            _same_state_dict(a, b)
            continue
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), k
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), k


PATH_FORMS = ["a", "bin", "wrapped", ["a"], ["a", "b"], ["b", "a"], ["a", "bin"], []]


def _resolve(files, form):
    return [files[f] for f in form] if isinstance(form, list) else files[form]


@pytest.mark.parametrize("form", PATH_FORMS, ids=str)
@pytest.mark.parametrize("torch_dtype", [None, torch.bfloat16, torch.float32, torch.float16], ids=str)
def test_load_state_dict(files, form, torch_dtype):
    path = _resolve(files, form)
    theirs = original("diffsynth.core.loader.file", "load_state_dict")(path, torch_dtype)
    ours = diffsynth_c.load_state_dict(path, torch_dtype)
    _same_state_dict(theirs, ours)
    # independent tensors, as DiffSynth's: no two share memory, and a second load shares none either
    again = diffsynth_c.load_state_dict(path, torch_dtype)
    ptrs = [t.untyped_storage().data_ptr() for t in ours.values() if t.numel()]
    assert len(ptrs) == len(set(ptrs))
    for k, t in ours.items():
        if t.numel() and t.dtype.is_floating_point:
            t.add_(1) if t.dtype not in (torch.float8_e4m3fn,) else t.view(torch.uint8).add_(1)
            assert torch.equal(again[k].reshape(-1).view(torch.uint8), theirs[k].reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("form", PATH_FORMS, ids=str)
@pytest.mark.parametrize("with_shape", [True, False])
def test_hashes_and_key_dicts(files, form, with_shape):
    path = _resolve(files, form)
    for name in ("hash_model_file",):
        assert getattr(diffsynth_c.loader.file, name)(path, with_shape) == original("diffsynth.core.loader.file", name)(
            path, with_shape
        )
    keys = original("diffsynth.core.loader.file", "load_keys_dict")(path)
    assert diffsynth_c.loader.file.load_keys_dict(path) == keys
    assert list(diffsynth_c.loader.file.load_keys_dict(path)) == list(keys)
    for name in ("convert_keys_dict_to_single_str",):
        assert getattr(diffsynth_c.loader.file, name)(keys, with_shape=with_shape) == original(
            "diffsynth.core.loader.file", name
        )(keys, with_shape=with_shape)
    sd = original("diffsynth.core.loader.file", "load_state_dict")(path)
    nested = {"outer": sd, "t": torch.zeros(2, 3), 3: torch.zeros(1), "skip": "text"}
    for name in ("convert_state_dict_keys_to_single_str", "hash_state_dict_keys"):
        for d in (sd, nested):
            assert getattr(diffsynth_c.loader.file, name)(d, with_shape=with_shape) == original(
                "diffsynth.core.loader.file", name
            )(d, with_shape=with_shape)
    assert diffsynth_c.loader.file.convert_state_dict_to_keys_dict(sd) == original(
        "diffsynth.core.loader.file", "convert_state_dict_to_keys_dict"
    )(sd)


@pytest.mark.parametrize("which", ["a", "b", "bin", "wrapped"])
def test_key_dicts_of_one_file(files, which):
    path = files[which]
    name = "load_keys_dict_from_safetensors" if path.endswith(".safetensors") else "load_keys_dict_from_bin"
    assert getattr(diffsynth_c.loader.file, name)(path) == original("diffsynth.core.loader.file", name)(path)


@pytest.mark.parametrize("form", ["a", "b", ["a", "b"], ["b", "a"], ["a", "a"]], ids=str)
def test_metadata(files, form):
    path = _resolve(files, form)
    assert diffsynth_c.loader.file.load_metadata_from_safetensors(path) == original(
        "diffsynth.core.loader.file", "load_metadata_from_safetensors"
    )(path)


@pytest.mark.parametrize(
    "old,new",
    [
        ('["a"]', '["b", "a"]'),
        ("x", "y"),
        ('{"a": 1}', '["b"]'),
        ('["a"]', "text"),
        ("[]", "[]"),
        ("1", "2"),
        ('["a"]', '{"b": 2}'),
    ],
)
def test_merge_metadata_value(old, new):
    assert diffsynth_c.loader.file.merge_metadata_value(old, new) == original(
        "diffsynth.core.loader.file", "merge_metadata_value"
    )(old, new)


def _raised(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001  the comparison is the point
        return e
    return None


@pytest.mark.parametrize("which", ["truncated", "missing"])
@pytest.mark.parametrize(
    "name",
    [
        "load_state_dict",
        "hash_model_file",
        "load_keys_dict",
        "load_metadata_from_safetensors",
        "load_state_dict_from_safetensors",
        "load_keys_dict_from_safetensors",
    ],
)
def test_what_catches_diffsynths_error_catches_ours(files, which, name):
    theirs = _raised(original("diffsynth.core.loader.file", name), files[which])
    ours = _raised(getattr(diffsynth_c.loader.file, name), files[which])
    assert theirs is not None and ours is not None
    assert isinstance(ours, type(theirs)), f"{type(ours).__mro__} is not caught by except {type(theirs).__name__}"
    assert files[which] in str(ours)
    if which == "truncated":
        assert isinstance(ours, (diffsynth_c.FormatError, safetensors.SafetensorError, ValueError))


# --- models ---------------------------------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self, width: int = 6):
        super().__init__()
        self.proj = torch.nn.Linear(4, width)
        self.norm = torch.nn.LayerNorm(width)
        self.register_buffer("ids", torch.arange(3))

    def forward(self, x):
        return self.norm(self.proj(x))


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(3)
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in Tiny().state_dict().items()}, path)
    return path


@pytest.mark.parametrize("torch_dtype", ["default", None, torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("use_disk_map", [False, True])
def test_load_model_dtypes(tiny_file, torch_dtype, use_disk_map):
    kw = {} if torch_dtype == "default" else {"torch_dtype": torch_dtype}
    theirs = original("diffsynth.core.loader.model", "load_model")(Tiny, tiny_file, use_disk_map=use_disk_map, **kw)
    ours = diffsynth_c.load_model(Tiny, tiny_file, use_disk_map=use_disk_map, **kw)
    _same_state_dict(theirs.state_dict(), ours.state_dict())
    assert (theirs.training, type(theirs.proj.weight)) == (ours.training, type(ours.proj.weight))


@pytest.mark.parametrize("device", ["default", None, "cpu", "meta", torch.device("meta")], ids=str)
def test_skip_model_initialization(device):
    def build(ctx):
        kw = {} if device == "default" else {"device": device}
        with ctx(**kw):
            m = torch.nn.Linear(3, 2)
            m.extra = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
        return m

    theirs = build(original("diffsynth.core.vram.initialization", "skip_model_initialization"))
    ours = build(diffsynth_c.skip_model_initialization)
    for name in ("weight", "bias", "extra"):
        a, b = getattr(theirs, name), getattr(ours, name)
        assert (type(a), a.device, a.dtype, a.requires_grad) == (type(b), b.device, b.dtype, b.requires_grad), name


def test_get_init_context():
    for fn in (original("diffsynth.core.loader.model", "get_init_context"), diffsynth_c.loader.model.get_init_context):
        contexts = fn(torch.bfloat16, "cpu")
        assert len(contexts) == 1
        with contexts[0]:
            m = torch.nn.Linear(2, 2)
        assert m.weight.is_meta


@pytest.mark.parametrize(
    "device",
    ["cuda", "cuda:1", "npu", "npu:0", "cpu", "mps", "meta", torch.device("cpu"), "nonsense", None, 3],
    ids=str,
)
def test_parse_device_type(device):
    from diffsynth.core.device import parse_device_type

    assert diffsynth_c.vram.parse_device_type(device) == parse_device_type(device)


def test_get_device_name_and_npu_flag():
    import diffsynth.core.vram as dv

    assert diffsynth_c.vram.get_device_name() == dv.get_device_name()
    assert diffsynth_c.vram.IS_NPU_AVAILABLE == dv.IS_NPU_AVAILABLE


BF16, F8 = torch.bfloat16, torch.float8_e4m3fn


def _vram(offload, onload, preparing, computation=(BF16, "cpu")):
    out = {}
    for s, (dt, dev) in zip(
        ("offload", "onload", "preparing", "computation"), (offload, onload, preparing, computation)
    ):
        out[f"{s}_dtype"], out[f"{s}_device"] = dt, dev
    return out


VRAM = {
    "resident": _vram((BF16, "cpu"), (BF16, "cpu"), (BF16, "cpu")),
    "fp8": _vram((F8, "cpu"), (F8, "cpu"), (F8, "cpu")),
    "f32_store": _vram((torch.float32, "cpu"), (torch.float32, "cpu"), (torch.float32, "cpu")),
    "disk": _vram(("disk", "disk"), ("disk", "disk"), (BF16, "cpu")),
    "disk_fp8": _vram(("disk", "disk"), ("disk", "disk"), (F8, "cpu")),
}


@pytest.mark.parametrize("name", list(VRAM))
def test_fill_vram_config(name, capsys):
    theirs = original("diffsynth.core.vram.layers", "fill_vram_config")(Tiny(), VRAM[name])
    printed = capsys.readouterr().out
    ours = diffsynth_c.vram.fill_vram_config(Tiny(), VRAM[name])
    assert ours == theirs and capsys.readouterr().out == printed


class Counting(torch.nn.Module):
    """A module whose forward sets state on itself."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.last_shape = tuple(x.shape)
        return self.lin(x)


@pytest.fixture(scope="module")
def counting_file(tmp_path_factory):
    torch.manual_seed(4)
    path = str(tmp_path_factory.mktemp("counting") / "c.safetensors")
    safetensors.torch.save_file({k: v.to(BF16).contiguous() for k, v in Counting().state_dict().items()}, path)
    return path


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Counting()

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("name", list(VRAM))
@pytest.mark.parametrize("wrapper", ["AutoWrappedModule", "AutoWrappedNonRecurseModule"])
def test_state_set_in_forward_persists_exactly_when_diffsynths_does(
    counting_file, tmp_path, name, wrapper, monkeypatch
):
    monkeypatch.setattr(torch.cpu, "mem_get_info", lambda device=None: (4 << 30, 16 << 30), raising=False)
    path = str(tmp_path / "outer.safetensors")
    safetensors.torch.save_file({"inner." + k: v for k, v in safetensors.torch.load_file(counting_file).items()}, path)
    import diffsynth.core.vram.layers as DL

    from diffsynth_c.vram import layers as L

    results = []
    for load, cls in (
        (original("diffsynth.core.loader.model", "load_model"), getattr(DL, wrapper)),
        (diffsynth_c.load_model, getattr(L, wrapper)),
    ):
        model = load(Outer, path, module_map={Counting: cls}, vram_config=VRAM[name])
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(5)).to(BF16)
        try:
            with torch.no_grad():
                outs = [model(x), model(x)]
        except Exception as e:  # noqa: BLE001  DiffSynth's failures must be ours too
            results.append((type(e), None, None, None))
            continue
        inner = model.inner.module
        results.append((outs, inner.calls, getattr(inner, "last_shape", None), model.inner.state))
    (a, *ra), (b, *rb) = results
    assert ra == rb
    if isinstance(a, type):
        assert isinstance(b, type) and issubclass(b, a), (a, b)
    else:
        assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("name", ["fp8", "disk"])
def test_torch_compile_breaks_no_more_than_diffsynth(tiny_file, name, monkeypatch):
    monkeypatch.setattr(torch.cpu, "mem_get_info", lambda device=None: (4 << 30, 16 << 30), raising=False)
    import diffsynth.core.vram.layers as DL

    from diffsynth_c.vram import layers as L

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(6)).to(BF16)
    counts, outs = [], []
    for load, mod in ((original("diffsynth.core.loader.model", "load_model"), DL), (diffsynth_c.load_model, L)):
        module_map = {torch.nn.Linear: mod.AutoWrappedLinear, torch.nn.LayerNorm: mod.AutoWrappedModule}
        model = load(Tiny, tiny_file, module_map=module_map, vram_config=VRAM[name])
        for m in model.modules():
            if m is not model and hasattr(m, "onload"):
                m.onload()
        with torch.no_grad():
            torch._dynamo.reset()
            counts.append(torch._dynamo.explain(model)(x).graph_break_count)
            torch._dynamo.reset()
            outs.append(torch.compile(model, backend="eager")(x))
            outs.append(model(x))
        torch._dynamo.reset()
    assert counts[1] <= counts[0], counts
    assert all(torch.equal(outs[0], o) for o in outs[1:])


# --- ModelConfig ----------------------------------------------------------------------------------
def test_download_source_box_is_diffsynths():
    code = (
        "import os, io, contextlib\n"
        "import diffsynth.core.loader.config as D\n"
        "import diffsynth_c.loader.config as O\n"
        "cases = [{}, {'MODELSCOPE_ENDPOINT': 'https://modelscope.ai'}, {'MODELSCOPE_DOMAIN': 'modelscope.ai'},\n"
        "         {'DIFFSYNTH_DOWNLOAD_SOURCE': 'HuggingFace'}, {'DIFFSYNTH_SKIP_DOWNLOAD': 'True'}, {'DIFFSYNTH_SKIP_DOWNLOAD': 'false'}]\n"
        "n = 0\n"
        "for env in cases:\n"
        "    for src in (None, 'huggingface', 'ModelScope'):\n"
        "        os.environ.update(env)\n"
        "        out = []\n"
        "        for mod in (D, O):\n"
        "            mod._download_tips_printed = False\n"
        "            buf = io.StringIO()\n"
        "            with contextlib.redirect_stdout(buf):\n"
        "                mod.ModelConfig(path='x', download_source=src).check_download_source()\n"
        "                mod.ModelConfig(path='x', download_source=src).check_download_source()\n"
        "            out.append(buf.getvalue())\n"
        "        assert out[0] == out[1] and out[0].count('\\u221a') == 1, (env, src, out)\n"
        "        n += 1\n"
        "        for k in env: del os.environ[k]\n"
        "print(n)\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) == 18


# --- patched, in fresh interpreters --------------------------------------------------------------
PATCHED_CASES = r"""
import sys, json, torch, importlib, pkgutil
import diffsynth_c
from diffsynth_c.patch import original
ORDER = sys.argv[1]
files = json.loads(sys.argv[2])

def pipelines():
    import diffsynth.pipelines as P
    n = 0
    for m in pkgutil.iter_modules(P.__path__):
        try:
            importlib.import_module("diffsynth.pipelines." + m.name)
            n += 1
        except ModuleNotFoundError:
            pass  # a pipeline whose optional dependency (torchaudio) is not installed
    return n

if ORDER == "after":
    n_pipelines = pipelines()
diffsynth_c.patch_diffsynth()
if ORDER == "before":
    n_pipelines = pipelines()

from diffsynth.core.loader.config import ModelConfig as DsName
import diffsynth.core.loader as DL, diffsynth.core.vram as DV, diffsynth.core.loader.file as DF
from diffsynth.models.model_loader import ModelPool
from diffsynth_c.loader.config import ModelConfig as Ours
cases = 0

def same(a, b):
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a: same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    else:
        assert a == b, (a, b)

# every ModelConfig default of the pipeline signatures is ours, whatever the import order
defaults = 0
for name, mod in list(sys.modules.items()):
    if name.startswith("diffsynth.pipelines.") and mod is not None:
        for f in diffsynth_c.patch._functions(mod):
            for v in list(f.__defaults__ or ()) + list((f.__kwdefaults__ or {}).values()):
                if type(v).__name__ == "ModelConfig":
                    assert type(v) is Ours, (name, f.__qualname__, type(v))
                    defaults += 1
assert DsName is Ours
cases += defaults

for path in files["paths"]:
    for dtype in (None, torch.bfloat16, torch.float32):
        same(DL.load_state_dict(path, dtype), original("diffsynth.core.loader.file", "load_state_dict")(path, dtype))
        cases += 1
    for fn in ("hash_model_file", "load_keys_dict", "load_metadata_from_safetensors"):
        if fn == "load_metadata_from_safetensors" and not str(path).endswith("safetensors"):
            continue
        a, b = getattr(DF, fn)(path), original("diffsynth.core.loader.file", fn)(path)
        if fn == "load_metadata_from_safetensors":
            assert a == b  # safetensors' metadata dict has no defined order
        else:
            same(a, b)
        cases += 1

# a whole model through DiffSynth's pool: the same parameters as unpatched DiffSynth's loader builds
pool = ModelPool()
pool.auto_load_model(files["model"])
model = pool.model[0]
ref = original("diffsynth.core.loader.model", "load_model")(type(model), files["model"], config=files.get("config") or {},
                                                                use_disk_map=True)
assert type(model).__module__.startswith("diffsynth.")
same(dict(model.state_dict()), dict(ref.state_dict()))
cases += 1

# DiffSynth's quantised layer and the patched entry points
lin = torch.nn.Linear(4, 3)
m = DV.AutoWrappedQuantizedModule(lin, computation_dtype=torch.float32, computation_device="cpu")
x = torch.randn(2, 4)
same(m(x), lin(x))
cases += 1
print(json.dumps({"cases": cases, "defaults": defaults, "pipelines": n_pipelines}))
"""


@pytest.fixture(scope="module")
def lpips_like(tmp_path_factory):
    from .test_model_loading import lpips_file

    return lpips_file(tmp_path_factory.mktemp("pool"))


@pytest.mark.parametrize("order", ["before", "after"])
def test_patched_diffsynth_gives_diffsynths_results(files, lpips_like, order):
    from diffsynth.configs import MODEL_CONFIGS

    config = next(c for c in MODEL_CONFIGS if c["model_name"] == "image_metrics_lpips_squeeze").get("extra_kwargs")
    arg = json.dumps(
        {"paths": [files["a"], files["bin"], [files["a"], files["b"]]], "model": lpips_like, "config": config}
    )
    r = run_python(PATCHED_CASES.replace("sys.argv[1]", repr(order)).replace("sys.argv[2]", repr(arg)), timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["defaults"] >= 24 and out["pipelines"] >= 20, out
    print(f"patched-{order}: {out}")


def test_unpatch_gives_diffsynths_defaults_back():
    r = run_python(
        "import diffsynth_c\n"
        "import diffsynth.pipelines.qwen_image as q\n"
        "from diffsynth_c.patch import original\n"
        "theirs = original('diffsynth.core.loader.config', 'ModelConfig')\n"
        "f = q.QwenImagePipeline.from_pretrained\n"
        "before = f.__defaults__\n"
        "diffsynth_c.patch_diffsynth()\n"
        "assert all(type(v) is diffsynth_c.ModelConfig for v in f.__defaults__ if type(v).__name__ == 'ModelConfig')\n"
        "diffsynth_c.unpatch_diffsynth()\n"
        "assert f.__defaults__ is before\n"
        "diffsynth_c.patch_diffsynth()\n"
        "import diffsynth.pipelines.z_image as z\n"
        "g = z.ZImagePipeline.from_pretrained\n"
        "diffsynth_c.unpatch_diffsynth()\n"
        "vs = [v for v in (g.__defaults__ or ()) if type(v).__name__ == 'ModelConfig']\n"
        "assert vs and all(type(v) is theirs for v in vs), [type(v) for v in vs]\n"
        "print('ok')\n",
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_parameters_with_attributes_survive_skip_model_initialization():
    """Deliberately more lenient than DiffSynth (docs/migrating.md): a parameter carrying its own
    attributes is kept, attributes included, where DiffSynth's context manager raises."""

    def build(ctx):
        with ctx():
            m = torch.nn.Module()
            p = torch.nn.Parameter(torch.zeros(2))
            p.tag = "kept"
            m.p = p
        return m

    with pytest.raises(TypeError):
        build(original("diffsynth.core.vram.initialization", "skip_model_initialization"))
    m = build(diffsynth_c.skip_model_initialization)
    assert m.p.is_meta and m.p.tag == "kept" and m.p.requires_grad


def test_safetensors_compatible_binary_loader_gives_diffsynths_answers(tmp_path, capsys):
    from diffsynth.core.vram import disk_map as theirs_module

    from diffsynth_c.vram import disk_map as ours_module

    path = tmp_path / "m.bin"
    g = torch.Generator().manual_seed(0)
    torch.save({"a": torch.randn(3, 4, generator=g), "b": torch.arange(6).to(torch.bfloat16).view(2, 3)}, path)
    theirs = theirs_module.SafetensorsCompatibleBinaryLoader(str(path), device="cpu")
    printed_theirs = capsys.readouterr().out
    ours = ours_module.SafetensorsCompatibleBinaryLoader(str(path), device="cpu")
    assert capsys.readouterr().out == printed_theirs
    assert list(ours.keys()) == list(theirs.keys())
    for k in list(theirs.keys()):
        a, b = ours.get_tensor(k), theirs.get_tensor(k)
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        assert ours.get_slice(k).get_shape() == theirs.get_slice(k).get_shape()
        assert isinstance(ours.get_slice(k), ours_module.SafetensorsCompatibleTensor)
    with pytest.raises(KeyError):
        theirs.get_tensor("missing")
    with pytest.raises(KeyError):
        ours.get_tensor("missing")
