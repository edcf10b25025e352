"""The header parser accepts exactly what the safetensors library accepts, and says why otherwise.

Every case is run through both: safetensors' ``safe_open`` (the format's reference) and our
``_core.read_header``. Where both accept, names, dtypes, shapes and metadata must agree; where
safetensors rejects, we must reject too, with a FormatError naming the file.
"""

from __future__ import annotations

import os
import random
import struct

import pytest
from safetensors import safe_open

from diffsynth_c import FormatError, _core

from .conftest import raw_safetensors

T = '"dtype":"F32","shape":[2],"data_offsets":[0,8]'
D8 = b"\0" * 8


def sh(dims: str) -> bytes:
    return ('{"a":{"dtype":"U8","shape":[' + dims + '],"data_offsets":[0,8]}}').encode()


CASES: dict[str, tuple[bytes, bytes]] = {
    "basic": (b'{"a":{' + T.encode() + b"}}", D8),
    "duplicate name, same entry": (b'{"a":{' + T.encode() + b'},"a":{' + T.encode() + b"}}", D8),
    "duplicate name, last covers less": (
        b'{"a":{' + T.encode() + b'},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        D8,
    ),
    "duplicate name, last wins": (
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{' + T.encode() + b"}}",
        D8,
    ),
    "duplicate metadata": (b'{"__metadata__":{"x":"1"},"__metadata__":{"y":"2"},"a":{' + T.encode() + b"}}", D8),
    "metadata null": (b'{"__metadata__":null,"a":{' + T.encode() + b"}}", D8),
    "metadata empty": (b'{"__metadata__":{},"a":{' + T.encode() + b"}}", D8),
    "metadata int value": (b'{"__metadata__":{"x":1},"a":{' + T.encode() + b"}}", D8),
    "metadata null value": (b'{"__metadata__":{"x":null},"a":{' + T.encode() + b"}}", D8),
    "metadata duplicate key": (b'{"__metadata__":{"x":"1","x":"2"},"a":{' + T.encode() + b"}}", D8),
    "metadata array": (b'{"__metadata__":[],"a":{' + T.encode() + b"}}", D8),
    "metadata string": (b'{"__metadata__":"x","a":{' + T.encode() + b"}}", D8),
    "metadata after tensors": (b'{"a":{' + T.encode() + b'},"__metadata__":{"k":"v"}}', D8),
    "metadata key escaped": (b'{"__meta\\u0064ata__":{"k":"v"},"a":{' + T.encode() + b"}}", D8),
    "info as array": (b'{"a":["F32",[2],[0,8]]}', D8),
    "info array of 4": (b'{"a":["F32",[2],[0,8],1]}', D8),
    "info array of 2": (b'{"a":["F32",[2]]}', D8),
    "info empty array": (b'{"a":[]}', b""),
    "info null": (b'{"a":null}', b""),
    "info bool": (b'{"a":true}', b""),
    "unknown field ignored": (b'{"a":{' + T.encode() + b',"zz":{"q":[1,2,{"r":null}],"s":-1.5e3}}}', D8),
    "duplicate field": (b'{"a":{' + T.encode() + b',"dtype":"F32"}}', D8),
    "duplicate field via escape": (b'{"a":{' + T.encode() + b',"sh\\u0061pe":[2]}}', D8),
    "missing field": (b'{"a":{"dtype":"F32","shape":[2]}}', D8),
    "escaped field name": (b'{"a":{"dt\\u0079pe":"U8","shape":[8],"data_offsets":[0,8]}}', D8),
    "dtype as map": (b'{"a":{"dtype":{"U8":null},"shape":[8],"data_offsets":[0,8]}}', D8),
    "dtype as map with object": (b'{"a":{"dtype":{"U8":{}},"shape":[8],"data_offsets":[0,8]}}', D8),
    "dtype as map of two": (b'{"a":{"dtype":{"U8":null,"I8":null},"shape":[8],"data_offsets":[0,8]}}', D8),
    "dtype as int": (b'{"a":{"dtype":1,"shape":[2],"data_offsets":[0,8]}}', D8),
    "dtype unknown": (b'{"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}', D8),
    "dtype lowercase": (b'{"a":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}}', D8),
    "dtype escaped": (b'{"a":{"dtype":"U\\u0038","shape":[8],"data_offsets":[0,8]}}', D8),
    "shape float": (sh("2.0"), D8),
    "shape exponent": (sh("8e0"), D8),
    "shape negative": (sh("-8"), D8),
    "shape minus zero": (sh("-0,8"), D8),
    "shape leading zero": (sh("08"), D8),
    "shape 1.": (sh("1."), D8),
    "shape .5": (sh(".5"), D8),
    "shape 1e": (sh("1e"), D8),
    "shape bool": (sh("true"), D8),
    "shape nested": (sh("[8]"), D8),
    "shape null": (b'{"a":{"dtype":"U8","shape":null,"data_offsets":[0,8]}}', D8),
    "shape string": (b'{"a":{"dtype":"U8","shape":"8","data_offsets":[0,8]}}', D8),
    "shape above u64": (sh("18446744073709551616"), D8),
    "shape u64 max and zero": (sh("18446744073709551615,0"), D8),
    "shape overflow": (sh("4294967296,4294967296"), D8),
    "shape 2000 dims": (sh(",".join(["1"] * 2000) + ",8"), D8),
    "offsets of 3": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', D8),
    "offsets as object": (b'{"a":{"dtype":"U8","shape":[8],"data_offsets":{"0":0,"1":8}}}', D8),
    "offsets float": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', D8),
    "offsets end before begin": (b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}', D8),
    "hole": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', D8),
    "overlap": (b'{"a":{' + T.encode() + b'},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', D8),
    "same offsets, two names": (b'{"a":{' + T.encode() + b'},"b":{' + T.encode() + b"}}", D8),
    "zero-length tensors share offsets": (
        b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"c":{'
        + T.encode()
        + b"}}",
        D8,
    ),
    "trailing data": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', D8),
    "short data": (b'{"a":{' + T.encode() + b"}}", b"\0" * 4),
    "size mismatch": (b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', D8),
    "leading whitespace": (b'  \n\t{"a":{' + T.encode() + b"}}", D8),
    "trailing whitespace": (b'{"a":{' + T.encode() + b"}}  \r\n ", D8),
    "trailing NUL padding": (b'{"a":{' + T.encode() + b"}}\0\0", D8),
    "byte order mark": (b'\xef\xbb\xbf{"a":{' + T.encode() + b"}}", D8),
    "unicode whitespace": (b'{"a":{' + T.encode() + b"}}\xc2\xa0", D8),
    "trailing JSON": (b'{"a":{' + T.encode() + b"}}{}", D8),
    "trailing comma": (b'{"a":{' + T.encode() + b"},}", D8),
    "empty object": (b"{}", b""),
    "empty header": (b"", b""),
    "whitespace only": (b"   ", b""),
    "top-level array": (b"[]", b""),
    "non-string key": (b'{1:{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}', D8),
    "escaped key": (b'{"\\u0061":{' + T.encode() + b"}}", D8),
    "escaped slash": (b'{"a\\/b":{' + T.encode() + b"}}", D8),
    "surrogate pair key": (b'{"\\ud83d\\ude00":{' + T.encode() + b"}}", D8),
    "lone leading surrogate": (b'{"\\ud800":{' + T.encode() + b"}}", D8),
    "lone trailing surrogate": (b'{"\\udc00":{' + T.encode() + b"}}", D8),
    "lone surrogate in ignored field": (b'{"a":{' + T.encode() + b',"z":"\\ud800"}}', D8),
    "NUL escape key": (b'{"\\u0000":{' + T.encode() + b"}}", D8),
    "invalid escape": (b'{"\\x":{' + T.encode() + b"}}", D8),
    "control character in key": (b'{"a\x01":{' + T.encode() + b"}}", D8),
    "invalid UTF-8 in ignored field": (b'{"a":{' + T.encode() + b',"z":"\xff"}}', D8),
    "overlong UTF-8": (b'{"a\xc0\xaf":{' + T.encode() + b"}}", D8),
    "UTF-8 surrogate bytes": (b'{"a\xed\xa0\x80":{' + T.encode() + b"}}", D8),
    "non-ASCII key": (('{"é 中文":{' + T + "}}").encode(), D8),
    "bad literal": (b'{"a":{' + T.encode() + b',"x":tru}}', D8),
    "number out of range": (b'{"a":{' + T.encode() + b',"x":1e400}}', D8),
    "number just below max": (b'{"a":{' + T.encode() + b',"x":1.7976931348623157e308}}', D8),
    "number just above max": (b'{"a":{' + T.encode() + b',"x":1.8e308}}', D8),
    "number underflow": (b'{"a":{' + T.encode() + b',"x":1e-400}}', D8),
    "integer of 400 digits": (b'{"a":{' + T.encode() + b',"x":' + b"9" * 400 + b"}}", D8),
    "integer of 308 digits": (b'{"a":{' + T.encode() + b',"x":' + b"9" * 308 + b"}}", D8),
    "zero with huge exponent": (b'{"a":{' + T.encode() + b',"x":0e999999}}', D8),
    "big negative integer": (b'{"a":{' + T.encode() + b',"x":-99999999999999999999999}}', D8),
    "lone minus": (b'{"a":{' + T.encode() + b',"x":-}}', D8),
    "nesting 127": (b'{"a":{' + T.encode() + b',"z":' + b"[" * 125 + b"]" * 125 + b"}}", D8),
    "nesting 128": (b'{"a":{' + T.encode() + b',"z":' + b"[" * 126 + b"]" * 126 + b"}}", D8),
    "nesting 400": (b'{"a":{' + T.encode() + b',"z":' + b"[" * 400 + b"]" * 400 + b"}}", D8),
    "every dtype": (
        (
            b'{"b":{"dtype":"BOOL","shape":[],"data_offsets":[0,1]},"u8":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},'
            b'"f4":{"dtype":"F4","shape":[2],"data_offsets":[2,3]},"f6":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[3,6]},'
            b'"f6b":{"dtype":"F6_E3M2","shape":[4],"data_offsets":[6,9]},"e8":{"dtype":"F8_E8M0","shape":[1],"data_offsets":[9,10]},'
            b'"fz":{"dtype":"F8_E4M3FNUZ","shape":[1],"data_offsets":[10,11]},"gz":{"dtype":"F8_E5M2FNUZ","shape":[1],"data_offsets":[11,12]},'
            b'"c":{"dtype":"C64","shape":[1],"data_offsets":[12,20]}}'
        ),
        b"\1" * 20,
    ),
    "F4 0-d": (b'{"a":{"dtype":"F4","shape":[],"data_offsets":[0,0]}}', b""),
    "F4 odd count": (b'{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', b"\0\0"),
}


def reference(path: str):
    """What safetensors makes of the file: ('ok', names, dtypes, shapes, metadata) or ('error', msg)."""
    try:
        with safe_open(path, "pt") as f:
            names = list(f.keys())
            slices = [f.get_slice(k) for k in names]
            return ("ok", names, [s.get_dtype() for s in slices], [list(s.get_shape()) for s in slices], f.metadata())
    except Exception as e:  # noqa: BLE001 - the reference raises SafetensorError and others
        return ("error", f"{type(e).__name__}: {e}")


def ours(path: str):
    try:
        _, _, tensors, metadata = _core.read_header(path)
    except FormatError as e:
        assert str(e).startswith(path + ": "), f"message does not name the file: {e}"
        return ("error", str(e))
    return ("ok", [t[0] for t in tensors], [t[1] for t in tensors], [list(t[2]) for t in tensors], metadata)


def check_same(path: str) -> None:
    ref, got = reference(path), ours(path)
    assert ref[0] == got[0], f"safetensors says {ref}, we say {got}"
    if ref[0] == "ok":
        assert got == ref


@pytest.mark.parametrize("name", list(CASES))
def test_header_case_matches_safetensors(tmp_path, name):
    header, data = CASES[name]
    check_same(raw_safetensors(tmp_path / "x.safetensors", header, data))


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\1\0\0",
        struct.pack("<Q", 100_000_001) + b"{}",
        struct.pack("<Q", 2**64 - 1) + b"{}",
        struct.pack("<Q", 1000) + b"{}",
        struct.pack("<Q", 2) + b"{}",
    ],
    ids=["empty file", "shorter than the prefix", "over the cap", "u64 max", "past the end", "ok"],
)
def test_length_prefix_matches_safetensors(tmp_path, blob):
    p = tmp_path / "x.safetensors"
    p.write_bytes(blob)
    check_same(str(p))


def test_messages_say_what_is_wrong(tmp_path):
    def err(header, data=b"", **kw):
        p = raw_safetensors(tmp_path / "m.safetensors", header, data, **kw)
        with pytest.raises(FormatError) as e:
            _core.read_header(p)
        return str(e.value)

    assert "data_offsets [4, 8) leave a hole of 4 bytes" in err(CASES["hole"][0], D8)
    assert "tensor 'b'" in err(CASES["overlap"][0], D8) and "overlap tensor 'a'" in err(CASES["overlap"][0], D8)
    m = err(CASES["size mismatch"][0], D8)
    assert "tensor 'a': dtype F32 and shape [3] need 12 bytes, but data_offsets [0, 8) hold 8" in m
    assert 'unknown dtype "F33"' in err(CASES["dtype unknown"][0], D8)
    assert "is truncated" in err(CASES["short data"][0], b"\0" * 4)
    assert "4 bytes follow the last tensor" in err(CASES["trailing data"][0], D8)
    assert "over the format's limit" in err(b"{}", length=100_000_001)
    assert "runs past the end of the file" in err(b"{}", length=1000)
    assert "invalid UTF-8 in header at byte" in err(CASES["invalid UTF-8 in ignored field"][0], D8)
    assert 'missing field "data_offsets"' in err(CASES["missing field"][0], D8)
    assert "shape [4294967296, 4294967296] of dtype U8 overflows" in err(CASES["shape overflow"][0], D8)


def test_random_mutations_match_safetensors(tmp_path):
    """Differential fuzzing in miniature: mutate valid headers, compare verdicts (the fuzz
    harnesses of tests/fuzz run the parser for much longer)."""
    rng = random.Random(1234)
    seeds = [
        b'{"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
        b'{"a":["F32",[2],[0,8]],"z":{"dtype":"U8","shape":[8],"data_offsets":[8,16],"extra":[1,{"k":"\\u00e9"}]}}',
    ]
    alphabet = b'{}[],:"\\ 0123456789-+.eEtrufalsn\x00\xff\xc3\xa9u'
    p = tmp_path / "fuzz.safetensors"
    for i in range(int(os.environ.get("DIFFSYNTH_C_FUZZ_ROUNDS", "3000"))):
        h = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(4)
            pos = rng.randrange(len(h) + 1)
            if op == 0 and pos < len(h):
                h[pos] = rng.choice(alphabet)
            elif op == 1 and pos < len(h):
                del h[pos]
            elif op == 2:
                h.insert(pos, rng.choice(alphabet))
            else:
                a, b = sorted(rng.randrange(len(h) + 1) for _ in range(2))
                h[pos:pos] = h[a:b]
        data = b"\0" * rng.choice([16, 16, 16, 8, 0, 24])
        length = None if rng.random() < 0.9 else rng.randrange(len(h) + 4)
        raw_safetensors(p, bytes(h), data, length=length)
        check_same(str(p))
