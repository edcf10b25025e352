"""load_state_dict against the oracles: DiffSynth's load_state_dict and safetensors' load_file give
the same keys, in the same order, with bit-identical tensors of the same dtypes and shapes."""

from __future__ import annotations

import pytest
import torch
from diffsynth.core import load_state_dict as ds_load_state_dict
from safetensors.torch import load_file, save_file

import diffsynth_c
from diffsynth_c import FormatError

from .conftest import ALL_TORCH_DTYPES, assert_same_state_dict, random_tensor, same_tensor

CONVERTIBLE = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.fixture(params=["mmap", "read"])
def load_mode(request, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_C_LOAD_MODE", request.param)
    return request.param


def test_multi_shard_matches_diffsynth(model_files, load_mode):
    ours = diffsynth_c.load_state_dict(model_files)
    ref = ds_load_state_dict(model_files)
    assert_same_state_dict(ours, ref)
    # the key present in both shards takes the second shard's tensor, in the first one's position
    assert list(ours).index("shared.weight") == list(ref).index("shared.weight")


def test_single_file_matches_safetensors_load_file(model_files, load_mode):
    ours = diffsynth_c.load_state_dict(model_files[0])
    ref = load_file(model_files[0])
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert same_tensor(ours[k], ref[k])


@pytest.mark.parametrize("dtype", ALL_TORCH_DTYPES, ids=str)
def test_every_dtype(tmp_path, dtype, load_mode):
    sd = {
        "m": random_tensor((3, 5), dtype, 1),
        "scalar": random_tensor((), dtype, 2),
        "empty": random_tensor((0,), dtype, 3),
        "wide": random_tensor((1, 2, 3, 4), dtype, 4),
    }
    path = str(tmp_path / "all.safetensors")
    save_file(sd, path)
    assert_same_state_dict(diffsynth_c.load_state_dict(path), ds_load_state_dict(path))


def test_float4_packed_pairs(tmp_path):
    x = random_tensor((4, 3), torch.uint8, 9).view(torch.float4_e2m1fn_x2)
    path = str(tmp_path / "f4.safetensors")
    save_file({"q": x}, path)
    assert_same_state_dict(diffsynth_c.load_state_dict(path), ds_load_state_dict(path))


def test_many_small_and_non_ascii_keys(tmp_path, load_mode):
    sd = {f"层.{i}.权重 é": random_tensor((i % 7, 3), torch.bfloat16, i) for i in range(500)}
    sd["z_last"] = random_tensor((1024, 1024), torch.float32, 1)
    path = str(tmp_path / "many.safetensors")
    save_file(sd, path)
    assert_same_state_dict(diffsynth_c.load_state_dict(path), ds_load_state_dict(path))


def test_path_objects_and_tuples(model_files):
    import pathlib

    ref = ds_load_state_dict(model_files)
    assert_same_state_dict(diffsynth_c.load_state_dict([pathlib.Path(p) for p in model_files]), ref)
    assert_same_state_dict(diffsynth_c.load_state_dict(tuple(model_files)), ref)


@pytest.mark.parametrize("target", CONVERTIBLE + [torch.float64, torch.int32], ids=str)
def test_torch_dtype_conversion_matches_diffsynth(tmp_path, target, load_mode):
    sd = {f"{dt}".replace("torch.", ""): random_tensor((257, 33), dt, i) for i, dt in enumerate(CONVERTIBLE)}
    sd["ids"] = torch.arange(10, dtype=torch.int64)
    sd["flag"] = torch.tensor([True, False])
    sd["empty"] = torch.empty((0, 3), dtype=torch.bfloat16)
    sd["scalar"] = torch.tensor(3.5, dtype=torch.float16)
    path = str(tmp_path / "conv.safetensors")
    save_file(sd, path)
    ours = diffsynth_c.load_state_dict(path, torch_dtype=target)
    ref = ds_load_state_dict(path, torch_dtype=target)
    assert_same_state_dict(ours, ref)
    assert all(v.dtype == target for v in ours.values())


def test_conversion_of_large_tensor_spans_many_tasks(tmp_path):
    x = random_tensor((3, 1 << 20), torch.bfloat16, 5)
    path = str(tmp_path / "big.safetensors")
    save_file({"x": x, "y": x[:1].clone()}, path)
    assert_same_state_dict(
        diffsynth_c.load_state_dict(path, torch_dtype=torch.float32),
        ds_load_state_dict(path, torch_dtype=torch.float32),
    )


def test_bin_files_load_like_diffsynth(tmp_path, model_files):
    sd = {"a": random_tensor((4, 4), torch.bfloat16, 1), "b": torch.arange(3)}
    p = str(tmp_path / "model.bin")
    torch.save({"state_dict": sd}, p)  # a single wrapper key is unwrapped
    assert_same_state_dict(diffsynth_c.load_state_dict(p), ds_load_state_dict(p))
    # a mixed list keeps DiffSynth's merge order
    mixed = [model_files[0], p, model_files[1]]
    assert_same_state_dict(diffsynth_c.load_state_dict(mixed), ds_load_state_dict(mixed))
    assert_same_state_dict(
        diffsynth_c.load_state_dict(p, torch_dtype=torch.float32), ds_load_state_dict(p, torch_dtype=torch.float32)
    )


def test_device_cpu_forms(model_files):
    ref = ds_load_state_dict(model_files)
    assert_same_state_dict(diffsynth_c.load_state_dict(model_files, device=torch.device("cpu")), ref)
    assert_same_state_dict(diffsynth_c.load_state_dict(model_files, device="cpu"), ref)


def test_pin_memory_behaves_like_diffsynth(model_files):
    def outcome(fn):
        try:
            sd = fn(model_files, pin_memory=True)
            return ("ok", all(v.is_pinned() for v in sd.values()))
        except Exception as e:  # noqa: BLE001 - without a GPU torch refuses to pin
            return ("error", type(e))

    assert outcome(diffsynth_c.load_state_dict) == outcome(ds_load_state_dict)


def test_verbose_prints_like_diffsynth(model_files, capsys):
    diffsynth_c.load_state_dict(model_files, verbose=1)
    ours = capsys.readouterr().out
    ds_load_state_dict(model_files, verbose=1)
    ref = capsys.readouterr().out
    assert ours == ref  # the same lines in the same order: started, done, then the next file


def test_tensors_are_writable_and_private(model_files):
    """Writing to a loaded tensor changes neither the file nor a second load."""
    sd = diffsynth_c.load_state_dict(model_files)
    before = sd["pos_ids"].clone()
    sd["pos_ids"].add_(1)
    assert torch.equal(diffsynth_c.load_state_dict(model_files)["pos_ids"], before)
    assert torch.equal(load_file(model_files[0])["pos_ids"], before)


def test_misaligned_data_section(tmp_path):
    """A hand-written header whose length is not a multiple of 8: values still right."""
    from .conftest import raw_safetensors

    x = torch.arange(6, dtype=torch.float32)
    header = '{"x":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}}'
    assert (len(header) + 8) % 4 != 0
    p = raw_safetensors(tmp_path / "odd.safetensors", header, x.numpy().tobytes())
    got = diffsynth_c.load_state_dict(p)["x"]
    assert torch.equal(got, x) and torch.equal(got * 2, x * 2)


def test_f6_has_no_torch_dtype(tmp_path):
    from .conftest import raw_safetensors

    p = raw_safetensors(
        tmp_path / "f6.safetensors", '{"w":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}}', b"abc"
    )
    with pytest.raises(FormatError, match=r"f6\.safetensors: tensor 'w': safetensors dtype F6_E2M3 has no torch dtype"):
        diffsynth_c.load_state_dict(p)
    # the header is valid: DiffSynth hashes it, and so do we
    from diffsynth.core import hash_model_file

    assert diffsynth_c.hash_model_file(p) == hash_model_file(p)
