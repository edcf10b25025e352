"""Checkpoints exactly as torch.load(weights_only=True) reads them (issue 17): each case saves a value
with torch.save (or crafts the pickle torch would write) and compares our load, our keys and hash
with torch's and DiffSynth's answers on the same file."""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import warnings
import zipfile

import pytest
import safetensors.torch
import torch
from diffsynth.core import hash_model_file as ds_hash_model_file

import diffsynth_c
from diffsynth_c import _core

from .torch_oracle import assert_same_as_torch, ours_load, same, torch_load


def saved(tmp_path, obj, name="ckpt.pt") -> str:
    p = str(tmp_path / name)
    torch.save(obj, p)
    return p


# ---- 1. conjugate and negative views --------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.tensor([1 + 2j, -3 - 4j]).conj(),
        lambda: torch.tensor([1.0, -2.0, 3.0])._neg_view(),
        lambda: torch.tensor([[1 + 2j, 3j], [4, 5 - 1j]], dtype=torch.complex64).conj()[1:],
        lambda: torch.tensor([1 + 1j, 2 + 2j]).conj().imag,  # a negative view of the imaginary part
        lambda: torch.tensor([1.0, 2.0], dtype=torch.float64)._neg_view().requires_grad_(True),
    ],
    ids=["conj", "neg", "conj-slice", "conj-imag", "neg-requires-grad"],
)
def test_conj_and_neg_views_equal_torch(tmp_path, make):
    t = make()
    ours = assert_same_as_torch(saved(tmp_path, {"t": t, "plain": t.detach().clone()}))
    assert ours["t"].is_conj() == t.is_conj() and ours["t"].is_neg() == t.is_neg()


def test_conj_view_and_its_base_in_one_checkpoint(tmp_path):
    base = torch.tensor([1 + 2j, 3 - 4j])
    ours = assert_same_as_torch(saved(tmp_path, {"base": base, "conj": base.conj()}))
    assert torch.equal(ours["base"], base) and torch.equal(ours["conj"].resolve_conj(), base.conj().resolve_conj())


# ---- 2. shared references -------------------------------------------------------------------


def test_shared_objects_keep_their_identity(tmp_path):
    w = torch.arange(4.0)
    inner = {"k": w}
    lst = [w, inner]
    ours = assert_same_as_torch(saved(tmp_path, {"a": lst, "b": lst, "c": (inner, inner), "w": w}))
    assert ours["a"] is ours["b"] and ours["c"][0] is ours["c"][1] and ours["a"][0] is ours["w"]


def test_a_list_that_holds_itself(tmp_path):
    a: list = [torch.ones(1)]
    a.append(a)
    ours = assert_same_as_torch(saved(tmp_path, {"a": a}))
    assert ours["a"][1] is ours["a"]


def test_shared_list_twenty_deep_is_linear_and_shared(tmp_path):
    a: list = []
    for _ in range(20):
        a = [a, a]
    p = saved(tmp_path, {"x": a, "w": torch.ones(2)})
    ours = assert_same_as_torch(p)
    assert ours["x"][0] is ours["x"][1]
    tree = _core.torch_read(p)[0]
    assert tree["x"][0] is tree["x"][1]


# ---- 3. saving over the file we loaded ------------------------------------------------------


@pytest.mark.parametrize("mode", ["mmap", "read"])
def test_resaving_a_loaded_bin_over_itself(tmp_path, mode, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_C_LOAD_MODE", mode)
    original = {f"w{i}": torch.randn(64, 64) for i in range(4)}
    p = saved(tmp_path, original, "x.bin")
    sd = diffsynth_c.load_state_dict(p)
    torch.save(sd, p)  # truncates p first, then reads our tensors
    assert same(torch_load(p), original)
    sd["w0"].add_(1)  # and our tensors are ours: the file does not change
    assert same(torch_load(p), original)


# ---- 4. saving float4 -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 2), (3, 1, 4), (0, 3)])
def test_saving_float4_writes_what_safetensors_writes(tmp_path, shape):
    t = torch.randint(0, 256, shape, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    [ours] = diffsynth_c.save_state_dict({"w": t}, str(tmp_path / "out"))
    with open(ours, "rb") as f:
        assert f.read() == safetensors.torch.save({"w": t})
    back = safetensors.torch.load_file(ours)["w"]
    assert back.dtype == t.dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))
    assert torch.equal(diffsynth_c.load_state_dict(ours)["w"].view(torch.uint8), t.view(torch.uint8))


