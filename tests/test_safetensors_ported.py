"""Cases of safetensors' own Python tests and attack scripts, ported to our API: each writes the file
the upstream case writes (with safetensors or by hand) and compares our answer (load, keys, hash,
metadata, save) with safetensors' on the same file or tensors. Our own code; upstream names are
given so a reader can find the case.

Ported, per upstream file:
- bindings/python/tests/test_pt_comparison.py (13): test_serialization, test_odd_dtype,
  test_odd_dtype_fp8, test_zero_sized, test_multiple_zero_sized, test_disjoint_tensors_shared_storage,
  test_meta_tensor, test_in_memory, test_sparse, LoadTestCase.test_deserialization_safe,
  test_cannot_serialize_a_non_contiguous_tensor and test_cannot_serialize_shared (where we differ on
  purpose: docs/migrating.md), test_deserialization_metadata.
- bindings/python/tests/test_simple.py (9): test_deserialization, test_deserialization_metadata,
  test_serialization_order_invariant, test_serialization_forces_alignment, test_serialization_metadata,
  test_accept_path, test_file_not_found, test_torch_example, test_numpy_bool (as a 0-d torch bool).
- attacks/ (5): safetensors_abuse_attempt_1 (header length past the file), _2 and _3 (every tensor at
  the same offsets, scaled down), torch_dos_create (a deflated data/0, scaled down), torch_ace_create
  (a dict subclass whose reduce calls eval).
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
import zipfile

import pytest
import safetensors.torch
import torch
from diffsynth.core import hash_model_file as ds_hash_model_file
from safetensors import safe_open

import diffsynth_c
from diffsynth_c.loader import file as ours_file

from .torch_oracle import same


def _theirs(path):
    """safetensors' answer: the tensors (as safe_open iterates them) or the exception type."""
    try:
        return safetensors.torch.load_file(path)
    except Exception as e:  # noqa: BLE001
        return e


def _ours(path):
    try:
        return diffsynth_c.load_state_dict(path)
    except Exception as e:  # noqa: BLE001
        return e


def assert_load_agrees(path) -> None:
    theirs, ours = _theirs(path), _ours(path)
    if isinstance(theirs, Exception):
        assert isinstance(ours, diffsynth_c.FormatError), f"safetensors refuses ({theirs!r}); we return {ours!r}"
        assert os.fspath(path) in str(ours)
        return
    assert not isinstance(ours, Exception), f"safetensors loads; we raise {ours!r}"
    assert same(ours, dict(sorted(theirs.items())))
    assert diffsynth_c.hash_model_file(path) == ds_hash_model_file(str(path))


def _our_save(tmp_path, tensors, metadata=None) -> bytes:
    [f] = diffsynth_c.save_state_dict(tensors, str(tmp_path / "ours"), metadata=metadata)
    with open(f, "rb") as g:
        return g.read()


# ---- test_pt_comparison.py ------------------------------------------------------------------------


def test_serialization_bytes_equal_safetensors(tmp_path):
    data = torch.zeros((2, 2), dtype=torch.int32)
    assert _our_save(tmp_path, {"test": data}) == safetensors.torch.save({"test": data})
    data[1, 1] = 1
    assert _our_save(tmp_path, {"test": data}) == safetensors.torch.save({"test": data})
    bf = torch.ones((2, 2), dtype=torch.bfloat16)
    bf[0, 0] = 2.25
    assert _our_save(tmp_path, {"test": bf}) == safetensors.torch.save({"test": bf})


@pytest.mark.parametrize(
    "data",
    [
        {"test": torch.randn((2, 2), dtype=torch.bfloat16), "test2": torch.randn((2, 2), dtype=torch.float16),
         "test3": torch.tensor([[True, False], [False, False]])},
        {"test1": torch.tensor([-0.5], dtype=torch.float8_e4m3fn), "test2": torch.tensor([-0.5], dtype=torch.float8_e5m2)},
        {"test": torch.zeros((2, 0))},
        {"test": torch.zeros((2, 0)), "test2": torch.zeros((2, 0))},
    ],
    ids=["odd_dtype", "odd_dtype_fp8", "zero_sized", "multiple_zero_sized"],
)  # fmt: skip
def test_round_trips(tmp_path, data):
    p = tmp_path / "st.safetensors"
    safetensors.torch.save_file(data, str(p))
    assert_load_agrees(p)
    assert _our_save(tmp_path, data) == p.read_bytes()


