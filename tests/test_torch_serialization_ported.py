"""Cases of pytorch's own test/test_serialization.py (its weights_only=True loads), ported to our API:
each saves what the upstream test saves, to a file, and compares our load (and keys, hash) with
torch.load(weights_only=True) on the same file. Our own code; the upstream test names are given so
a reader can find the case. Constructs our reader does not represent reach torch.load through the
documented fallback; those cases check that the answer is still torch's.

Upstream cases ported (test/test_serialization.py): test_serialization_safe, test_serialization_zipfile
(and its non-ASCII path), test_serialization_backwards_compat_safe (the old tensor rebuilds),
test_serialization_sparse_safe, test_safe_load_basic_types,
test_serialization_new_format_old_format_compat, test_pathlike_serialization,
test_meta_serialization, test_serialization_python_attr, test_weights_only_assert,
test_serialization_math_bits, test_serialization_efficient_zerotensor (save fails: nothing to load),
test_serialization_byteorder_mark, test_serialization_load_bom_data (little/big, with and without
the record), test_serialization_mmap_loading, test_serialization_dtype, test_save_different_dtype_unallocated,
test_serialization_storage_slice, test_load_nonexistent_device, the non-ASCII text of
_test_serialization, test_tensor_subclass_wrapper_serialization, test_tensor_subclass_getstate_overwrite,
test_empty_class_serialization, test_lr_scheduler_serialization (with the LSTM state dict
round trip): 24.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import warnings
import zipfile

import pytest
import torch
from diffsynth.core import hash_model_file as ds_hash_model_file

import diffsynth_c

from .torch_oracle import assert_same_as_torch, ours_load, same, torch_load


def _save(tmp_path, obj, name="t.pt", **kwargs) -> str:
    p = str(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, p, **kwargs)
    return p


def _hash_agrees(p: str) -> None:
    """hash_model_file equals DiffSynth's, or both fail with the same exception type."""
    try:
        theirs: object = ds_hash_model_file(p)
    except Exception as e:  # noqa: BLE001
        theirs = type(e)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours: object = diffsynth_c.hash_model_file(p)
    except Exception as e:  # noqa: BLE001
        ours = type(e)
    if isinstance(theirs, type):  # DiffSynth fails: ours fails too (ours may say FormatError where torch refused)
        assert isinstance(ours, type), ours
    else:
        assert ours == theirs


