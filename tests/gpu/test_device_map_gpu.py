"""device_map on a real GPU: blocks on cuda:0, the CPU and the disk compute what the model computes
on the GPU alone (within bf16 matmul differences between the devices)."""

from __future__ import annotations

import torch

import diffsynth_c

from .conftest import write_safetensors


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(1000, 1000, bias=False) for _ in range(8))

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


def test_gpu_cpu_disk_placement(tmp_path):
    torch.manual_seed(0)
    net = Net().to(torch.bfloat16)
    path = write_safetensors(tmp_path / "net.safetensors", {k: v.contiguous() for k, v in net.state_dict().items()})
    placed = diffsynth_c.load_model(Net, path, device_map="auto", max_memory={0: "5MB", "cpu": "5MB", "disk": None})
    assert placed.hf_device_map["blocks.0"] == 0 and placed.hf_device_map["blocks.3"] == "cpu"
    assert placed.hf_device_map["blocks.7"] == "disk" and placed.blocks[0].weight.is_cuda
    whole = diffsynth_c.load_model(Net, path, device_map="cuda")
    assert whole.hf_device_map == {"": torch.device("cuda")}
    x = torch.randn(4, 1000, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(placed(x).cuda(), whole(x), atol=2e-2, rtol=2e-2)