def test_disjoint_tensors_shared_storage(tmp_path):
    a = torch.zeros((10, 10))
    data = {"test": a[1:], "test2": a[:1]}
    assert _our_save(tmp_path, data) == safetensors.torch.save(data)


def test_meta_tensor_cannot_be_saved(tmp_path):
    data = {"test": torch.zeros((10, 10), device="meta")}
    with pytest.raises(NotImplementedError, match="meta"):
        safetensors.torch.save(data)
    with pytest.raises(NotImplementedError, match="meta"):
        diffsynth_c.save_state_dict(data, str(tmp_path / "m"))


def test_in_memory_bytes(tmp_path):
    data = {"test": torch.zeros((2, 2), dtype=torch.float32)}
    raw = safetensors.torch.save(data)
    p = tmp_path / "mem.safetensors"
    p.write_bytes(raw)
    assert_load_agrees(p)
    assert _our_save(tmp_path, data) == raw


def test_sparse_cannot_be_saved(tmp_path):
    data = {"test": torch.sparse_coo_tensor(size=(2, 3))}
    with pytest.raises(ValueError, match="sparse"):
        safetensors.torch.save(data)
    with pytest.raises(ValueError, match="'test'.*sparse"):
        diffsynth_c.save_state_dict(data, str(tmp_path / "s"))


def test_deserialization_safe_equals_torch_load(tmp_path):
    data = {f"test{i}": torch.randn(64, 64) for i in range(3)}
    pt, sf = str(tmp_path / "pt_load.pt"), str(tmp_path / "pt_load.safetensors")
    torch.save(data, pt)
    safetensors.torch.save_file(data, sf)
    ours_pt, ours_sf = diffsynth_c.load_state_dict(pt), diffsynth_c.load_state_dict(sf)
    assert same(ours_sf, dict(sorted(safetensors.torch.load_file(sf).items())))
    assert all(torch.equal(ours_sf[k], ours_pt[k]) and ours_sf[k].device.type == "cpu" for k in data)


def test_non_contiguous_and_shared_tensors_are_saved_as_copies(tmp_path):
    """safetensors' save_file refuses them; save_state_dict writes each tensor's values (a
    deliberate difference, docs/migrating.md), which is what safetensors writes for copies."""
    a = torch.arange(6, dtype=torch.float32).reshape((2, 3))
    with pytest.raises(ValueError, match="non contiguous"):
        safetensors.torch.save({"test": a[:, 1]})
    assert _our_save(tmp_path, {"test": a[:, 1]}) == safetensors.torch.save({"test": a[:, 1].contiguous()})
    with pytest.raises(RuntimeError, match="share memory"):
        safetensors.torch.save({"A": a, "B": a[:1]})
    ours = _our_save(tmp_path, {"A": a, "B": a[:1]})
    assert ours == safetensors.torch.save({"A": a.clone(), "B": a[:1].clone()})


def test_deserialization_metadata(tmp_path):
    t = torch.arange(6, dtype=torch.float32).reshape((1, 2, 3))
    plain, meta = str(tmp_path / "plain.safetensors"), str(tmp_path / "meta.safetensors")
    safetensors.torch.save_file({"test": t}, plain)
    safetensors.torch.save_file({"test": t}, meta, metadata={"Something": "more"})
    for p in (plain, meta):
        with safe_open(p, framework="pt") as f:
            theirs = f.metadata()
        assert ours_file.load_metadata_from_safetensors(p) == (theirs or {})
        assert_load_agrees(p)


# ---- test_simple.py -------------------------------------------------------------------------------


def _raw(tmp_path, name: str, header: bytes, data: bytes) -> pathlib.Path:
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return p


def test_deserialization_of_a_hand_written_file(tmp_path):
    header = b'{"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}}'
    assert_load_agrees(_raw(tmp_path, "d.safetensors", header, bytes(16)))


def test_deserialization_metadata_of_a_hand_written_file(tmp_path):
    header = b'{"__metadata__":{"framework":"pt"},"test1":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}}'
    p = _raw(tmp_path, "m.safetensors", header + b" " * 7, bytes(16))
    with safe_open(str(p), framework="pt") as f:
        assert ours_file.load_metadata_from_safetensors(str(p)) == f.metadata()
    assert_load_agrees(p)


def test_serialization_order_invariant(tmp_path):
    data = torch.zeros((2, 2), dtype=torch.int32)
    assert _our_save(tmp_path, {"test1": data, "test2": data.clone()}) == _our_save(
        tmp_path, {"test2": data.clone(), "test1": data}
    )