def _serialization_data():
    """The upstream list: shared tensors, storages and storage views, an int tensor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = [torch.randn(5, 5).float() for _ in range(2)]
        b = [a[i % 2] for i in range(4)]
        b += [a[0].storage()]
        b += [a[0].reshape(-1)[1:4].storage()]
        b += [torch.arange(1, 11).int()]
        t1 = torch.FloatTensor().set_(a[0].reshape(-1)[1:4].clone().storage(), 0, (3,), (1,))
        t2 = torch.FloatTensor().set_(a[0].reshape(-1)[1:4].clone().storage(), 0, (3,), (1,))
        b += [(t1.storage(), t1.storage(), t2.storage())]
        b += [a[0].reshape(-1)[0:2].storage()]
    return b


def test_serialization_safe(tmp_path):
    p = _save(tmp_path, _serialization_data())
    assert_same_as_torch(p)
    _hash_agrees(p)


def test_serialization_zipfile_non_ascii_path(tmp_path):
    folder = tmp_path / "非ASCIIパス"
    folder.mkdir()
    assert_same_as_torch(_save(folder, {"w": torch.randn(3, 4), "i": torch.arange(5)}))


class _OldTensorV1:
    """Pickles as torch.Tensor() then BUILD with (storage, offset, size, stride)."""

    def __init__(self, t):
        self.t = t

    def __reduce__(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return (
                torch.Tensor,
                (),
                (self.t.storage(), self.t.storage_offset(), tuple(self.t.size()), self.t.stride()),
            )


class _OldTensorV2(_OldTensorV1):
    """Pickles as torch._utils._rebuild_tensor(storage, offset, size, stride)."""

    def __reduce__(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = (self.t.storage(), self.t.storage_offset(), tuple(self.t.size()), self.t.stride())
        return (torch._utils._rebuild_tensor, state)


@pytest.mark.parametrize("old", [_OldTensorV1, _OldTensorV2])
def test_serialization_backwards_compat_safe(tmp_path, old):
    x = torch.randn(30).as_strided([2, 3], [9, 3], 2)
    assert_same_as_torch(_save(tmp_path, {"x": old(x)}))


@pytest.mark.parametrize(
    "conversion",
    [
        lambda x: x.to_sparse(),
        lambda x: x.to_sparse_csr(),
        lambda x: x.to_sparse_csc(),
        lambda x: x.to_sparse_bsr((1, 1)),
        lambda x: x.to_sparse_bsc((1, 1)),
    ],
    ids=["coo", "csr", "csc", "bsr", "bsc"],
)
def test_serialization_sparse_safe(tmp_path, conversion):
    x = torch.zeros(3, 3)
    x[1][1] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = _save(tmp_path, {"tensor": conversion(x)})
    assert_same_as_torch(p)


def test_safe_load_basic_types(tmp_path):
    p = _save(tmp_path, {"int": 123, "str": "world", "float": 3.14, "bool": False})
    assert_same_as_torch(p)
    _hash_agrees(p)


@pytest.mark.parametrize("new_format", [True, False])
def test_serialization_new_format_old_format_compat(tmp_path, new_format):
    x = [torch.ones(20, 20) for _ in range(30)]
    assert_same_as_torch(_save(tmp_path, x, _use_new_zipfile_serialization=new_format))


def test_pathlike_serialization(tmp_path):
    model = torch.nn.Conv2d(2, 32, kernel_size=3)
    p = pathlib.Path(_save(tmp_path, model.state_dict()))
    assert same(diffsynth_c.load_state_dict(p), torch_load(p))
    assert diffsynth_c.hash_model_file(p) == ds_hash_model_file(str(p))


def test_meta_serialization(tmp_path):
    big = torch.nn.Conv2d(2000, 32000, kernel_size=3, device="meta")
    p = _save(tmp_path, big.state_dict())
    ours = assert_same_as_torch(p)
    assert ours["weight"].size() == big.weight.size()
    _hash_agrees(p)


@pytest.mark.parametrize("parameter", [False, True])
def test_serialization_python_attr(tmp_path, parameter):
    t = torch.zeros(3, 3)
    if parameter:
        t = torch.nn.Parameter(t)
    t.foo, t.pi = "foo", 3.14
    ours = assert_same_as_torch(_save(tmp_path, t))
    assert ours.foo == "foo" and ours.pi == 3.14


class _HelloWorld:
    def __reduce__(self):
        return (print, ("Hello World!",))


def test_weights_only_assert(tmp_path, capsys):
    p = _save(tmp_path, _HelloWorld())
    assert isinstance(torch_load(p), pickle.UnpicklingError)
    with pytest.raises(diffsynth_c.FormatError, match="builtins.print"):
        diffsynth_c.load_state_dict(p)
    assert "Hello World" not in capsys.readouterr().out


@pytest.mark.parametrize("view", ["conj", "neg", "neg_conj"])
def test_serialization_math_bits(tmp_path, view):
    t = torch.randn(1, dtype=torch.cfloat)
    t = {"conj": torch.conj, "neg": torch._neg_view, "neg_conj": lambda x: torch._neg_view(torch.conj(x))}[view](t)
    assert_same_as_torch(_save(tmp_path, t))


def test_serialization_efficient_zerotensor(tmp_path):
    with pytest.raises(RuntimeError, match="ZeroTensor is not serializable"):
        torch.save(torch._efficientzerotensor((4, 5)), str(tmp_path / "z.pt"))


def _rewrite(src: str, dst: str, byteorder: bytes | None, swap: int = 0) -> str:
    """src's archive with its byteorder record replaced (None: dropped), the storages' bytes
    swapped per element of swap bytes (a big-endian writer's file)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/byteorder"):
                if byteorder is not None:
                    zout.writestr(info.filename, byteorder)
                continue
            if swap and "/data/" in info.filename:
                data = b"".join(data[i : i + swap][::-1] for i in range(0, len(data), swap))
            zout.writestr(info.filename, data)
    return dst


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32, torch.int16, torch.bool,
                                   torch.bfloat16, torch.float16, torch.complex64])  # fmt: skip
@pytest.mark.parametrize("variant", ["le_bom", "le_no_bom", "be_bom", "be_no_bom"])
def test_serialization_load_bom_data(tmp_path, dtype, variant):
    x = (torch.randn(4, 4) * 100).to(dtype)
    src = _save(tmp_path, {"x": x}, "src.pt")
    size = 1 if dtype is torch.complex64 else x.element_size()
    if dtype is torch.complex64:
        size = 4  # each float of the pair swaps on its own
    byteorder = {"le_bom": b"little", "le_no_bom": None, "be_bom": b"big", "be_no_bom": None}[variant]
    p = _rewrite(src, str(tmp_path / "bom.pt"), byteorder, size if variant.startswith("be") else 0)
    ours = assert_same_as_torch(p)
    if variant != "be_no_bom":  # without a record, torch reads the big-endian bytes as little
        assert torch.equal(ours["x"], x)