def test_saving_a_0d_float4_is_refused_as_safetensors_refuses(tmp_path):
    t = torch.tensor(3, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type
        safetensors.torch.save({"w": t})
    with pytest.raises(ValueError, match="'w'"):
        diffsynth_c.save_state_dict({"w": t}, str(tmp_path / "out"))


# ---- 5-7. what torch answers and we hand to torch.load --------------------------------------


def test_protocol_2_builtin_names_load_as_torch_loads_them(tmp_path):
    p = saved(tmp_path, {"s": {1, 2}, "b": bytearray(b"ab"), "c": 1 + 2j, "w": torch.ones(2)})
    assert b"__builtin__" in zipfile.ZipFile(p).read("ckpt/data.pkl")
    assert_same_as_torch(p)


def _global_pickle(module: str, name: str) -> bytes:
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"."


@pytest.mark.parametrize("module, name", [("__builtin__", "set"), ("__builtin__", "xrange"), ("__builtin__", "eval")])
def test_python2_global_names_are_mapped_before_the_allow_list(tmp_path, module, name):
    p = str(tmp_path / "g.pt")
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", _global_pickle(module, name))
        z.writestr("archive/version", "3\n")
    theirs = torch_load(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _core.torch_read(p)
            ours: object = None
        except Exception as e:  # noqa: BLE001
            ours = e
    mapped = {"set": "builtins.set", "xrange": "builtins.range", "eval": "builtins.eval"}[name]
    if isinstance(ours, _core.NotNativeError):  # handed to torch.load: it is torch's answer
        assert mapped in str(ours)
    else:  # refused by us: torch refuses it too, and we name the mapped global
        assert isinstance(theirs, Exception) and isinstance(ours, _core.FormatError) and mapped in str(ours)


def test_complex32_loads_as_torch_loads_it(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = torch.tensor([1 + 2j, 3], dtype=torch.complex32)
    assert_same_as_torch(saved(tmp_path, {"t": t}))


class _V1Tensor:
    """Pickles as torch._utils._rebuild_tensor (the version-1 rebuild, four arguments)."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return torch._utils._rebuild_tensor, self.args


class _Stor:
    def __init__(self, key, cls, numel):
        self.key, self.cls, self.numel = key, cls, numel


def crafted(path, obj, storages: dict[str, bytes]) -> str:
    class P(pickle.Pickler):
        def persistent_id(self, o):
            return ("storage", o.cls, o.key, "cpu", o.numel) if isinstance(o, _Stor) else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for k, v in storages.items():
            z.writestr(f"archive/data/{k}", v)
    return str(path)


def test_version_1_rebuild_loads_as_torch_loads_it(tmp_path):
    s = _Stor("0", torch.FloatStorage, 6)
    p = crafted(
        tmp_path / "v1.pt",
        {"t": _V1Tensor(s, 1, (2, 2), (2, 1)), "u": _V1Tensor(s, 0, (3,), (2,))},
        {"0": struct.pack("<6f", *range(6))},
    )
    ours = assert_same_as_torch(p)
    assert ours["t"].tolist() == [[1.0, 2.0], [3.0, 4.0]]


class UserPoint:
    """A class a user allows torch.load to build (safe_globals)."""

    def __init__(self, x=0):
        self.x = x

    def __eq__(self, other):
        return type(other) is UserPoint and other.x == self.x


def test_globals_the_user_allowed_go_to_torch_load(tmp_path):
    p = saved(tmp_path, {"w": torch.ones(2), "pt": UserPoint(3)})
    assert isinstance(torch_load(p), Exception)
    with pytest.raises(diffsynth_c.FormatError, match="UserPoint"):  # refused while not allowed
        diffsynth_c.load_state_dict(p)
    with torch.serialization.safe_globals([UserPoint]):
        theirs = torch_load(p)
        with pytest.warns(RuntimeWarning, match="user allowed"):
            ours = diffsynth_c.load_state_dict(p)
        assert same(ours, theirs)
        with pytest.raises(AttributeError):  # DiffSynth's keys dict of a non-dict value, both ways
            ds_hash_model_file(p)
        with pytest.raises(AttributeError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            diffsynth_c.hash_model_file(p)
    with pytest.raises(diffsynth_c.FormatError, match="UserPoint"):  # and refused again after the block
        diffsynth_c.load_state_dict(p)


def test_a_global_allowed_under_another_name(tmp_path):
    p = saved(tmp_path, {"pt": UserPoint(1)})
    name = f"{UserPoint.__module__}.{UserPoint.__qualname__}"
    torch.serialization.add_safe_globals([(UserPoint, name)])
    try:
        assert same(ours_load(p), torch_load(p))
    finally:
        torch.serialization.clear_safe_globals()


# ---- 8-9. state kept ------------------------------------------------------------------------


def test_state_dict_metadata_is_kept(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    sd = net.state_dict()
    ours = assert_same_as_torch(saved(tmp_path, sd))
    assert ours._metadata == sd._metadata
    torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).load_state_dict(ours)


def test_parameter_attributes_are_kept(tmp_path):
    p = torch.nn.Parameter(torch.randn(3))
    p.tag, p.scale = "lora", 0.5
    q = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    ours = assert_same_as_torch(saved(tmp_path, {"p": p, "q": q, "data": p.data}))
    assert ours["p"].tag == "lora" and ours["p"].scale == 0.5 and not ours["q"].requires_grad
    assert type(ours["data"]) is torch.Tensor


def test_a_tensor_shared_as_data_and_as_parameter(tmp_path):
    t = torch.randn(3)
    p = torch.nn.Parameter(t)
    ours = assert_same_as_torch(saved(tmp_path, {"t": t, "p": p}))
    assert type(ours["t"]) is torch.Tensor and type(ours["p"]) is torch.nn.Parameter


# ---- 19.4: a duplicated zip entry -------------------------------------------------------------


def _duplicated(tmp_path, name_suffix: str) -> str:
    src = saved(tmp_path, {"a": torch.arange(4.0)}, "src.pt")
    dst = str(tmp_path / "dup.pt")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, data)
            if info.filename.endswith(name_suffix):
                zout.writestr(
                    info.filename, torch.full((4,), 9.0).numpy().tobytes() if "data/" in name_suffix else data
                )
    return dst


@pytest.mark.parametrize("suffix", ["data/0", "data.pkl"])
def test_a_duplicated_zip_entry_is_refused(tmp_path, suffix):
    """torch reads one of the copies (its zip library's choice: the last one today); we refuse the
    file, naming the entry (docs/migrating.md)."""
    p = _duplicated(tmp_path, suffix)
    assert not isinstance(torch_load(p), Exception)
    with pytest.raises(diffsynth_c.FormatError, match=rf"dup.pt: .*src/{suffix}' appears twice"):
        diffsynth_c.load_state_dict(p)
    with pytest.raises(diffsynth_c.FormatError, match="appears twice"):
        diffsynth_c.hash_model_file(p)


def test_overlapping_zip_entries_are_refused(tmp_path):
    """Two directory records pointing at the same bytes (torch.save never writes that)."""
    src = saved(tmp_path, {"a": torch.arange(4.0), "b": torch.arange(4.0) + 1}, "src.pt")
    with open(src, "rb") as f:
        data = bytearray(f.read())
    cd = data.find(b"PK\x01\x02")
    records = []
    pos = cd
    while data[pos : pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", data, pos + 28)
        records.append(pos)
        pos += 46 + n + m + k
    names = [bytes(data[r + 46 : r + 46 + struct.unpack_from("<H", data, r + 28)[0]]) for r in records]
    r0, r1 = (records[names.index(b"src/data/0")], records[names.index(b"src/data/1")])
    data[r1 + 42 : r1 + 46] = data[r0 + 42 : r0 + 46]  # data/1's local header offset := data/0's
    p = tmp_path / "overlap.pt"
    p.write_bytes(bytes(data))
    with pytest.raises(diffsynth_c.FormatError, match="overlap"):
        diffsynth_c.load_state_dict(str(p))


# ---- the keys and hash of shared dicts --------------------------------------------------------


def test_hash_of_shared_dicts_equals_diffsynth(tmp_path):
    inner = {"w": torch.ones(2, 3)}
    p = saved(tmp_path, {"a": inner, "b": inner, "c": torch.ones(1)})
    assert diffsynth_c.hash_model_file(p) == ds_hash_model_file(p)
    assert diffsynth_c.load_keys_dict(p) == {"a": {"w": [2, 3]}, "b": {"w": [2, 3]}, "c": [1]}


def test_a_dict_holding_itself_is_refused_for_hashing_with_the_file_named(tmp_path):
    d: dict = {"w": torch.ones(1)}
    d["self"] = d
    p = saved(tmp_path, d)
    assert_same_as_torch(p)  # loading is fine
    with pytest.raises(diffsynth_c.FormatError, match=f"{os.path.basename(p)}: .*contains itself"):
        diffsynth_c.hash_model_file(p)


# ---- the archive's version record, as torch's reader checks it ---------------------------------


@pytest.mark.parametrize("record", ["1", " 3", "3x", "10", "0", "-1", "0x3", "abc", "11", None, ".data"])
def test_version_record_accepted_and_refused_as_torch(tmp_path, record):
    src = saved(tmp_path, {"a": torch.arange(3.0)}, "src.pt")
    p = str(tmp_path / "v.pt")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(p, "w") as zout:
        for n in zin.namelist():
            if n == "src/version":
                if record == ".data":
                    zout.writestr("src/.data/version", zin.read(n))
                elif record is not None:
                    zout.writestr(n, record + "\n")
            else:
                zout.writestr(n, zin.read(n))
    ours = assert_same_as_torch(p)
    if isinstance(ours, Exception):
        assert isinstance(ours, diffsynth_c.FormatError) and "version" in str(ours)


# ---- the opcodes torch's weights-only unpickler runs, and no others ------------------------------


def _pickle_file(tmp_path, pkl: bytes, name: str = "op.pt") -> str:
    p = str(tmp_path / name)
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
    return p


@pytest.mark.parametrize(
    "pkl",
    [
        b"\x80\x02U\x03abc.",  # SHORT_BINSTRING: a str (torch.load decodes it as UTF-8)
        b"\x80\x02U\x02\xc3\xa9.",
        b"\x80\x02U\x02\xff\xfe.",  # not UTF-8: both refuse
        b"\x80\x02K\x01K\x020.",  # POP
        b"\x80\x02K\x012.",  # DUP
        b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01\x94.",  # FRAME, MEMOIZE
        b"\x80\x02C\x02ab.",  # SHORT_BINBYTES
        b"\x80\x02]K\x01a.",
        b"\x80\x02ccollections\nOrderedDict\n)\x81.",  # NEWOBJ of an OrderedDict
    ],
)
def test_opcodes_as_torch_runs_them(tmp_path, pkl):
    ours = assert_same_as_torch(_pickle_file(tmp_path, pkl))
    if isinstance(ours, Exception):
        assert isinstance(ours, diffsynth_c.FormatError), ours


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_protocols_as_torch(tmp_path, protocol):
    p = str(tmp_path / f"p{protocol}.pt")
    torch.save({"w": torch.arange(3.0), "n": [1, "a", 2.5]}, p, pickle_protocol=protocol)
    assert_same_as_torch(p)


def _assorted():
    inner = collections.OrderedDict(a=torch.ones(1))
    inner._metadata = {"x": 1}
    t = torch.arange(4.0)
    return {
        "param_conj": {"p": torch.nn.Parameter(torch.tensor([1 + 2j]).conj(), requires_grad=False)},
        "nested_metadata": {"m": inner, "n": [inner]},
        "tuple_key": {(1, "a"): t, "t": (t, t[1:])},
        "bytes_and_text": {"b": b"\x00\xff", "s": "é"},
        "numbers": {"big": 2**62, "neg": -5, "nan": float("nan"), "inf": float("-inf")},
        "empty": {},
        "scalar_top": torch.tensor(3.5),
        "list_top": [torch.ones(2), 1, None, True],
    }


@pytest.mark.parametrize("name", list(_assorted()))
def test_assorted_values_equal_torch(tmp_path, name):
    assert_same_as_torch(saved(tmp_path, _assorted()[name]))
