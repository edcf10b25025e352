"""The VRAM-managed layers against DiffSynth's, on a real DiffSynth model class at a small size.

Every configuration of DiffSynth's VRAM management guide (CPU offload, FP8 storage, dynamic
``vram_limit``, disk offload), with the computation on the CPU: our ``load_model`` with our
layers and DiffSynth's ``load_model`` with its layers give bit-identical outputs, pass after pass,
and their layers end in the same states. Then the prefetch scheduler's own promises (order learned,
relearned when it changes, never a stale weight) and the bad configurations that must fail at
``enable_vram_management`` time.
"""

from __future__ import annotations

import copy
import importlib

import diffsynth.core.vram.layers as DL
import pytest
import safetensors.torch
import torch
from diffsynth.configs.vram_management_module_maps import VRAM_MANAGEMENT_MODULE_MAPS
from diffsynth.models.wan_video_dit import WanModel, sinusoidal_embedding_1d

import diffsynth_c
from diffsynth_c.patch import original
from diffsynth_c.vram import layers as L
from diffsynth_c.vram.prefetch import Scheduler

from .conftest import run_python

BF16, F8 = torch.bfloat16, torch.float8_e4m3fn
WAN = {
    "dim": 256,
    "in_dim": 16,
    "ffn_dim": 512,
    "out_dim": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "eps": 1e-6,
    "patch_size": (1, 2, 2),
    "num_heads": 2,
    "num_layers": 2,
    "has_image_input": False,
}


def _cls(dotted: str) -> type:
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


DS_MAP = {_cls(k): _cls(v) for k, v in VRAM_MANAGEMENT_MODULE_MAPS["diffsynth.models.wan_video_dit.WanModel"].items()}
_OURS = {
    DL.AutoWrappedLinear: L.AutoWrappedLinear,
    DL.AutoWrappedModule: L.AutoWrappedModule,
    DL.AutoWrappedNonRecurseModule: L.AutoWrappedNonRecurseModule,
}
OUR_MAP = {k: _OURS[v] for k, v in DS_MAP.items()}


def _config(offload, onload, preparing, computation=(BF16, "cpu")) -> dict:
    out = {}
    for state, (dtype, device) in zip(
        ("offload", "onload", "preparing", "computation"), (offload, onload, preparing, computation)
    ):
        out[f"{state}_dtype"], out[f"{state}_device"] = dtype, device
    return out


# the guide's configurations, computing on the CPU
GUIDE = {
    "cpu_offload": _config((BF16, "cpu"), (BF16, "cpu"), (BF16, "cpu")),
    "fp8_storage": _config((F8, "cpu"), (F8, "cpu"), (F8, "cpu")),
    "disk_fp8": _config(("disk", "disk"), ("disk", "disk"), (F8, "cpu")),
    "disk_bf16": _config(("disk", "disk"), ("disk", "disk"), (BF16, "cpu")),
}


@pytest.fixture(scope="module")
def wan_file(tmp_path_factory):
    torch.manual_seed(0)
    model = WanModel(**WAN).to(BF16)
    path = tmp_path_factory.mktemp("wan") / "wan.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture
def fake_memory(monkeypatch):
    """torch.cpu.mem_get_info for both implementations: 12 GiB of 16 used."""
    monkeypatch.setattr(torch.cpu, "mem_get_info", lambda device=None: (4 << 30, 16 << 30), raising=False)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(1, 16, 2, 8, 8, generator=g).to(BF16),
        torch.tensor([500.0]),
        torch.randn(1, 7, 32, generator=g).to(BF16),
    )