def test_serialization_byteorder_mark(tmp_path):
    p = _save(tmp_path, torch.nn.LSTM(3, 3).state_dict())
    with zipfile.ZipFile(p) as z:
        assert z.read("t/byteorder") == b"little"
    assert_same_as_torch(p)


def test_serialization_mmap_loading(tmp_path):
    class Dummy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(3, 64)
            self.fc2 = torch.nn.Linear(64, 5)

    p = _save(tmp_path, Dummy().state_dict())
    mapped = torch.load(p, mmap=True, weights_only=True)
    assert same(ours_load(p), mapped)
    m = Dummy()
    m.load_state_dict(diffsynth_c.load_state_dict(p))


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.float8_e4m3fn, torch.complex32])
def test_serialization_dtype(tmp_path, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.arange(0.0, 100.0).to(dtype=dtype)
        p = _save(tmp_path, {"x": x, "even": x[0::2], "odd": x[1::2]})
        ours = assert_same_as_torch(p)
        ours["odd"][0] = torch.tensor(0.25, dtype=dtype)  # the views are views of one storage, as torch's are
        ours["even"][0] = torch.tensor(-0.25, dtype=dtype)
        assert torch.equal(ours["x"][:2].to(torch.float32), torch.tensor([-0.25, 0.25]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.int8,
                                   torch.int64, torch.complex64, torch.float64])  # fmt: skip
def test_save_different_dtype_unallocated(tmp_path, dtype):
    a = torch.tensor([], dtype=dtype)
    for other in (torch.float32, torch.uint8, torch.complex128):
        assert_same_as_torch(_save(tmp_path, [a, torch.tensor([], dtype=other)], f"u{other}.pt"))


def _legacy(tmp_path, data: bytes, name: str) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_serialization_storage_slice(tmp_path):
    """A legacy (pre-zip) stream of two slices of one storage: our reader hands it to torch.load."""
    storage = torch.zeros(2).untyped_storage()
    buf = io.BytesIO()
    torch.save((storage[:4], storage[4:]), buf, _use_new_zipfile_serialization=False)
    assert_same_as_torch(_legacy(tmp_path, buf.getvalue(), "slices.pt"))


def test_load_nonexistent_device(tmp_path):
    """A legacy file whose tensor was saved on cuda:0: loaded to the CPU, as torch.load with
    map_location='cpu' (what DiffSynth passes) does."""
    buf = io.BytesIO()
    torch.save(torch.randn(2), buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue().replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    assert b"cuda:0" in data
    assert_same_as_torch(_legacy(tmp_path, data, "cuda.pt"))


def test_non_ascii_text_in_a_legacy_stream(tmp_path):
    buf = io.BytesIO()
    torch.save(["żąąóżąż", torch.zeros(1), 2], buf, _use_new_zipfile_serialization=False)
    assert_same_as_torch(_legacy(tmp_path, buf.getvalue(), "utf8.pt"))


class _WrapperSubclass(torch.Tensor):
    @staticmethod
    def __new__(cls, elem):
        r = torch.Tensor._make_subclass(cls, elem.to("meta"), elem.requires_grad)
        r.elem = elem
        return r


class _EmptySubclass(torch.Tensor):
    pass


class _GetStateSubclass(_WrapperSubclass):
    def __getstate__(self):
        return ("foo", getattr(self, "elem", None), self.__dict__)

    def __setstate__(self, state):
        _marker, self.elem, self.__dict__ = state


@pytest.mark.parametrize("make", [lambda: _WrapperSubclass(torch.rand(2)), lambda: _GetStateSubclass(torch.rand(2)),
                          lambda: _EmptySubclass([1.0])], ids=["wrapper", "getstate", "empty"])  # fmt: skip
def test_tensor_subclasses_are_refused_as_torch_refuses(tmp_path, make):
    t = make()
    t.foo = "bar"
    p = _save(tmp_path, t)
    assert isinstance(torch_load(p), Exception)
    assert isinstance(ours_load(p), Exception)  # torch's own refusal, through the fallback


def test_module_state_dicts_round_trip_through_load_state_dict(tmp_path):
    """test_serialization_byteorder_mark's LSTM and test_lr_scheduler_serialization's optimizer
    state: what the user feeds back to torch works the same."""
    lstm = torch.nn.LSTM(3, 3)
    p = _save(tmp_path, lstm.state_dict(), "lstm.pt")
    torch.nn.LSTM(3, 3).load_state_dict(diffsynth_c.load_state_dict(p))
    sgd = torch.optim.SGD([torch.randn(10, 10, requires_grad=True)], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(sgd, 6.0, total_steps=10)
    assert_same_as_torch(_save(tmp_path, sched.state_dict(), "sched.pt"))
    assert os.path.getsize(p) < 1 << 20
