"""Folders written by diffusers' own ``save_pretrained``, and ours read back by its ``from_pretrained``.

diffusers is the writer of the layouts that ``loader/folder.py`` resolves, so it is the oracle here:
the files, names and index json it writes load bit for bit, and what ``save_state_dict`` writes is
what diffusers writes and loads with diffusers.
"""

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
from diffsynth_c.loader.folder import resolve

from .conftest import same_tensor

diffusers = pytest.importorskip("diffusers")
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config


class TinyDiT(ModelMixin, ConfigMixin):
    """A diffusers model small enough to shard at 20 KB: six blocks and a norm kept in float32."""

    _keep_in_fp32_modules: ClassVar[list[str]] = ["norm"]

    @register_to_config
    def __init__(self, dim: int = 64, num_blocks: int = 6):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(num_blocks))
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def tiny_model(dtype=torch.float32) -> TinyDiT:
    torch.manual_seed(0)
    model = TinyDiT()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.1, 0.1)
    return model.to(dtype) if dtype != torch.float32 else model


def assert_same_dict(got, want):
    assert set(got) == set(want)
    for k in want:
        assert same_tensor(got[k], want[k]), k


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_folders_written_by_diffusers_load_bit_for_bit(tmp_path, safe):
    model = tiny_model(torch.bfloat16)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB", safe_serialization=safe)
    model.save_pretrained(tmp_path / "single", safe_serialization=safe)
    want = model.state_dict()
    for name in ("sharded", "single"):
        folder = str(tmp_path / name)
        shards = resolve(folder)
        assert (len(shards) > 1) == (name == "sharded")
        ours = diffsynth_c.load_state_dict(folder)
        assert_same_dict(ours, want)
        assert list(ours) == list(ds_load_state_dict(shards if len(shards) > 1 else shards[0]))
        assert diffsynth_c.hash_model_file(folder) == ds_hash_model_file(shards if len(shards) > 1 else shards[0])
    # a model folder with the weights in a subfolder, as pipelines lay them out
    model.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="20KB", safe_serialization=safe)
    sub = [os.path.basename(p) for p in resolve(tmp_path / "pipe", "transformer")]
    assert sub == [os.path.basename(p) for p in resolve(tmp_path / "sharded")]
    assert_same_dict(diffsynth_c.load_state_dict(str(tmp_path / "pipe" / "transformer")), want)


def test_our_shards_are_named_and_indexed_as_diffusers_writes_them(tmp_path):
    model = tiny_model(torch.bfloat16)
    model.save_pretrained(tmp_path / "theirs", max_shard_size="20KB")
    save_state_dict(model.state_dict(), tmp_path / "ours", max_shard_size="20KB")
    theirs = sorted(f for f in os.listdir(tmp_path / "theirs") if f != "config.json")
    assert sorted(os.listdir(tmp_path / "ours")) == theirs
    index = "diffusion_pytorch_model.safetensors.index.json"
    ours_index = json.loads((tmp_path / "ours" / index).read_text())
    theirs_index = json.loads((tmp_path / "theirs" / index).read_text())
    assert ours_index["weight_map"] == theirs_index["weight_map"]
    assert ours_index["metadata"]["total_size"] == theirs_index["metadata"]["total_size"]


def test_diffusers_loads_what_we_save(tmp_path):
    model = tiny_model()
    model.save_config(tmp_path / "ours")
    save_state_dict(model.state_dict(), tmp_path / "ours", max_shard_size="20KB")
    loaded = TinyDiT.from_pretrained(tmp_path / "ours")
    assert_same_dict(loaded.state_dict(), model.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), model(x))


def test_keep_in_fp32_modules_as_diffusers_keeps_them(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    theirs = TinyDiT.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16)
    ours = diffsynth_c.load_model(TinyDiT, str(tmp_path / "m"), torch_dtype=torch.bfloat16)
    assert {k: v.dtype for k, v in ours.state_dict().items()} == {k: v.dtype for k, v in theirs.state_dict().items()}
    assert ours.norm.weight.dtype == torch.float32 and ours.blocks[0].weight.dtype == torch.bfloat16
    assert_same_dict(ours.state_dict(), theirs.state_dict())
