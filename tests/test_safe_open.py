"""diffsynth_c.safe_open against the installed safetensors.safe_open on the same files.

The cases of safetensors' own Python tests of ``safe_open`` / ``get_slice`` for the torch framework
(bindings/python/tests: test_pt_comparison.py, test_simple.py, test_pread_backend.py), rewritten
here: each runs on both readers and compares values, dtypes, shapes and exception types. Then ours:
a replaced file keeps serving the opened version, errors name the file and key, a slice reads only
the pages its elements lie in.
"""

from __future__ import annotations

import os
import struct

import pytest

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")
from safetensors import SafetensorError
from safetensors import safe_open as st_open
from safetensors.torch import save_file

import diffsynth_c
from diffsynth_c import safe_open as ds_open

OPENERS = [st_open, ds_open]
# safetensors' test cases ported here (counted in the report of the change that added them)
PORTED = []


def ported(name: str):
    """Marks a test as the port of safetensors' test `name`."""

    def mark(fn):
        PORTED.append(name)
        return fn

    return mark


def same(a, b) -> bool:
    """Equal dtype, shape and bytes (float8/float4 have no torch.equal on every build)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    try:
        return torch.equal(a, b)
    except RuntimeError:
        return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def read_all(opener, path, **kw):
    with opener(path, framework="pt", device="cpu", **kw) as f:
        keys = f.keys()
        return {k: f.get_tensor(k) for k in keys}, keys, f.metadata()


def assert_readers_agree(path, **kw):
    (a, ka, ma), (b, kb, mb) = read_all(st_open, path, **kw), read_all(ds_open, path, **kw)
    assert ka == kb and ma == mb
    for k in ka:
        assert same(a[k], b[k]), k
    return b


def outcome(fn):
    """('ok', tensor) or ('raise', exception type) of fn()."""
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001  compared by type
        return "raise", type(e)


def assert_same_outcome(fn_of_handle, path):
    with st_open(path, framework="pt") as f, ds_open(path, framework="pt") as g:
        (ka, va), (kb, vb) = outcome(lambda: fn_of_handle(f)), outcome(lambda: fn_of_handle(g))
    assert ka == kb, (va, vb)
    if ka == "ok":
        assert same(va, vb)
    else:
        assert issubclass(vb, va) or va is vb or (va is SafetensorError and issubclass(vb, SafetensorError)), (va, vb)


# ---- safetensors' test_pt_comparison.py ---------------------------------------------------------


@ported("test_pt_comparison::test_odd_dtype")
def test_odd_dtypes(tmp_path):
    data = {
        "test": torch.randn((2, 2), dtype=torch.bfloat16),
        "test2": torch.randn((2, 2), dtype=torch.float16),
        "test3": torch.zeros((2, 2), dtype=torch.bool),
        "test4": torch.zeros((2, 2), dtype=torch.complex64),
    }
    data["test3"][0, 0] = True
    save_file(data, tmp_path / "odd.safetensors")
    got = assert_readers_agree(tmp_path / "odd.safetensors")
    for k, v in data.items():
        assert same(got[k], v)


PORTED += [f"test_pt_comparison::test_odd_dtype_fp8_{n}" for n in ("e4m3fn", "e5m2", "e8m0", "fnuz")]


@pytest.mark.parametrize(
    "name,value",
    [
        ("float8_e4m3fn", -0.5),
        ("float8_e5m2", -0.5),
        ("float8_e8m0fnu", 0.5),
        ("float8_e4m3fnuz", 0.5),
        ("float8_e5m2fnuz", 0.5),
    ],
)
def test_fp8(tmp_path, name, value):
    dtype = getattr(torch, name, None)
    if dtype is None:
        pytest.skip(f"torch has no {name}")
    save_file({"test": torch.tensor([value], dtype=dtype)}, tmp_path / "f8.safetensors")
    got = assert_readers_agree(tmp_path / "f8.safetensors")
    assert got["test"].dtype == dtype and got["test"].item() == value


@ported("test_pt_comparison::test_odd_dtype_fp4")
def test_fp4(tmp_path):
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("torch has no float4_e2m1fn_x2")
    data = {
        "test1": torch.tensor([0.0], dtype=torch.float8_e8m0fnu),
        "test2": torch.randint(0, 255, (2, 2), dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
    }
    save_file(data, tmp_path / "f4.safetensors")
    got = assert_readers_agree(tmp_path / "f4.safetensors")
    assert got["test2"].dtype == torch.float4_e2m1fn_x2 and tuple(got["test2"].shape) == (2, 2)


@ported("test_pt_comparison::test_zero_sized")
def test_zero_sized(tmp_path):
    save_file({"test": torch.zeros((2, 0))}, tmp_path / "z.safetensors")
    assert tuple(assert_readers_agree(tmp_path / "z.safetensors")["test"].shape) == (2, 0)


@ported("test_pt_comparison::test_multiple_zero_sized")
def test_multiple_zero_sized(tmp_path):
    save_file({"test": torch.zeros((2, 0)), "test2": torch.zeros((2, 0))}, tmp_path / "z.safetensors")
    assert_readers_agree(tmp_path / "z.safetensors")


@ported("test_pt_comparison::LoadTestCase::test_deserialization_safe")
def test_deserialization_safe(tmp_path):
    data = {f"test{i}": torch.randn((256, 256)) for i in ("", "2", "3")}
    torch.save(data, tmp_path / "w.pt")
    save_file(data, tmp_path / "w.safetensors")
    got = assert_readers_agree(tmp_path / "w.safetensors")
    saved = torch.load(tmp_path / "w.pt", weights_only=True)
    for k, v in got.items():
        assert torch.equal(v, saved[k]) and v.device == torch.device("cpu")


@ported("test_pt_comparison::LoadTestCase::test_deserialization_safe_gpu_slice")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_slice_to_gpu(tmp_path):
    save_file({"a": torch.randn(8, 4), "b": torch.randn(3, 2)}, tmp_path / "g.safetensors")
    for opener in OPENERS:
        with opener(tmp_path / "g.safetensors", framework="pt", device="cuda:0") as f:
            got = {k: f.get_slice(k)[:1] for k in list(f.keys())}
        assert all(v.device == torch.device("cuda:0") for v in got.values())
    with ds_open(tmp_path / "g.safetensors", framework="pt", device="cuda:0") as f:
        assert torch.equal(f.get_slice("a")[:1].cpu(), st_open(tmp_path / "g.safetensors", "pt").get_tensor("a")[:1])


@ported("test_pt_comparison::SliceTestCase::test_deserialization_slice")
def test_deserialization_slice(tmp_path):
    tensor = torch.arange(6, dtype=torch.float32).reshape((1, 2, 3))
    save_file({"test": tensor}, tmp_path / "s.safetensors")
    with ds_open(tmp_path / "s.safetensors", framework="pt") as f, st_open(tmp_path / "s.safetensors", "pt") as g:
        sl, ref = f.get_slice("test"), g.get_slice("test")
        assert sl.get_shape() == ref.get_shape() == [1, 2, 3]
        assert sl.get_dtype() == ref.get_dtype() == "F32"
        got = sl[:, :, 1:2]
        assert same(got, ref[:, :, 1:2]) and same(got, tensor[:, :, 1:2])
    assert got.numpy().tobytes() == ref[:, :, 1:2].numpy().tobytes()  # still valid after the handle closed


@ported("test_pt_comparison::SliceTestCase::test_deserialization_metadata")
def test_deserialization_metadata(tmp_path):
    tensor = torch.arange(6, dtype=torch.float32).reshape((1, 2, 3))
    save_file({"test": tensor}, tmp_path / "a.safetensors")
    save_file({"test": tensor}, tmp_path / "b.safetensors", metadata={"Something": "more"})
    for name in ("a", "b"):
        with st_open(tmp_path / f"{name}.safetensors", "pt") as f, ds_open(tmp_path / f"{name}.safetensors", "pt") as g:
            assert f.metadata() == g.metadata()
    assert ds_open(tmp_path / "a.safetensors", "pt").metadata() is None


# ---- safetensors' test_simple.py ----------------------------------------------------------------


@ported("test_simple::WindowsTestCase::test_get_correctly_dropped")
def test_get_correctly_dropped(tmp_path):
    path = tmp_path / "out.safetensors"
    save_file({"a": torch.zeros((2, 2)), "b": torch.zeros((2, 3), dtype=torch.uint8)}, path)
    for opener in OPENERS:
        with opener(path, framework="pt") as f:
            pass
        with pytest.raises(SafetensorError):
            f.keys()
    with open(path, "w") as g:
        g.write("something")


@ported("test_simple::ErrorsTestCase::test_file_not_found")
def test_file_not_found(tmp_path):
    for opener in OPENERS:
        with pytest.raises(FileNotFoundError) as e, opener(tmp_path / "notafile", framework="pt"):
            pass
    assert "notafile" in str(e.value)


PORTED.append("test_simple::ReadmeTestCase::test_numpy_slice (its index cases, through the torch framework)")
TORCH_SLICES = [
    ("[:]", lambda s: s[:]),
    ("[()]", lambda s: s[()]),
    ("[:2]", lambda s: s[:2]),
    ("[:, :2]", lambda s: s[:, :2]),
    ("[0, :2]", lambda s: s[0, :2]),
    ("[2:, 0]", lambda s: s[2:, 0]),
    ("[2:, 1]", lambda s: s[2:, 1]),
    ("[2:, -1]", lambda s: s[2:, -1]),
    ("[list()]", lambda s: s[[]]),
    # the out-of-range cases of test_numpy_slice, through the torch framework
    ("[2:, -5]", lambda s: s[2:, -5]),
    ("[2:, -6]", lambda s: s[2:, -6]),
    ("[[0, 1]]", lambda s: s[[0, 1]]),
    ("[2:, 20]", lambda s: s[2:, 20]),
    ("[:20]", lambda s: s[:20]),
    ("[:, :20]", lambda s: s[:, :20]),
    # more of torch's indexing
    ("[..., 1]", lambda s: s[..., 1]),
    ("[::3]", lambda s: s[::3]),
    ("[None]", lambda s: s[None]),
    ("[-3:-1, 1:4:2]", lambda s: s[-3:-1, 1:4:2]),
    ("[5:2]", lambda s: s[5:2]),
    ("[0, 0, 0]", lambda s: s[0, 0, 0]),
    ("[::-1]", lambda s: s[::-1]),
]


@ported("test_simple::ReadmeTestCase::test_torch_slice")
@pytest.mark.parametrize("text,index", TORCH_SLICES, ids=[t for t, _ in TORCH_SLICES])
def test_torch_slice(tmp_path, text, index):
    A = torch.randn((10, 5))
    save_file({"a": A}, tmp_path / "slice.safetensors")
    assert_same_outcome(lambda f: index(f.get_slice("a")), tmp_path / "slice.safetensors")
    kind, value = outcome(lambda: index(ds_open(tmp_path / "slice.safetensors", "pt").get_slice("a")))
    if kind == "ok":
        assert same(value, index(A))


def test_slices_of_every_dtype_and_rank(tmp_path):
    data = {
        "s": torch.tensor(3.5),
        "bf": torch.randn(4, 6, dtype=torch.bfloat16),
        "i": torch.arange(2 * 3 * 4, dtype=torch.int64).reshape(2, 3, 4),
        "e": torch.zeros(0, 3),
    }
    save_file(data, tmp_path / "d.safetensors")
    for key, idx in [("s", ()), ("s", ...), ("bf", (slice(1, 3), slice(None, None, 2))), ("i", (..., 2)), ("e", 0)]:
        assert_same_outcome(lambda f, key=key, idx=idx: f.get_slice(key)[idx], tmp_path / "d.safetensors")


# ---- safetensors' test_pread_backend.py ---------------------------------------------------------


def pread_source():
    data = {
        "fp32_2d": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "bf16_2d": torch.arange(8, dtype=torch.bfloat16).reshape(2, 4),
        "fp16_3d": torch.arange(24, dtype=torch.float16).reshape(2, 3, 4),
        "scalar_fp32": torch.tensor(7.5),
        "empty_2d": torch.empty((0, 5), dtype=torch.float16),
        "i64_1d": torch.arange(5),
    }
    if hasattr(torch, "float8_e4m3fn"):
        data["fp8_e4m3fn"] = torch.zeros(8, dtype=torch.float8_e4m3fn)
    return data


@pytest.fixture
def pread_file(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(pread_source(), path, metadata={"foo": "bar"})
    return path


@ported("test_pread_backend::test_safe_open_round_trip")
def test_pread_round_trip(pread_file):
    got = assert_readers_agree(pread_file, backend="pread")
    for k, v in pread_source().items():
        assert same(got[k], v), k


@ported("test_pread_backend::test_get_tensors_round_trip")
def test_get_tensors(pread_file):
    for backend in ("mmap", "pread"):
        with st_open(pread_file, "pt", backend=backend) as f, ds_open(pread_file, "pt", backend=backend) as g:
            a, b = f.get_tensors(), g.get_tensors()
            assert list(a) == list(b) == f.offset_keys() == g.offset_keys()
            assert all(same(a[k], b[k]) for k in a)


@ported("test_pread_backend::test_default_backend_unchanged")
def test_backends_agree(pread_file):
    with ds_open(pread_file, "pt") as f, ds_open(pread_file, "pt", backend="pread") as g:
        assert all(same(f.get_tensor(k), g.get_tensor(k)) for k in list(f.keys()))


@ported("test_pread_backend::test_get_slice")
def test_pread_get_slice(pread_file):
    with ds_open(pread_file, framework="pt", device="cpu", backend="pread") as f:
        sl = f.get_slice("fp32_2d")
        assert list(sl.get_shape()) == [3, 4]
        assert same(sl[:, 1:3], pread_source()["fp32_2d"][:, 1:3])


@ported("test_pread_backend::test_invalid_backend_string_raises")
def test_invalid_backend(pread_file):
    for opener in OPENERS:
        with pytest.raises(SafetensorError):
            opener(pread_file, framework="pt", device="cpu", backend="not_a_backend")


@ported("test_pread_backend::test_truncated_header_is_rejected")
def test_truncated_header(pread_file, tmp_path):
    bad = tmp_path / "truncated.safetensors"
    raw = pread_file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    bad.write_bytes(raw[: 8 + n // 2])
    for opener in OPENERS:
        with pytest.raises(SafetensorError), opener(bad, framework="pt", device="cpu", backend="pread") as f:
            f.get_tensors()
    with pytest.raises(diffsynth_c.FormatError, match="truncated.safetensors"):
        ds_open(bad, "pt")


@ported("test_pread_backend::test_data_offset_overflow_is_rejected")
def test_data_offset_overflow(tmp_path):
    bad = tmp_path / "lying.safetensors"
    header = b'{"liar":{"dtype":"F32","shape":[1024,1024],"data_offsets":[0,4194304]}}'
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00")
    for opener in OPENERS:
        with pytest.raises(SafetensorError), opener(bad, framework="pt", device="cpu", backend="pread") as f:
            f.get_tensors()


def test_ported_count():
    # every port above registered itself (parametrized ones once)
    assert len(set(PORTED)) == len(PORTED) == 23


# ---- ours -----------------------------------------------------------------------------------------


def test_replaced_file_keeps_serving_the_opened_version(tmp_path):
    path, new = tmp_path / "m.safetensors", tmp_path / "new.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(300)}, path)
    handles = [opener(path, framework="pt") for opener in OPENERS]
    # the new version moves every offset: a reader that reopened the path would read garbage
    save_file({"a": torch.full((2, 3), 7.0), "b": torch.zeros(300), "aa": torch.full((100,), 9.0)}, new)
    os.replace(new, path)
    (f, g) = handles
    assert g.keys() == f.keys() == ["a", "b"]
    for k in ("a", "b"):
        assert same(g.get_tensor(k), f.get_tensor(k))
        assert same(g.get_slice(k)[1:], f.get_slice(k)[1:])
    assert torch.equal(g.get_tensor("a"), torch.arange(6.0).reshape(2, 3))


def test_writes_alias_as_safetensors_and_never_reach_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(6.0)}, path)
    before = path.read_bytes()
    seen = []
    for opener in OPENERS:
        f = opener(path, framework="pt")
        t = f.get_tensor("a")
        t += 100
        seen.append((f.get_tensor("a").clone(), opener(path, framework="pt").get_tensor("a").clone()))
    assert same(seen[0][0], seen[1][0]) and same(seen[0][1], seen[1][1])
    assert path.read_bytes() == before


def test_errors_name_the_file_and_key_and_are_both_kinds(tmp_path):
    path = tmp_path / "e.safetensors"
    save_file({"a": torch.zeros(2)}, path)
    f = ds_open(path, framework="pt")
    for call in (lambda: f.get_tensor("nope"), lambda: f.get_slice("nope")):
        with pytest.raises(SafetensorError, match=r"e\.safetensors.*'nope'"):
            call()
        with pytest.raises(diffsynth_c.FormatError):
            call()
    for opener in OPENERS:
        with pytest.raises(SafetensorError):
            opener(path, framework="pt", device="nodevice")
        with pytest.raises(SafetensorError):
            opener(path, framework="nonsense")


def test_tensors_outlive_the_handle(tmp_path):
    path = tmp_path / "o.safetensors"
    save_file({"a": torch.arange(1000.0)}, path)
    with ds_open(path, framework="pt") as f:
        t, s = f.get_tensor("a"), f.get_slice("a")[10:20]
    assert torch.equal(t, torch.arange(1000.0)) and torch.equal(s, torch.arange(10.0, 20.0))
    with pytest.raises(SafetensorError, match="closed"):
        s = f.get_slice("a")
    # a slice object made before the handle closed still slices, as safetensors' does
    for opener in OPENERS:
        with opener(path, framework="pt") as g:
            sl = g.get_slice("a")
        assert torch.equal(sl[5:7], torch.arange(5.0, 7.0))


def _present_pages(addr: int, nbytes: int) -> int:
    """Pages of [addr, addr+nbytes) mapped into this process now (/proc/self/pagemap bit 63)."""
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = addr // page, (addr + nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as pm:
        pm.seek(first * 8)
        raw = pm.read((last - first + 1) * 8)
    return sum(1 for (v,) in struct.iter_unpack("<Q", raw) if v >> 63)


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="needs /proc/self/pagemap")
def test_slice_reads_only_the_pages_it_needs(tmp_path):
    path = tmp_path / "big.safetensors"
    rows, cols = 512, 2048  # 4 MiB of float32, one row = 8 KiB = 2 pages
    save_file({"w": torch.randn(rows, cols)}, path)
    with ds_open(path, framework="pt") as f:
        part = f.get_slice("w")[100:102]
        full = f.get_tensor("w")
    assert torch.equal(part, full[100:102])
    base = part.untyped_storage().data_ptr()
    # the slice's mapping spans the whole tensor; only the pages around the two rows came in (the
    # kernel maps a few neighbours of a faulting page: fault-around, large page-cache folios)
    pages = rows * cols * 4 // os.sysconf("SC_PAGE_SIZE")
    assert 2 <= _present_pages(base, rows * cols * 4) < pages // 4
    assert _present_pages(full.data_ptr(), rows * cols * 4) >= pages  # a whole tensor is read in


def test_get_tensor_to_another_device_follows_safetensors(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"a": torch.arange(4.0)}, path)
    assert ds_open(path, "pt", device=torch.device("cpu")).get_tensor("a").device == torch.device("cpu")
    if torch.cuda.is_available():
        for opener in OPENERS:
            assert opener(path, "pt", device="cuda:0").get_tensor("a").device == torch.device("cuda:0")


def test_open_file_refuses_reads_after_close_and_past_the_end(tmp_path):
    from diffsynth_c import _core

    path = tmp_path / "c.safetensors"
    save_file({"a": torch.arange(64.0)}, path)
    f = _core.OpenFile(path)
    _hl, start, _tensors, _meta = f.read_header()
    t = f.map_range(start, 256)
    with pytest.raises(ValueError, match=r"c\.safetensors.*past the end"):
        f.map_range(start, f.size)
    f.close()
    assert f.closed and torch.equal(torch.from_dlpack(t).view(torch.float32), torch.arange(64.0))
    for call in (f.read_header, f.map, lambda: f.map_range(start, 4), f.fileno):
        with pytest.raises(ValueError, match=r"c\.safetensors.*closed"):
            call()


def test_closing_while_other_threads_read(tmp_path):
    import threading

    path = tmp_path / "t.safetensors"
    data = {f"w{i}": torch.randn(256, 256) for i in range(8)}
    save_file(data, path)
    f = ds_open(path, framework="pt")
    errors, done = [], []

    def reader(i):
        try:
            for _ in range(50):
                k = f"w{i % 8}"
                assert torch.equal(f.get_slice(k)[3:9], data[k][3:9])
                assert torch.equal(f.get_tensor(k), data[k])
            done.append(i)
        except SafetensorError as e:  # the handle was closed under it: refused, never a crash
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    f.__exit__(None, None, None)
    for t in threads:
        t.join()
    assert len(done) + len(errors) == 8
    assert all("closed" in str(e) for e in errors)
