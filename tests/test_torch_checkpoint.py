"""PyTorch checkpoints (.bin/.pth/.ckpt/.pt) read by the C core, against torch.load(weights_only=True)
and diffsynth.core, on files written by torch.save, and on crafted files that must be refused."""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import struct
import warnings
import zipfile

import pytest
import torch
from diffsynth.core import hash_model_file as ds_hash_model_file
from diffsynth.core import load_state_dict as ds_load_state_dict

import diffsynth_c
from diffsynth_c import _core
from diffsynth_c.loader import file as ours_file

from .conftest import ALL_TORCH_DTYPES, random_tensor


def same(a, b) -> bool:
    """Same structure, types, dtypes, shapes, strides and bits."""
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        if type(a) is not type(b) or a.dtype != b.dtype or a.shape != b.shape or a.requires_grad != b.requires_grad:
            return False
        if a.numel() and a.stride() != b.stride():
            return False
        if a.numel() == 0:
            return True
        x, y = a.detach().contiguous().reshape(-1), b.detach().contiguous().reshape(-1)
        return torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    return a == b


def rich_state_dict():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, 8, generator=g)
    sd = collections.OrderedDict()
    sd["blocks.0.attn.to_q.weight"] = random_tensor((16, 16), torch.bfloat16, 1)
    sd["blocks.0.attn.to_q.bias"] = random_tensor((16,), torch.bfloat16, 2)
    sd["shared.a"] = base
    sd["shared.view"] = base[2:, 3:]  # offset view of the same storage
    sd["shared.t"] = base.t()  # non-contiguous
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.empty(0, 3, dtype=torch.float16)
    for i, dt in enumerate(ALL_TORCH_DTYPES):
        sd[f"dtype.{i}.{str(dt)[6:]}"] = random_tensor((3, 5), dt, 10 + i)
    return sd


@pytest.fixture
def ckpt(tmp_path):
    p = str(tmp_path / "model.bin")
    torch.save(rich_state_dict(), p)
    return p


def test_tensors_equal_torch_load_and_share_storages(ckpt):
    ref = torch.load(ckpt, weights_only=True)
    got = ours_file.load_state_dict_from_bin(ckpt)
    assert same(got, ref)
    assert got["shared.view"].untyped_storage().data_ptr() == got["shared.a"].untyped_storage().data_ptr()
    assert got["shared.t"].untyped_storage().data_ptr() == got["shared.a"].untyped_storage().data_ptr()


