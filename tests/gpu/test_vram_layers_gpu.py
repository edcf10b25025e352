"""The VRAM-managed layers computing on the GPU: offloaded (CPU bf16, CPU fp8, disk) against the same
model resident on the GPU, bit for bit with our norm kernels off, close with them on; the prefetch
path (pinned slabs, copy stream, events) used from the second pass on. Needs only torch (the GPU
machines have no DiffSynth); the CPU suite compares the same layers with DiffSynth's."""

from __future__ import annotations

import copy

import pytest
import torch

from diffsynth_c.vram import layers as L
from diffsynth_c.vram.disk_map import DiskMap

from .conftest import write_safetensors

BF16, F8 = torch.bfloat16, torch.float8_e4m3fn


class Block(torch.nn.Module):
    def __init__(self, dim=256):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(3 * dim, dim, bias=False)
        self.rms = torch.nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x):
        return x + self.rms(self.out(torch.nn.functional.gelu(self.qkv(self.norm(x)))))


class Stack(torch.nn.Module):
    def __init__(self, n=4, dim=256):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(dim) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


MODULE_MAP = {
    torch.nn.Linear: L.AutoWrappedLinear,
    torch.nn.LayerNorm: L.AutoWrappedModule,
    torch.nn.RMSNorm: L.AutoWrappedModule,
}


def config(stored, preparing=None):
    dtype, device = stored
    p_dtype, p_device = preparing or stored
    return {
        "offload_dtype": dtype,
        "offload_device": device,
        "onload_dtype": dtype,
        "onload_device": device,
        "preparing_dtype": p_dtype,
        "preparing_device": p_device,
        "computation_dtype": BF16,
        "computation_device": "cuda",
    }


@pytest.fixture
def base():
    torch.manual_seed(0)
    return Stack().to(BF16)


def resident(model, through=None):
    """The model on the GPU in bf16, its weights rounded through `through` first (fp8 storage)."""
    m = copy.deepcopy(model)
    if through is not None:
        for p in m.parameters():
            p.data = p.data.to(through).to(BF16)
    return m.cuda()


def managed(model, vram_config, disk_map=None):
    m = L.enable_vram_management(copy.deepcopy(model), MODULE_MAP, vram_config, vram_limit=0, disk_map=disk_map)
    for layer in m.modules():
        if hasattr(layer, "onload") and layer is not m:
            layer.onload()
    return m


@pytest.fixture(params=["cpu_bf16", "cpu_fp8", "disk"])
def mode(request, base, tmp_path):
    if request.param == "cpu_bf16":
        return managed(base, config((BF16, "cpu"))), resident(base)
    if request.param == "cpu_fp8":
        return managed(base, config((F8, "cpu"))), resident(base, through=F8)
    path = write_safetensors(tmp_path / "stack.safetensors", {k: v.contiguous() for k, v in base.state_dict().items()})
    skeleton = copy.deepcopy(base).to("meta")
    return managed(skeleton, config(("disk", "disk"), (BF16, "cuda")), DiskMap(path, "cuda")), resident(base)


@pytest.mark.parametrize("norm_kernels", ["0", "1"])
def test_offloaded_equals_resident(mode, monkeypatch, norm_kernels):
    monkeypatch.setenv("DIFFSYNTH_C_NORM_KERNELS", norm_kernels)
    ours, ref = mode
    x = torch.randn(2, 64, 256, device="cuda").to(BF16)
    with torch.no_grad():
        want = ref(x)
        for _ in range(3):
            got = ours(x)
            if norm_kernels == "0":
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, atol=2e-2, rtol=1.6e-2)
    stats = L.scheduler_of(ours).stats
    assert stats["hits"] > 0 and stats["relearned"] == 0


def test_offloaded_weights_live_in_one_pinned_slab_per_layer(base):
    ours = managed(base, config((F8, "cpu")))
    x = torch.randn(1, 8, 256, device="cuda").to(BF16)
    with torch.no_grad():
        ours(x)
    q = ours.blocks[0].qkv
    assert q.weight.dtype == F8 and q.weight.device.type == "cpu" and q.weight.is_pinned()
    slab = q.weight._diffsynth_c_slab
    assert q.bias._diffsynth_c_slab is slab


def test_a_rewritten_weight_is_never_used_stale(base):
    ours = managed(base, config((BF16, "cpu")))
    ref = resident(base)
    x = torch.randn(1, 16, 256, device="cuda").to(BF16)
    with torch.no_grad():
        ours(x)
        ours(x)  # the first layers of the next pass are in flight now
        first = L.scheduler_of(ours).order[0]
        new = {k: v * 2 for k, v in first.state_dict().items()}
        first.load_state_dict(new)
        name = next(n for n, m in ours.named_modules() if m is first)
        dict(ref.named_modules())[name].load_state_dict({k: v.cuda() for k, v in new.items()})
        torch.cuda.synchronize()
        assert torch.equal(ours(x), ref(x))
