"""``quantize=``: DiffSynth's quantised loads and layers against ours, through one CPU backend
registered with DiffSynth's own ``register_quant_backend`` (tests/quant_cpu_backend.py).

Each case loads the same file with DiffSynth's ``load_model`` (its layers) and with ours (our
layers, our reads), then compares the layer types and states and the outputs, pass after pass, the
pipeline's offload/onload cycle in between: online quantisation (dynamic and dequant-once), a
pre-quantised checkpoint with its metadata, VRAM management with quantised layers (CPU offload and
disk offload of a pre-quantised checkpoint), LoRA hot-loading on quantised layers, and
``load_model_with_disk_offload``.
"""

from __future__ import annotations

import diffsynth.core.vram.layers as DL
import pytest
import safetensors.torch
import torch
from diffsynth.core.quant import QuantizeConfig

import diffsynth_c
from diffsynth_c.patch import original
from diffsynth_c.vram import layers as L

from . import quant_cpu_backend as qb
from .conftest import run_python

BF16, F8 = torch.bfloat16, torch.float8_e4m3fn


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(32, 32), torch.nn.Linear(32, 32, bias=False)])
        self.proj_out = torch.nn.Linear(32, 8)

    def forward(self, x):
        x = self.norm(self.proj_in(x))
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.proj_out(x)


DS_MAP = {torch.nn.Linear: DL.AutoWrappedLinear, torch.nn.LayerNorm: DL.AutoWrappedModule}
OUR_MAP = {torch.nn.Linear: L.AutoWrappedLinear, torch.nn.LayerNorm: L.AutoWrappedModule}


def _config(offload, onload, preparing, computation=(BF16, "cpu")) -> dict:
    out = {}
    for state, (dtype, device) in zip(
        ("offload", "onload", "preparing", "computation"), (offload, onload, preparing, computation)
    ):
        out[f"{state}_dtype"], out[f"{state}_device"] = dtype, device
    return out


CPU = _config((BF16, "cpu"), (BF16, "cpu"), (BF16, "cpu"))
DISK_BF16 = _config(("disk", "disk"), ("disk", "disk"), (BF16, "cpu"))
DISK_F8 = _config(("disk", "disk"), ("disk", "disk"), (F8, "cpu"))


def cfg(**kw):
    return QuantizeConfig(method=qb.METHOD, exclude_modules=["proj_out"], **kw)


@pytest.fixture(scope="module")
def fp_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("q") / "net.safetensors"
    safetensors.torch.save_file({k: v.to(BF16).contiguous() for k, v in Net().state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def prequantized_file(fp_file, tmp_path_factory):
    model = Net()
    model.load_state_dict(safetensors.torch.load_file(fp_file))
    c = cfg()
    c.quantize_model(model)
    tensors, metadata = c.flatten_state_dict(model.state_dict())
    path = tmp_path_factory.mktemp("q") / "net-int8.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return str(path)


@pytest.fixture
def fake_memory(monkeypatch):
    monkeypatch.setattr(torch.cpu, "mem_get_info", lambda device=None: (4 << 30, 16 << 30), raising=False)


def layers(model):
    return [(n, type(m).__name__, getattr(m, "state", None)) for n, m in model.named_modules() if n]


def passes(model, n=3, cycle=False):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)).to(BF16)
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
            outs.append(model(x))
    return outs


def both(path, **kw):
    module_map = kw.pop("module_map", None)
    theirs = original("diffsynth.core.loader.model", "load_model")(
        Net, path, module_map=None if module_map is None else DS_MAP, **kw
    )
    ours = diffsynth_c.load_model(Net, path, module_map=None if module_map is None else OUR_MAP, **kw)
    return theirs, ours


def assert_same(theirs, ours, cycle=False):
    assert layers(ours) == layers(theirs)
    a, b = passes(theirs, cycle=cycle), passes(ours, cycle=cycle)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert layers(ours) == layers(theirs)


@pytest.mark.parametrize("mode", ["dynamic", "dequant_once"])
def test_online_quantisation_matches_diffsynth(fp_file, mode):
    theirs, ours = both(fp_file, quantize=cfg(mode=mode))
    assert_same(theirs, ours)
    assert ours.quantize_config.method == qb.METHOD
    assert {k: (v.dtype, v.device) for k, v in ours.state_dict().items()} == {
        k: (v.dtype, v.device) for k, v in theirs.state_dict().items()
    }


def test_prequantised_checkpoint_matches_diffsynth(prequantized_file):
    theirs, ours = both(prequantized_file, quantize=cfg(load_prequantized=True))
    assert_same(theirs, ours)
    assert any(isinstance(m, qb.Int8Linear) for m in ours.modules())


def test_prequantised_checkpoint_needs_its_metadata(prequantized_file, tmp_path):
    bare = tmp_path / "bare.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(prequantized_file), str(bare))
    for load in (original("diffsynth.core.loader.model", "load_model"), diffsynth_c.load_model):
        with pytest.raises(ValueError, match="not a checkpoint of"):
            load(Net, str(bare), quantize=cfg(load_prequantized=True))


