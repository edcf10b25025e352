"""Model hashes equal DiffSynth's, and safetensors hashes are computed from the headers alone."""

from __future__ import annotations

import os

import pytest
import torch
from diffsynth.core import hash_model_file as ds_hash_model_file
from diffsynth.core import hash_state_dict_keys as ds_hash_state_dict_keys
from diffsynth.core.loader.file import load_keys_dict as ds_load_keys_dict
from safetensors.torch import save_file

import diffsynth_c
from diffsynth_c import _core

from .conftest import random_tensor, sparse_safetensors


@pytest.mark.parametrize("with_shape", [True, False])
def test_hash_model_file_matches_diffsynth(model_files, with_shape):
    for path in [model_files[0], model_files[1], model_files, list(reversed(model_files))]:
        assert diffsynth_c.hash_model_file(path, with_shape=with_shape) == ds_hash_model_file(
            path, with_shape=with_shape
        )


def test_hash_of_real_model_layouts(tmp_path):
    """Names and shapes of a real DiffSynth model (built on the meta device), written as a file whose
    data section is a hole: FluxDiT's 11 GiB of bf16 would otherwise land on disk for a header read."""
    from diffsynth.core import skip_model_initialization
    from diffsynth.models.flux_dit import FluxDiT

    with skip_model_initialization():
        model = FluxDiT(num_blocks=2)
    meta = model.state_dict()
    path = sparse_safetensors(tmp_path / "flux.safetensors", {k: tuple(v.shape) for k, v in meta.items()})
    assert diffsynth_c.hash_model_file(path) == ds_hash_model_file(path)
    # the state-dict hash takes tensors; meta tensors carry the same names and shapes without memory
    sd = {k: v.to(torch.bfloat16) for k, v in meta.items()}
    assert diffsynth_c.hash_state_dict_keys(sd) == ds_hash_state_dict_keys(sd)


def test_hash_state_dict_keys_matches_diffsynth(model_files):
    sd = diffsynth_c.load_state_dict(model_files)
    for with_shape in (True, False):
        assert diffsynth_c.hash_state_dict_keys(sd, with_shape) == ds_hash_state_dict_keys(sd, with_shape)


def test_hash_state_dict_keys_nested_and_odd_values():
    sd = {
        "a": torch.zeros(2, 3),
        "scalar": torch.tensor(1.0),
        "nested": {"x": torch.zeros(4), "deeper": {"y": torch.zeros(1, 1)}, 5: torch.zeros(1)},
        7: torch.zeros(3),  # non-str keys are skipped
        "meta": "a string value",  # neither tensor nor dict: skipped
        "é键": torch.zeros(0),
        "a:b": torch.zeros(1),  # sorts between "a" and "a:2_3"
    }
    for with_shape in (True, False):
        assert diffsynth_c.hash_state_dict_keys(sd, with_shape) == ds_hash_state_dict_keys(sd, with_shape)
    assert diffsynth_c.loader.file.convert_state_dict_keys_to_single_str(sd) == (
        __import__("diffsynth.core.loader.file", fromlist=["x"]).convert_state_dict_keys_to_single_str(sd)
    )


def test_bin_and_mixed_lists(tmp_path, model_files):
    p = str(tmp_path / "lora.bin")
    torch.save({"module": {"w": torch.zeros(3, 2), "inner": {"b": torch.zeros(2)}}}, p)
    for path in [p, [model_files[0], p], [p, *model_files]]:
        assert diffsynth_c.hash_model_file(path) == ds_hash_model_file(path)
        assert diffsynth_c.load_keys_dict(path) == ds_load_keys_dict(path)


def test_load_keys_dict_matches_diffsynth(model_files):
    assert diffsynth_c.load_keys_dict(model_files) == ds_load_keys_dict(model_files)
    assert list(diffsynth_c.load_keys_dict(model_files)) == list(ds_load_keys_dict(model_files))


def test_md5_and_keys_string_primitives():
    import hashlib

    for data in [b"", b"a", b"x" * 55, b"x" * 56, b"x" * 63, b"x" * 64, b"x" * 65, bytes(range(256)) * 40]:
        assert _core.md5_hex(data) == hashlib.md5(data).hexdigest()
    assert _core.keys_string([("b", (2, 3)), ("a", ()), ("n", b"x,y")]) == b"a,a:,b,b:2_3,n|x,y"
    assert _core.keys_string([("b", (2, 3))], with_shape=False) == b"b"


def _read_bytes_of_this_process() -> int:
    with open(f"/proc/{os.getpid()}/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


def test_hash_reads_only_headers(tmp_path):
    big = {f"w{i}": random_tensor((1024, 1024), torch.float32, i) for i in range(8)}  # 32 MiB of data
    paths = []
    for i in range(3):
        p = str(tmp_path / f"shard{i}.safetensors")
        save_file({f"{k}.{i}": v for k, v in big.items()}, p)
        paths.append(p)
    header_bytes = sum(_core.read_header(p)[1] for p in paths)
    before = _read_bytes_of_this_process()
    diffsynth_c.hash_model_file(paths)
    read = _read_bytes_of_this_process() - before
    assert read <= header_bytes + 4096, f"hashing read {read} bytes; the headers hold {header_bytes}"


def test_empty_list_hashes_as_diffsynth_does():
    from diffsynth_c.patch import original

    assert diffsynth_c.hash_model_file([]) == original("diffsynth.core.loader.file", "hash_model_file")([])
    assert diffsynth_c.hash_model_file([], with_shape=False) == original(
        "diffsynth.core.loader.file", "hash_model_file"
    )([], with_shape=False)