def run_wan(model, x, t, ctx):
    """WanModel's forward, as DiffSynth's Wan pipeline drives it (embeddings, blocks, head)."""
    te = model.time_embedding(sinusoidal_embedding_1d(model.freq_dim, t).to(x.dtype))
    tm = model.time_projection(te).unflatten(1, (6, model.dim))
    c = model.text_embedding(ctx)
    x = model.patch_embedding(x)
    f, h, w = x.shape[2:]
    x = x.flatten(2).transpose(1, 2).contiguous()
    freqs = torch.cat(
        [
            model.freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            model.freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            model.freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    for block in model.blocks:
        x = block(x, c, tm, freqs)
    return model.head(x, te)


def load_both(path, vram_config, vram_limit):
    theirs = original("diffsynth.core.loader.model", "load_model")(
        WanModel, path, config=WAN, module_map=DS_MAP, vram_config=vram_config, vram_limit=vram_limit
    )
    ours = diffsynth_c.load_model(
        WanModel, path, config=WAN, module_map=OUR_MAP, vram_config=vram_config, vram_limit=vram_limit
    )
    return theirs, ours


def states(model):
    return [(n, type(m).__name__, m.state) for n, m in model.named_modules() if hasattr(m, "state")]


def passes(model, n=3, cycle=False):
    """n forwards; with cycle, the pipeline's offload()/onload() of every layer before each."""
    x, t, ctx = _inputs()
    outs = []
    for _ in range(n):
        if cycle:
            for m in model.modules():
                if hasattr(m, "offload") and m is not model:
                    m.offload()
            for m in model.modules():
                if hasattr(m, "onload") and m is not model:
                    m.onload()
        with torch.no_grad():
            outs.append(run_wan(model, x, t, ctx))
    return outs


@pytest.mark.parametrize(
    "name,vram_limit",
    [
        ("cpu_offload", None),
        ("fp8_storage", None),
        ("fp8_storage", 0),
        ("disk_fp8", None),
        ("disk_fp8", 0),
        ("disk_fp8", 13),
        ("disk_bf16", 0),
    ],
)
def test_guide_configs_match_diffsynth(wan_file, fake_memory, name, vram_limit):
    theirs, ours = load_both(wan_file, GUIDE[name], vram_limit)
    assert states(ours) == [(n, c, s) for n, c, s in states(theirs)]
    a, b = passes(theirs, cycle=True), passes(ours, cycle=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert states(ours) == states(theirs)
    assert ours.vram_management_enabled is True


def test_scheduler_learns_the_order_and_fetches_ahead(wan_file):
    _, ours = load_both(wan_file, GUIDE["fp8_storage"], 0)
    layers = [m for m in ours.modules() if isinstance(m, L.AutoTorchModule) and m.current_need() is not None]
    for m in ours.modules():
        if hasattr(m, "onload"):
            m.onload()
    passes(ours, n=3)
    stats = L.scheduler_of(ours).stats
    # first pass on demand (plus the first layer of the second); everything after fetched ahead
    assert stats["misses"] == len(layers) + 1
    assert stats["hits"] == 3 * len(layers) - stats["misses"]
    assert stats["relearned"] == 0 and stats["stale"] == 0


def test_prefetch_off_gives_the_same_results(wan_file, monkeypatch):
    _, ours = load_both(wan_file, GUIDE["disk_fp8"], 0)
    ahead = passes(ours)
    monkeypatch.setenv("DIFFSYNTH_C_PREFETCH", "0")
    assert all(torch.equal(x, y) for x, y in zip(ahead, passes(ours)))


def test_a_changed_order_is_relearned_never_miscomputed(wan_file):
    theirs, ours = load_both(wan_file, GUIDE["fp8_storage"], 0)
    x, t, _ctx = _inputs()
    passes(ours, n=2)
    # another branch: only the first block, then the head twice
    with torch.no_grad():
        for model in (theirs, ours):
            te = model.time_embedding(sinusoidal_embedding_1d(model.freq_dim, t).to(x.dtype))
            model._branch = model.head(model.blocks[0].ffn(torch.ones(1, 8, 256, dtype=BF16)), te)
    assert torch.equal(theirs._branch, ours._branch)
    assert L.scheduler_of(ours).stats["relearned"] >= 1
    a, b = passes(theirs, n=2), passes(ours, n=2)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_a_weight_rewritten_after_its_prefetch_is_fetched_again(wan_file):
    """After a pass, the first layers of the next one are already in flight; a LoRA fused into
    one of them (load_state_dict copies in place) must be seen by the next forward."""
    theirs, ours = load_both(wan_file, GUIDE["fp8_storage"], 0)
    passes(ours, n=2)
    scheduler = L.scheduler_of(ours)
    first = scheduler.order[0]
    assert id(first) in scheduler.inflight
    name = next(n for n, m in ours.named_modules() if m is first)
    theirs_layer = dict(theirs.named_modules())[name]
    new = {k: (v.float() * 0.5).to(v.dtype) for k, v in first.state_dict().items()}
    first.load_state_dict(new)
    theirs_layer.load_state_dict(new)
    a, b = passes(theirs, n=1), passes(ours, n=1)
    assert torch.equal(a[0], b[0])
    assert scheduler.stats["stale"] >= 1


def test_lora_hot_load_matches_diffsynth(wan_file):
    theirs, ours = load_both(wan_file, GUIDE["fp8_storage"], 0)
    g = torch.Generator().manual_seed(3)
    for model in (theirs, ours):
        layer = model.blocks[0].self_attn.q
        g.manual_seed(3)
        layer.lora_A_weights.append(torch.randn(4, 256, generator=g).to(BF16))
        layer.lora_B_weights.append(torch.randn(256, 4, generator=g).to(BF16))
    a, b = passes(theirs, n=2), passes(ours, n=2)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def _linear_stack(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 32, bias=False)).to(BF16)


def test_fp8_computation_matches_diffsynth():
    vram_config = _config((BF16, "cpu"), (BF16, "cpu"), (BF16, "cpu"), (F8, "cpu"))
    base = _linear_stack()
    theirs = DL.enable_vram_management(copy.deepcopy(base), {torch.nn.Linear: DL.AutoWrappedLinear}, vram_config)
    ours = L.enable_vram_management(copy.deepcopy(base), {torch.nn.Linear: L.AutoWrappedLinear}, vram_config)
    assert ours[0].enable_fp8 and theirs[0].enable_fp8
    x = torch.randn(5, 64).to(BF16)
    for _ in range(2):
        assert torch.equal(theirs(x), ours(x))


def test_whole_model_wrapped_as_one_layer(capsys):
    vram_config = _config((BF16, "cpu"), (BF16, "cpu"), (BF16, "cpu"), (torch.float32, "cpu"))
    base = _linear_stack()
    theirs = DL.enable_vram_management(copy.deepcopy(base), {torch.nn.Sequential: DL.AutoWrappedModule}, vram_config)
    theirs_msg = capsys.readouterr().out
    ours = L.enable_vram_management(copy.deepcopy(base), {torch.nn.Sequential: L.AutoWrappedModule}, vram_config)
    assert capsys.readouterr().out == theirs_msg and "No fine-grained VRAM configuration" in theirs_msg
    assert isinstance(ours, L.AutoWrappedModule) and ours.vram_management_enabled
    theirs.onload()
    ours.onload()
    x = torch.randn(5, 64)
    assert torch.equal(theirs(x), ours(x)) and ours(x).dtype == torch.float32
    assert isinstance(getattr(ours, "0"), torch.nn.Linear)  # attributes come from the wrapped module


def test_copies_of_a_managed_model_share_its_scheduler(wan_file):
    _, ours = load_both(wan_file, GUIDE["fp8_storage"], 0)
    twin = copy.deepcopy(ours)
    assert L.scheduler_of(twin) is L.scheduler_of(ours)
    assert all(torch.equal(p, q) for p, q in zip(passes(ours, n=1), passes(twin, n=1)))


def test_disk_offload_leaves_weights_on_meta_and_reads_them_back(wan_file):
    _, ours = load_both(wan_file, GUIDE["disk_bf16"], 0)
    q = ours.blocks[0].self_attn.q
    assert q.weight.is_meta and q.disk_offload
    assert q.disk_map.read_host("blocks.0.self_attn.q.weight").dtype == BF16
    out = passes(ours, n=1)[0]
    assert torch.isfinite(out.float()).all() and q.weight.is_meta


# --- bad configurations, refused at enable time ----------------------------------------------
def _enable(vram_config, disk_map=None, module_map=None):
    return L.enable_vram_management(
        _linear_stack(), module_map or {torch.nn.Linear: L.AutoWrappedLinear}, vram_config, disk_map=disk_map
    )


def test_unknown_key_is_refused():
    cfg = dict(GUIDE["cpu_offload"], offload_dtyp=BF16)
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'offload_dtyp'; the keys are offload_dtype"):
        _enable(cfg)


def test_missing_computation_device_is_refused():
    cfg = {k: v for k, v in GUIDE["cpu_offload"].items() if k != "computation_device"}
    with pytest.raises(ValueError, match="'computation_device' is required"):
        _enable(cfg)


def test_disk_must_be_reached_in_order():
    with pytest.raises(ValueError, match="onload on 'disk' needs offload on 'disk'"):
        _enable(_config((BF16, "cpu"), ("disk", "disk"), (BF16, "cpu")))
    with pytest.raises(ValueError, match="'disk' must be both or neither"):
        _enable(_config((BF16, "disk"), (BF16, "cpu"), (BF16, "cpu")))


def test_disk_offload_needs_a_safetensors_disk_map(tmp_path):
    with pytest.raises(ValueError, match="needs a disk_map"):
        _enable(GUIDE["disk_bf16"])
    bin_path = tmp_path / "model.bin"
    torch.save(_linear_stack().state_dict(), bin_path)
    with pytest.raises(ValueError, match=r"model\.bin: disk offload reads tensors one by one from \.safetensors"):
        _enable(GUIDE["disk_bf16"], disk_map=diffsynth_c.DiskMap(str(bin_path), "cpu"))


def test_load_model_refuses_disk_offload_of_a_torch_checkpoint(tmp_path):
    bin_path = tmp_path / "model.bin"
    torch.save(_linear_stack().state_dict(), bin_path)
    with pytest.raises(ValueError, match=r"model\.bin: disk offload"):
        diffsynth_c.load_model(
            _linear_stack,
            str(bin_path),
            module_map={torch.nn.Linear: L.AutoWrappedLinear},
            vram_config=GUIDE["disk_bf16"],
        )


def test_module_map_of_non_modules_is_refused():
    with pytest.raises(TypeError, match="module_map: value .* is not a torch.nn.Module class"):
        _enable(GUIDE["cpu_offload"], module_map={torch.nn.Linear: "AutoWrappedLinear"})
    with pytest.raises(TypeError, match="module_map: key 3 is not a torch.nn.Module class"):
        _enable(GUIDE["cpu_offload"], module_map={3: L.AutoWrappedLinear})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_fp8_computation_on_a_gpu_that_is_not_there_is_refused():
    with pytest.raises(ValueError, match="needs fp8 matrix multiplication, which cuda is not available"):
        _enable(_config((BF16, "cpu"), (BF16, "cpu"), (BF16, "cpu"), (F8, "cuda")))


# --- the scheduler on its own --------------------------------------------------------------------
class _Layer:
    def __init__(self, t):
        self.t = t

    def current_need(self):
        from diffsynth_c.vram.prefetch import Need

        return Need(["w"], [self.t], [None], [torch.float32], "cpu")


def test_scheduler_bounds_what_is_in_flight(monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_C_PREFETCH_DEPTH", "3")
    monkeypatch.setenv("DIFFSYNTH_C_PREFETCH_MIB", "1")
    layers = [_Layer(torch.full((1 << 17,), float(i), dtype=BF16)) for i in range(6)]  # 256 KiB each
    s = Scheduler()
    for _ in range(2):
        for layer in layers:
            out = s.fetch(layer, layer.current_need())
            assert torch.equal(out["w"], layer.t.float())
            assert len(s.inflight) <= 3 and sum(t.nbytes for t in s.inflight.values()) <= 1 << 20
    # the first pass records the order; the second pass's first layer ends the recording
    assert s.stats["misses"] == 7 and s.stats["hits"] == 5
    s.close()


def test_patch_puts_our_layers_in_diffsynth_and_its_checks_still_see_its_own():
    from diffsynth.diffusion import base_pipeline

    theirs = DL.AutoWrappedLinear(torch.nn.Linear(4, 4), computation_dtype=torch.float32, computation_device="cpu")
    diffsynth_c.patch_diffsynth()
    try:
        assert base_pipeline.AutoTorchModule is L.AutoTorchModule
        import diffsynth.core.vram.layers as patched

        assert patched.AutoWrappedLinear is L.AutoWrappedLinear
        assert isinstance(theirs, base_pipeline.AutoTorchModule)
        assert isinstance(theirs, base_pipeline.LoRAHotLoadMixin)
    finally:
        diffsynth_c.unpatch_diffsynth()
    assert base_pipeline.AutoTorchModule is DL.AutoTorchModule
    assert not isinstance(theirs, L.AutoTorchModule)


def test_a_layer_moved_while_its_prefetch_runs_neither_deadlocks_nor_crashes():
    """A layer's weights rewritten by the main thread (module.to() sets .data when the layer enters
    preparing) while a worker still casts them: the workers read aliases made on the calling
    thread, with autograd off. Before, the worker's view took the weight's autograd lock and waited
    for the GIL held by the main thread, which waited for that lock: the suite hung in CI."""
    r = run_python(
        """
import time, torch
from diffsynth_c.vram.prefetch import Need, ThreadTransport
p = torch.nn.Parameter(torch.randn(64, 1024))
transport = ThreadTransport()
pending, n, end = [], 0, time.time() + 3
with torch.no_grad():  # as pipelines run: the workers' own grad mode is what matters
    while time.time() < end:
        pending.append(transport.start(Need(["weight"], [p], [None], [torch.bfloat16], "cpu")))
        p.data = torch.randn(64, 1024)  # what module.to() does to a layer's weights
        if len(pending) > 4:
            pending.pop(0).result()
        n += 1
for f in pending:
    f.result()
print("ok", n > 100)
""",
        timeout=90,
    )
    assert r.returncode == 0 and r.stdout.split() == ["ok", "True"], (r.returncode, r.stdout, r.stderr[-2000:])


def test_weights_that_need_grad_are_cast_on_the_callers_thread():
    """With autograd recording through the weights, the cast is part of the caller's graph (as in
    DiffSynth): no prefetch on a worker for them."""
    from diffsynth_c.vram.prefetch import Need, _needs_grad

    p = torch.nn.Parameter(torch.randn(4, 4))
    need = Need(["weight"], [p], [None], [torch.bfloat16], "cpu")
    assert _needs_grad(need)
    with torch.no_grad():
        assert not _needs_grad(need)
    p.requires_grad_(False)
    assert not _needs_grad(need)


def test_every_signature_spells_the_one_definition_of_the_vram_states():
    """The eight state parameters are written out in each signature (DiffSynth's are), so a test
    keeps them equal to the one definition in core/vram_state.py, and to DiffSynth's own."""
    import dataclasses
    import inspect

    from diffsynth.core.loader.config import ModelConfig as DSModelConfig

    from diffsynth_c.core.vram_state import MODEL_CONFIG_KEYS, VRAM_CONFIG_KEYS
    from diffsynth_c.loader.config import ModelConfig

    def vram_params(fn):
        return tuple(p for p in inspect.signature(fn).parameters if p.endswith(("_dtype", "_device")))

    for fn in (
        L.AutoTorchModule.__init__,
        L.AutoTorchModule.set_dtype_and_device,
        L.AutoWrappedModule.__init__,
        L.AutoWrappedNonRecurseModule.__init__,
        L.AutoWrappedLinear.__init__,
        L.AutoWrappedQuantizedModule.__init__,
        DL.AutoTorchModule.__init__,
        DL.AutoWrappedLinear.__init__,
    ):
        assert vram_params(fn) == VRAM_CONFIG_KEYS, fn.__qualname__
    for cls in (ModelConfig, DSModelConfig):
        fields = tuple(f.name for f in dataclasses.fields(cls) if f.name.endswith(("_dtype", "_device")))
        assert fields == MODEL_CONFIG_KEYS, cls
    cfg = ModelConfig(path="x", offload_dtype=BF16, computation_device="cpu")
    assert cfg.vram_config() == DSModelConfig(path="x", offload_dtype=BF16, computation_device="cpu").vram_config()
    assert list(cfg.vram_config()) == list(DSModelConfig(path="x").vram_config())
    layer = L.AutoWrappedLinear(torch.nn.Linear(2, 3), offload_dtype="disk", computation_dtype=BF16)
    assert (layer.offload_device, layer.onload_dtype, layer.onload_device) == ("disk", BF16, None)