@pytest.mark.parametrize("mode", ["dynamic", "dequant_once"])
def test_vram_managed_quantised_layers_match_diffsynth(fp_file, fake_memory, mode):
    theirs, ours = both(fp_file, quantize=cfg(mode=mode), module_map=True, vram_config=CPU, vram_limit=None)
    assert_same(theirs, ours, cycle=True)
    if mode == "dynamic":
        assert type(ours.blocks[0]) is L.AutoWrappedQuantizedModule
        assert type(ours.proj_out) is L.AutoWrappedLinear


@pytest.mark.parametrize("vram_config", [DISK_BF16, DISK_F8], ids=["disk_bf16", "disk_fp8"])
@pytest.mark.parametrize("vram_limit", [None, 0])
def test_disk_offload_of_a_prequantised_checkpoint_matches_diffsynth(
    prequantized_file, fake_memory, vram_config, vram_limit
):
    theirs, ours = both(
        prequantized_file,
        quantize=cfg(load_prequantized=True),
        module_map=True,
        vram_config=vram_config,
        vram_limit=vram_limit,
    )
    assert_same(theirs, ours, cycle=True)
    assert ours.blocks[0].module.qweight.is_meta or ours.blocks[0].state == 2


def test_disk_offload_reads_quantised_layers_ahead(prequantized_file):
    model = diffsynth_c.load_model(
        Net, prequantized_file, quantize=cfg(load_prequantized=True), module_map=OUR_MAP, vram_config=DISK_BF16
    )
    passes(model, n=4)
    stats = L.scheduler_of(model).stats
    assert stats["hits"] > 0, stats


def test_disk_offload_of_online_quantisation_is_refused_as_diffsynth_refuses(fp_file):
    for load, module_map in (
        (original("diffsynth.core.loader.model", "load_model"), DS_MAP),
        (diffsynth_c.load_model, OUR_MAP),
    ):
        with pytest.raises(ValueError, match="pre-quantized checkpoints"):
            load(Net, fp_file, quantize=cfg(), module_map=module_map, vram_config=DISK_BF16)


def test_lora_hot_load_on_quantised_layers_matches_diffsynth(fp_file):
    """What BasePipeline.load_lora does with a quantised model: enable_lora_hot_loading wraps it
    (its quantised Linears in AutoWrappedQuantizedModule), then LoRA weights are appended."""
    vram_config = dict(CPU)
    out = []
    for load, enable, module_map in (
        (
            original("diffsynth.core.loader.model", "load_model"),
            DL.enable_vram_management,
            {torch.nn.Linear: DL.AutoWrappedLinear},
        ),
        (diffsynth_c.load_model, L.enable_vram_management, {torch.nn.Linear: L.AutoWrappedLinear}),
    ):
        model = load(Net, fp_file, quantize=cfg())
        model = enable(model, module_map, vram_config=vram_config, quantize=model.quantize_config)
        g = torch.Generator().manual_seed(2)
        n = 0
        for _, m in model.named_modules():
            if isinstance(m, (DL.LoRAHotLoadMixin, L.LoRAHotLoadMixin)):
                m.lora_A_weights.append(torch.randn(4, m.in_features, generator=g).to(BF16))
                m.lora_B_weights.append(torch.randn(m.out_features, 4, generator=g).to(BF16))
                n += 1
        out.append((n, layers(model), passes(model, n=1)[0]))
    assert out[0][0] == out[1][0] == 4
    assert out[0][1] == out[1][1]
    assert torch.equal(out[0][2], out[1][2])


def test_load_model_with_disk_offload_matches_diffsynth(fp_file, fake_memory):
    theirs = original("diffsynth.core.loader.model", "load_model_with_disk_offload")(Net, fp_file, module_map=DS_MAP)
    ours = diffsynth_c.loader.model.load_model_with_disk_offload(Net, fp_file, module_map=OUR_MAP)
    assert_same(theirs, ours, cycle=True)
    assert L.scheduler_of(ours) is not None