@pytest.mark.parametrize("mode", ["mmap", "read"])
def test_load_state_dict_equals_diffsynth(ckpt, mode, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_C_LOAD_MODE", mode)
    assert same(diffsynth_c.load_state_dict(ckpt), ds_load_state_dict(ckpt))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_torch_dtype_equals_diffsynth(ckpt, dtype):
    assert same(diffsynth_c.load_state_dict(ckpt, torch_dtype=dtype), ds_load_state_dict(ckpt, torch_dtype=dtype))


def test_parameters_and_nested_values(tmp_path):
    p = str(tmp_path / "n.pth")
    obj = {
        "p": torch.nn.Parameter(torch.ones(3)),
        "frozen": torch.nn.Parameter(torch.zeros(2), requires_grad=False),
        "grad": torch.ones(2).requires_grad_(True),
        "nested": {"w": torch.arange(6).view(2, 3), "deeper": {"b": torch.ones(1, dtype=torch.float64)}},
        "meta": [1, 2.5, "x", None, True, (3, b"\x00\xffbytes")],
        7: "int key",
    }
    torch.save(obj, p)
    assert same(ours_file.load_state_dict_from_bin(p), torch.load(p, weights_only=True))


@pytest.mark.parametrize("wrapper", ["state_dict", "module", "model_state", "other"])
def test_single_key_unwrapping_and_hash_equal_diffsynth(tmp_path, wrapper):
    p = str(tmp_path / "w.ckpt")
    torch.save({wrapper: {"a.weight": torch.ones(2, 3), "b": {"c": torch.zeros(4)}}}, p)
    assert same(diffsynth_c.load_state_dict(p), ds_load_state_dict(p))
    for with_shape in (True, False):
        assert diffsynth_c.hash_model_file(p, with_shape) == ds_hash_model_file(p, with_shape)


def test_hash_equals_diffsynth_and_reads_only_the_directory(tmp_path, monkeypatch):
    p = str(tmp_path / "big.bin")
    torch.save({f"layer.{i}.weight": torch.zeros(1024, 1024) for i in range(16)}, p)  # 64 MiB of storages
    want = ds_hash_model_file(p)
    assert diffsynth_c.hash_model_file(p) == want

    def refuse(*a, **k):
        raise AssertionError("hashing read tensor bytes")

    monkeypatch.setattr(_core, "map_ranges", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with open("/proc/self/io") as f:
        before = int(next(line for line in f if line.startswith("rchar")).split()[1])
    h = diffsynth_c.hash_model_file(p)
    with open("/proc/self/io") as f:
        after = int(next(line for line in f if line.startswith("rchar")).split()[1])
    assert h == want
    assert after - before < 1 << 20, f"hashing a 64 MiB checkpoint read {after - before} bytes"


def test_mixed_safetensors_and_bin_lists(tmp_path):
    from safetensors.torch import save_file

    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.bin")
    save_file({"x": torch.ones(2), "shared": torch.zeros(3)}, a)
    torch.save({"y": torch.ones(4, 1), "shared": torch.ones(3)}, b)
    for paths in ([a, b], [b, a]):
        assert same(diffsynth_c.load_state_dict(paths), ds_load_state_dict(paths))
        assert diffsynth_c.hash_model_file(paths) == ds_hash_model_file(paths)


def test_non_dict_values_raise_like_diffsynth(tmp_path):
    p = str(tmp_path / "e.pt")
    torch.save({"w": torch.ones(1), "epoch": 5}, p)
    with pytest.raises(AttributeError) as ds:
        ds_hash_model_file(p)
    with pytest.raises(AttributeError) as ours:
        diffsynth_c.hash_model_file(p)
    assert str(ours.value) == str(ds.value)


def test_legacy_format_falls_back_with_a_warning(tmp_path):
    p = str(tmp_path / "legacy.pt")
    torch.save({"a": torch.ones(3)}, p, _use_new_zipfile_serialization=False)
    with pytest.warns(RuntimeWarning, match="legacy.pt.*torch.load"):
        got = diffsynth_c.load_state_dict(p)
    assert same(got, ds_load_state_dict(p))


def test_any_top_folder_name(tmp_path):
    src = str(tmp_path / "src.bin")
    torch.save({"a": torch.arange(4.0)}, src)
    dst = str(tmp_path / "renamed.bin")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr("whatever_name/" + info.filename.split("/", 1)[1], zin.read(info))
    assert same(ours_file.load_state_dict_from_bin(dst), {"a": torch.arange(4.0)})


# ---- crafted files -----------------------------------------------------------------------------


def craft(path, pkl: bytes, storages: dict[str, bytes] | None = None, compress: tuple = (), extra=()) -> str:
    """A zip checkpoint with the given data.pkl and data/<key> entries."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl, zipfile.ZIP_DEFLATED if "data.pkl" in compress else zipfile.ZIP_STORED)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for k, v in (storages or {}).items():
            z.writestr(f"archive/data/{k}", v, zipfile.ZIP_DEFLATED if k in compress else zipfile.ZIP_STORED)
        for name, data in extra:
            z.writestr(name, data)
    return str(path)


class _Storage:
    def __init__(self, key, cls, numel):
        self.key, self.cls, self.numel = key, cls, numel


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def tensor_pickle(obj) -> bytes:
    class P(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                return ("storage", o.cls, o.key, "cpu", o.numel)
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(obj)
    return buf.getvalue()


def test_crafted_checkpoint_loads(tmp_path):
    s = _Storage("0", torch.FloatStorage, 6)
    p = craft(
        tmp_path / "ok.bin", tensor_pickle({"t": _Tensor(s, 1, (2, 2), (2, 1))}), {"0": struct.pack("<6f", *range(6))}
    )
    got = ours_file.load_state_dict_from_bin(p)
    assert torch.equal(got["t"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def _refused(path, *words):
    with pytest.raises(diffsynth_c.FormatError) as info:
        diffsynth_c.load_state_dict(path)
    msg = str(info.value)
    assert os.fsdecode(path) in msg
    for w in words:
        assert w in msg, msg
    with pytest.raises(diffsynth_c.FormatError):
        diffsynth_c.hash_model_file(path)


@pytest.mark.parametrize(
    "module, name",
    [("os", "system"), ("builtins", "eval"), ("subprocess", "Popen"), ("posix", "system"), ("torch", "load")],
)
def test_refused_globals_run_nothing(tmp_path, module, name):
    marker = tmp_path / "pwned"
    pkl = (
        b"\x80\x02c"
        + f"{module}\n{name}\n".encode()
        + b"X"
        + struct.pack("<I", len(f"touch {marker}"))
        + f"touch {marker}".encode()
        + b"\x85R."
    )
    p = craft(tmp_path / "evil.bin", pkl)
    _refused(p, f"{module}.{name}", "refused")
    assert not marker.exists()


def test_stack_global_refused(tmp_path):
    pkl = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94."
    _refused(craft(tmp_path / "evil4.bin", pkl), "SHORT_BINUNICODE", "refuses")


def test_truncated_zip(tmp_path, ckpt):
    data = pathlib.Path(ckpt).read_bytes()
    p = tmp_path / "cut.bin"
    p.write_bytes(data[: len(data) - 30])
    _refused(str(p), "truncated")


def test_central_directory_past_the_end(tmp_path, ckpt):
    data = bytearray(pathlib.Path(ckpt).read_bytes())
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<I", data, eocd + 16, len(data) + 1000)
    p = tmp_path / "cd.bin"
    p.write_bytes(bytes(data))
    _refused(str(p), "central directory", "past the end")


def test_storage_shorter_than_the_tensor(tmp_path):
    s = _Storage("0", torch.FloatStorage, 4)
    p = craft(tmp_path / "short.bin", tensor_pickle({"t": _Tensor(s, 0, (10,), (1,))}), {"0": bytes(16)})
    _refused(p, "needs 40 bytes of storage '0'", "holds 16")
    s = _Storage("0", torch.FloatStorage, 100)
    p = craft(tmp_path / "short2.bin", tensor_pickle({"t": _Tensor(s, 0, (10,), (1,))}), {"0": bytes(16)})
    _refused(p, "claims 100 elements")


def test_compressed_entries_refused(tmp_path):
    s = _Storage("0", torch.FloatStorage, 4)
    pkl = tensor_pickle({"t": _Tensor(s, 0, (4,), (1,))})
    _refused(craft(tmp_path / "c1.bin", pkl, {"0": bytes(16)}, compress=("0",)), "compressed")
    _refused(craft(tmp_path / "c2.bin", pkl, {"0": bytes(16)}, compress=("data.pkl",)), "compressed")


def test_recursion_bomb(tmp_path):
    n = 100_000
    pkl = b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."
    _refused(craft(tmp_path / "bomb.bin", pkl), "1000 deep")


def test_memo_never_set(tmp_path):
    _refused(craft(tmp_path / "memo.bin", b"\x80\x02h\x05."), "memo index 5 was never set")


def test_malformed_streams(tmp_path):
    _refused(craft(tmp_path / "m1.bin", b"\x80\x02}X\x05\x00\x00\x00"), "runs past the end of the pickle")
    _refused(craft(tmp_path / "m4.bin", b"\x80\x02}"), "ends without STOP")
    _refused(craft(tmp_path / "m2.bin", b"\x80\x02a."), "empty stack")
    _refused(craft(tmp_path / "m3.bin", b"\x80\x02]K\x01K\x02s."), "not a dict")


def test_big_endian_falls_back(tmp_path, ckpt):
    p = str(tmp_path / "be.bin")
    with zipfile.ZipFile(ckpt) as zin, zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, b"big" if info.filename.endswith("byteorder") else data)
    # torch's own reader decides what big-endian bytes mean: ours hands the file over (with a
    # warning) and must end as torch.load does, with the same tensors or the same exception.
    ref = _outcome(lambda: torch.load(p, weights_only=True))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = _outcome(lambda: diffsynth_c.load_state_dict(p))
    assert any("byte order" in str(x.message) for x in w)
    if isinstance(ref, BaseException):
        assert type(got) is type(ref) and str(got) == str(ref), (got, ref)
    else:
        assert not isinstance(got, BaseException), got
        assert same(got, ref)


def _outcome(load):
    """What a load ends with: its result, or the exception it raised."""
    try:
        return load()
    except Exception as e:  # noqa: BLE001 - the exception is the outcome compared
        return e
