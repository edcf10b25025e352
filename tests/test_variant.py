"""variant= as diffusers takes it: folders written by diffusers' own save_pretrained(variant=...)
load with the same tensors as diffusers' from_pretrained(variant=...) gives."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

import diffsynth_c
from diffsynth_c.loader.folder import resolve, with_variant


class Tiny(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, n: int = 48):
        super().__init__()
        self.a = torch.nn.Linear(n, n)
        self.b = torch.nn.Linear(n, n)
        self.c = torch.nn.Linear(n, 8)


def model(seed: int, dtype=torch.float32) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().to(dtype)


def diffusers_state(folder, variant, **kw) -> dict:
    return Tiny.from_pretrained(folder, variant=variant, **kw).state_dict()


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("shard", [None, "8KB"], ids=["single", "sharded"])
def test_a_variant_loads_as_diffusers_loads_it(tmp_path, safe, shard):
    folder = tmp_path / "transformer"
    kw = {"max_shard_size": shard} if shard else {}
    # the folder holds the default weights and a half-precision variant, as hub repositories do
    model(0).save_pretrained(folder, safe_serialization=safe, **kw)
    model(1, torch.float16).save_pretrained(folder, variant="fp16", safe_serialization=safe, **kw)
    if shard:
        assert any("-00002-of-" in f and ".fp16" in f for f in os.listdir(folder))
    for variant in ("fp16", None):
        theirs = diffusers_state(folder, variant, torch_dtype=torch.float16 if variant else None, use_safetensors=safe)
        ours = diffsynth_c.load_state_dict(str(folder), variant=variant)
        assert sorted(ours) == sorted(theirs)
        for k in theirs:
            assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), (variant, k)
    files = resolve(folder, variant="fp16")
    assert all(".fp16" in os.path.basename(f) for f in files)
    assert not any(".fp16" in os.path.basename(f) for f in resolve(folder))


def test_variant_names_follow_diffusers():
    from diffusers.utils import _add_variant

    for name in (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
        "model.bin",
        "pytorch_model.bin.index.json",
    ):
        assert with_variant(name, "fp16") == _add_variant(name, "fp16")
        assert with_variant(name, None) == _add_variant(name, None)


def test_a_missing_variant_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "m"
    model(0).save_pretrained(folder)
    with pytest.raises(OSError):
        Tiny.from_pretrained(folder, variant="bf16")
    with pytest.raises(FileNotFoundError, match="bf16"):
        diffsynth_c.load_state_dict(str(folder), variant="bf16")
    with pytest.raises(ValueError, match="variant"):
        diffsynth_c.load_state_dict(str(folder), variant="../x")


def test_a_variant_through_a_subfolder_and_a_file_path(tmp_path):
    model(2, torch.float16).save_pretrained(tmp_path / "unet", variant="fp16")
    theirs = diffusers_state(tmp_path / "unet", "fp16", torch_dtype=torch.float16)
    files = resolve(tmp_path, subfolder="unet", variant="fp16")
    assert [os.path.basename(f) for f in files] == ["diffusion_pytorch_model.fp16.safetensors"]
    ours = diffsynth_c.load_state_dict(files[0], variant="fp16")  # a file path is taken as it is
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("shard", [None, "8KB"], ids=["single", "sharded"])
def test_load_model_takes_a_variant_as_diffusers_does(tmp_path, shard):
    root = tmp_path / "repo"
    kw = {"max_shard_size": shard} if shard else {}
    model(0).save_pretrained(root / "transformer", **kw)
    model(1, torch.float16).save_pretrained(root / "transformer", variant="fp16", **kw)
    for variant, dtype in (("fp16", torch.float16), (None, torch.float32)):
        theirs = Tiny.from_pretrained(root, subfolder="transformer", variant=variant, torch_dtype=dtype).state_dict()
        ours = diffsynth_c.load_model(Tiny, str(root), torch_dtype=dtype, subfolder="transformer", variant=variant)
        got = ours.state_dict()
        assert sorted(got) == sorted(theirs)
        for k in theirs:
            assert got[k].dtype == theirs[k].dtype and torch.equal(got[k], theirs[k]), (variant, k)
        # a folder given directly, without subfolder, takes the variant too
        direct = diffsynth_c.load_model(
            Tiny, str(root / "transformer"), torch_dtype=dtype, variant=variant
        ).state_dict()
        assert all(torch.equal(direct[k], theirs[k]) for k in theirs)