def test_diffsynth_quantised_layer_works_patched():
    """The issue's reproduction: DiffSynth's own class, constructed while patched."""
    r = run_python(
        "import torch, diffsynth_c\n"
        "import diffsynth.core.vram.layers as DL\n"
        "theirs = DL.AutoWrappedQuantizedModule\n"
        "diffsynth_c.patch_diffsynth()\n"
        "x = torch.randn(2, 4)\n"
        "for cls in (theirs, DL.AutoWrappedQuantizedModule):\n"
        "    lin = torch.nn.Linear(4, 3)\n"
        "    m = cls(lin, computation_dtype=torch.float32, computation_device='cpu')\n"
        "    assert torch.equal(m(x), lin(x)) and m.state == 0\n"
        "print(DL.AutoWrappedQuantizedModule.__module__)\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "diffsynth_c.vram.layers"


LORA_SCRIPT = r"""
import sys, torch
if PATCH:
    import diffsynth_c
    diffsynth_c.patch_diffsynth()
from diffsynth.core.loader import load_model
from diffsynth.core.quant import QuantizeConfig
from diffsynth.diffusion.base_pipeline import BasePipeline
from tests import quant_cpu_backend as qb
from tests.test_quantize import Net

model = load_model(Net, PATH, quantize=QuantizeConfig(method=qb.METHOD, exclude_modules=["proj_out"]))
pipe = BasePipeline(device="cpu", torch_dtype=torch.bfloat16)
g = torch.Generator().manual_seed(7)
lora = {}
for name, m in model.named_modules():
    if isinstance(m, torch.nn.Linear):
        lora[name + ".lora_A.weight"] = torch.randn(2, m.in_features, generator=g).to(torch.bfloat16)
        lora[name + ".lora_B.weight"] = torch.randn(m.out_features, 2, generator=g).to(torch.bfloat16)
pipe.load_lora(model, state_dict=lora, hotload=True)
x = torch.randn(4, 16, generator=g).to(torch.bfloat16)
with torch.no_grad():
    out = model(x)
kinds = [(n, type(m).__module__.split(".")[0] + "." + type(m).__name__) for n, m in model.named_modules() if n]
torch.save({"out": out, "kinds": kinds}, OUT)
"""


def test_pipeline_lora_hot_load_on_a_quantised_model_patched_as_unpatched(fp_file, tmp_path):
    """BasePipeline.load_lora on a quantised model (check_quant_hot_load wraps it first): patched,
    every layer is ours and the output is DiffSynth's."""
    results = {}
    for patch in (False, True):
        out = str(tmp_path / f"{patch}.pt")
        code = LORA_SCRIPT.replace("PATCH", repr(patch)).replace("PATH", repr(fp_file)).replace("OUT", repr(out))
        r = run_python(code, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        results[patch] = torch.load(out)
    plain, patched = results[False], results[True]
    assert torch.equal(plain["out"], patched["out"])
    assert [n for n, _ in plain["kinds"]] == [n for n, _ in patched["kinds"]]
    assert dict(plain["kinds"])["blocks.0"] == "diffsynth.AutoWrappedQuantizedModule"
    assert dict(patched["kinds"])["blocks.0"] == "diffsynth_c.AutoWrappedQuantizedModule"
    assert dict(patched["kinds"])["proj_out"] == "diffsynth_c.AutoWrappedLinear"


def test_resident_quantised_layer_copied_through_the_scheduler_as_diffsynth_copies_it(fp_file):
    """A layer stored on a device other than the computation's (here torch.device('cpu') against
    'cpu', unequal as DiffSynth compares them): its plain tensors are fetched, and the copy computes
    what DiffSynth's deep copy computes; the layer itself is untouched."""
    c = cfg()
    devices = {
        "offload_device": torch.device("cpu"),
        "onload_device": torch.device("cpu"),
        "preparing_device": torch.device("cpu"),
    }
    outs = []
    for load, cls in (
        (original("diffsynth.core.loader.model", "load_model"), DL.AutoWrappedQuantizedModule),
        (diffsynth_c.load_model, L.AutoWrappedQuantizedModule),
    ):
        model = load(Net, fp_file, quantize=c)
        layer = cls(
            model.blocks[0], computation_dtype=BF16, computation_device="cpu", name="blocks.0", quantize=c, **devices
        )
        if cls is L.AutoWrappedQuantizedModule:
            L.attach_scheduler(layer)
        x = torch.randn(3, 32, generator=torch.Generator().manual_seed(8)).to(BF16)
        with torch.no_grad():
            outs.append([layer(x), layer(x)])
        assert layer.module.qweight.device == torch.device("cpu")
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert L.scheduler_of(layer).stats["misses"] + L.scheduler_of(layer).stats["hits"] == 2


def mixed(**kw):
    from diffsynth.core.quant import MixedQuantizeConfig

    return MixedQuantizeConfig(
        configs=[
            QuantizeConfig(method=qb.METHOD, target_modules=["blocks.0", "blocks.1"]),
            QuantizeConfig(method=qb.METHOD, target_modules=["proj_in"]),
        ],
        **kw,
    )


def test_mixed_quantisation_matches_diffsynth(fp_file, fake_memory):
    theirs, ours = both(fp_file, quantize=mixed())
    assert_same(theirs, ours)
    theirs, ours = both(fp_file, quantize=mixed(), module_map=True, vram_config=CPU, vram_limit=None)
    assert_same(theirs, ours, cycle=True)
    assert type(ours.proj_in) is L.AutoWrappedQuantizedModule


def test_mixed_prequantised_disk_offload_matches_diffsynth(fp_file, fake_memory, tmp_path):
    model = Net()
    model.load_state_dict(safetensors.torch.load_file(fp_file))
    m = mixed()
    m.quantize_model(model)
    tensors, metadata = m.flatten_state_dict(model.state_dict())
    path = str(tmp_path / "mixed.safetensors")
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    theirs, ours = both(
        path, quantize=mixed(load_prequantized=True), module_map=True, vram_config=DISK_BF16, vram_limit=0
    )
    assert_same(theirs, ours, cycle=True)
