"""device_map / max_memory: the planner against hand-checked placements (fake GPU capacities), and
CPU + disk placements that compute exactly what the plain load computes."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import diffsynth_c
from diffsynth_c.loader import device_map as placement

MB = 10**6


class Net(torch.nn.Module):
    """A stem, eight 2 MB blocks (Linear 1000x1000 in bf16), a head, a root buffer."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Linear(10, 1000, bias=False)  # 20 KB
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(1000, 1000, bias=False) for _ in range(8))
        self.head = torch.nn.Linear(1000, 4, bias=False)  # 8 KB
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(x) * self.scale


def _units():
    with diffsynth_c.skip_model_initialization():
        return placement.placement_units(Net(), torch.bfloat16)


def test_units_are_the_blocks_in_order():
    units = _units()
    assert [n for n, _ in units] == ["scale", "stem"] + [f"blocks.{i}" for i in range(8)] + ["head"]
    assert dict(units)["blocks.3"] == 2 * MB and dict(units)["stem"] == 20000 and dict(units)["scale"] == 8


def test_auto_fills_the_fastest_device_first():
    plan = placement.plan_device_map(_units(), "auto", placement.default_budgets({0: "5MB", 1: "5MB", "cpu": "10MB"}))
    assert plan == {
        "scale": 0,
        "stem": 0,
        "blocks.0": 0,
        "blocks.1": 0,
        "blocks.2": 1,
        "blocks.3": 1,
        "blocks.4": "cpu",
        "blocks.5": "cpu",
        "blocks.6": "cpu",
        "blocks.7": "cpu",
        "head": "cpu",
    }


def test_balanced_spreads_over_the_gpus():
    plan = placement.plan_device_map(
        _units(), "balanced", placement.default_budgets({0: "40MB", 1: "40MB", "cpu": "1MB"})
    )
    on = {d: [n for n, p in plan.items() if p == d] for d in (0, 1)}
    # 16.03 MB in all: each GPU's share is capped at half of it plus the largest block (10.01 MB);
    # a fifth block would bring GPU 0 to 10.02 MB
    assert on[0] == ["scale", "stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert on[1] == ["blocks.4", "blocks.5", "blocks.6", "blocks.7", "head"]


def test_disk_takes_what_the_cpu_cannot_when_allowed():
    plan = placement.plan_device_map(_units(), "auto", placement.default_budgets({"cpu": "5MB", "disk": None}))
    assert [plan[f"blocks.{i}"] for i in range(8)] == ["cpu", "cpu"] + ["disk"] * 6
    with pytest.raises(
        ValueError,
        match=r"'blocks.2' needs 0.00 GiB and no device has room for it \(cpu: 0.00 GiB left\); "
        r"raise max_memory or allow 'disk'",
    ):
        placement.plan_device_map(_units(), "auto", placement.default_budgets({"cpu": "5MB"}))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="device_map: unknown strategy 'fast'"):
        placement.plan_device_map(_units(), "fast", {"cpu": 1 << 30})
    with pytest.raises(ValueError, match=r"cannot parse the size '16 gigs'"):
        placement.parse_max_memory({0: "16 gigs"})
    with pytest.raises(ValueError, match=r"max_memory: unknown device 'tpu'"):
        placement.parse_max_memory({"tpu": "1GB"})
    assert placement.parse_max_memory({"cuda:1": "1GB", "disk": None}) == {1: 10**9, "disk": float("inf")}


@pytest.fixture
def net_file(tmp_path):
    torch.manual_seed(0)
    net = Net().to(torch.bfloat16)
    path = tmp_path / "net.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


def _same_outputs(a, b):
    x = torch.randn(3, 10).to(torch.bfloat16)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_cpu_and_disk_placement_computes_what_the_plain_load_computes(net_file):
    plain = diffsynth_c.load_model(Net, net_file)
    placed = diffsynth_c.load_model(Net, net_file, device_map="auto", max_memory={"cpu": "5MB", "disk": None})
    assert placed.hf_device_map["blocks.1"] == "cpu" and placed.hf_device_map["blocks.7"] == "disk"
    assert placed.blocks[7].weight.is_meta and not placed.blocks[1].weight.is_meta
    for _ in range(2):  # the disk blocks are read before their forward and dropped after it
        assert _same_outputs(plain, placed)
        assert placed.blocks[7].weight.is_meta


def test_whole_model_placements_record_the_device(net_file):
    placed = diffsynth_c.load_model(Net, net_file, device_map="cpu")
    assert placed.hf_device_map == {"": torch.device("cpu")}
    assert _same_outputs(diffsynth_c.load_model(Net, net_file), placed)
    with pytest.raises(
        ValueError, match=r"device_map='cpu': the model needs 0.01 GiB, max_memory\['cpu'\] is 0.00 GiB"
    ):
        diffsynth_c.load_model(Net, net_file, device_map="cpu", max_memory={"cpu": "1MB"})
    with pytest.raises(ValueError, match="device_map: unknown value 'gpu'"):
        diffsynth_c.load_model(Net, net_file, device_map="gpu")


def test_a_dict_device_map_places_as_given(net_file):
    dm = {"": "cpu", "blocks.6": "disk", "blocks.7": "disk"}
    placed = diffsynth_c.load_model(Net, net_file, device_map=dm)
    assert placed.hf_device_map == dm and placed.blocks[6].weight.is_meta
    assert _same_outputs(diffsynth_c.load_model(Net, net_file), placed)
    with pytest.raises(ValueError, match="device_map: no entry places 'stem.weight'"):
        diffsynth_c.load_model(Net, net_file, device_map={"blocks": "cpu", "head": "cpu", "scale": "cpu"})


def test_a_file_that_does_not_match_the_model_names_the_keys(tmp_path, net_file):
    path = tmp_path / "short.safetensors"
    sd = safetensors.torch.load_file(net_file)
    del sd["head.weight"]
    safetensors.torch.save_file(sd, str(path))
    with pytest.raises(RuntimeError, match=r"short.safetensors: .* missing key\(s\) \['head.weight'\]"):
        diffsynth_c.load_model(Net, str(path), device_map="auto", max_memory={"cpu": "1GB"})