def test_serialization_forces_alignment(tmp_path):
    data = {"test1": torch.zeros((2, 2), dtype=torch.int32), "test2": torch.zeros((2, 2), dtype=torch.float16)}
    ours = _our_save(tmp_path, data)
    assert ours == safetensors.torch.save(data)
    assert (8 + struct.unpack("<Q", ours[:8])[0]) % 8 == 0


def test_serialization_metadata(tmp_path):
    data = {"test1": torch.zeros((2, 2), dtype=torch.int32)}
    assert _our_save(tmp_path, data, {"framework": "pt"}) == safetensors.torch.save(data, metadata={"framework": "pt"})


def test_accept_path(tmp_path):
    tensors = {"a": torch.zeros((2, 2)), "b": torch.zeros((2, 3), dtype=torch.uint8)}
    p = tmp_path / "out.safetensors"
    safetensors.torch.save_file(tensors, p)
    assert same(diffsynth_c.load_state_dict(p), safetensors.torch.load_file(p))


def test_file_not_found(tmp_path):
    missing = str(tmp_path / "notafile.safetensors")
    with pytest.raises(FileNotFoundError):
        safetensors.torch.load_file(missing)
    with pytest.raises(FileNotFoundError, match="notafile"):
        diffsynth_c.load_state_dict(missing)


@pytest.mark.parametrize(
    "tensors",
    [{"a": torch.zeros((2, 2)), "b": torch.zeros((2, 3), dtype=torch.uint8)}, {"a": torch.tensor(False)}],
    ids=["torch_example", "bool_0d"],
)
def test_readme_examples(tmp_path, tensors):
    p = tmp_path / "out.safetensors"
    safetensors.torch.save_file(tensors, str(p))
    assert_load_agrees(p)
    assert _our_save(tmp_path, tensors) == p.read_bytes()


# ---- attacks/ ------------------------------------------------------------------------------------


def test_abuse_attempt_1_header_length_past_the_file(tmp_path):
    p = tmp_path / "abuse1.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros((2, 2))}, str(p))
    raw = bytearray(p.read_bytes())
    raw[:8] = (1000).to_bytes(8, "little")
    p.write_bytes(bytes(raw))
    assert_load_agrees(p)
    with pytest.raises(diffsynth_c.FormatError):
        diffsynth_c.hash_model_file(str(p))


@pytest.mark.parametrize("shape", [[2, 2], [200, 200]], ids=["attempt_2", "attempt_3"])
def test_abuse_every_tensor_at_the_same_offsets(tmp_path, shape):
    """The upstream scripts use 10M and 100k entries; 20k show the same: refused, quickly."""
    n = shape[0] * shape[1] * 4
    header = json.dumps(
        {f"weight_{i}": {"dtype": "F32", "shape": shape, "data_offsets": [0, n]} for i in range(20_000)}
    ).encode()
    p = _raw(tmp_path, "abuse.safetensors", header, bytes(n))
    assert_load_agrees(p)
    with pytest.raises(diffsynth_c.FormatError):
        diffsynth_c.hash_model_file(str(p))


def test_torch_dos_a_deflated_storage(tmp_path):
    src = str(tmp_path / "tmp.pt")
    torch.save({"weight": torch.zeros((2, 2))}, src)
    p = str(tmp_path / "torch_dos.pt")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        zout.writestr("archive/data.pkl", zin.read("tmp/data.pkl"))
        zout.writestr("archive/version", zin.read("tmp/version"))
        with zout.open("archive/data/0", "w", force_zip64=True) as f:
            for _ in range(8):
                f.write(bytes(1 << 20))
    with pytest.raises(diffsynth_c.FormatError, match="compressed"):
        diffsynth_c.load_state_dict(p)


class _BadDict(dict):
    def __init__(self, src: str, **kwargs):
        super().__init__(**kwargs)
        self.src = src

    def __reduce__(self):
        return (eval, (f"os.system('{self.src}') or dict()",), None, None, iter(self.items()))


def test_torch_ace_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    p = str(tmp_path / "torch_ace.pt")
    torch.save(_BadDict(f"touch {marker}", weight=torch.zeros((2, 2))), p)
    with pytest.raises(diffsynth_c.FormatError, match="builtins.eval"):
        diffsynth_c.load_state_dict(p)
    with pytest.raises(diffsynth_c.FormatError, match="builtins.eval"):
        diffsynth_c.hash_model_file(p)
    with pytest.raises(Exception):  # noqa: B017 - torch's own refusal
        torch.load(p, weights_only=True)
    assert not marker.exists()
