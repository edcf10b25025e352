"""Bad input raises a Python exception whose message names the file, the tensor and what is wrong;
never a crash, never a hang."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import diffsynth_c
from diffsynth_c import FormatError

from .conftest import raw_safetensors

GOOD = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'

BAD = {
    "truncated data": (GOOD, b"\0" * 5, None, r"is truncated: the header's tensors need 8 bytes of data"),
    "header length past the end": (GOOD, b"\0" * 8, 4096, r"header length 4096 runs past the end of the file"),
    "header over the cap": ("{}", b"", 100_000_001, r"header length 100000001 is over the format's limit"),
    "invalid JSON": ('{"a":{"dtype":"F32",}', b"", None, r"invalid JSON in header at byte \d+: "),
    "wrong type in JSON": (
        '{"a":{"dtype":"F32","shape":"2","data_offsets":[0,8]}}',
        b"\0" * 8,
        None,
        r"tensor 'a': shape must be an array of integers, found a string",
    ),
    "overlapping offsets": (
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        b"\0" * 8,
        None,
        r"tensor 'b': data_offsets \[4, 8\) overlap tensor 'a'",
    ),
    "offsets out of range": (
        '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}',
        b"\0" * 8,
        None,
        r"is truncated: the header's tensors need 16 bytes of data \(to tensor 'a'\), the file holds 8",
    ),
    "shape and size disagree": (
        '{"w":{"dtype":"BF16","shape":[3,3],"data_offsets":[0,8]}}',
        b"\0" * 8,
        None,
        r"tensor 'w': dtype BF16 and shape \[3, 3\] need 18 bytes, but data_offsets \[0, 8\) hold 8",
    ),
    "unknown dtype": (
        '{"w":{"dtype":"Q7","shape":[8],"data_offsets":[0,8]}}',
        b"\0" * 8,
        None,
        r"tensor 'w': unknown dtype \"Q7\"",
    ),
    "not a safetensors file": ("", b"", 0x6F6C6C6568, r"is over the format's limit"),
    "empty file": (None, b"", None, r"fewer than the 8-byte header length"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("api", ["load_state_dict", "hash_model_file", "load_keys_dict", "load_with_dtype"])
def test_bad_file_raises_with_file_and_reason(tmp_path, case, api):
    header, data, length, pattern = BAD[case]
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(data)
        path = str(path)
    else:
        path = raw_safetensors(path, header, data, length=length)
    call = {
        "load_state_dict": lambda p: diffsynth_c.load_state_dict(p),
        "hash_model_file": lambda p: diffsynth_c.hash_model_file(p),
        "load_keys_dict": lambda p: diffsynth_c.load_keys_dict(p),
        "load_with_dtype": lambda p: diffsynth_c.load_state_dict(p, torch_dtype=torch.bfloat16),
    }[api]
    with pytest.raises(FormatError, match=r"^" + str(path).replace(".", r"\.") + ": .*" + pattern):
        call(path)
    assert issubclass(FormatError, ValueError)


def test_second_shard_is_named(tmp_path):
    good = str(tmp_path / "good.safetensors")
    save_file({"x": torch.zeros(2)}, good)
    bad = raw_safetensors(tmp_path / "bad-00002.safetensors", GOOD, b"\0" * 3)
    with pytest.raises(FormatError, match=r"bad-00002\.safetensors: file is truncated"):
        diffsynth_c.load_state_dict([good, bad])
    with pytest.raises(FormatError, match=r"bad-00002\.safetensors: "):
        diffsynth_c.hash_model_file([good, bad])


@pytest.mark.parametrize("api", ["load_state_dict", "hash_model_file", "load_keys_dict"])
def test_missing_file(tmp_path, api):
    path = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError) as e:
        getattr(diffsynth_c, api)(path)
    assert path in str(e.value) and e.value.filename == path


@pytest.mark.parametrize("api", ["load_state_dict", "hash_model_file"])
def test_directory(tmp_path, api):
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    with pytest.raises(IsADirectoryError) as e:
        getattr(diffsynth_c, api)(str(d))
    assert str(d) in str(e.value)


@pytest.mark.parametrize("api", ["load_state_dict", "hash_model_file"])
def test_empty_list(api):
    """DiffSynth merges no files: {} and the hash of the empty key string."""
    from diffsynth_c.patch import original

    assert getattr(diffsynth_c, api)([]) == original("diffsynth.core.loader.file", api)([])


def test_f4_with_odd_last_dimension(tmp_path):
    p = raw_safetensors(tmp_path / "f4.safetensors", '{"q":{"dtype":"F4","shape":[2,3],"data_offsets":[0,3]}}', b"abc")
    with pytest.raises(FormatError, match=r"f4\.safetensors: tensor 'q': dtype F4 needs an even last dimension"):
        diffsynth_c.load_state_dict(p)


def test_errors_do_not_leak_mappings(tmp_path):
    """A failing multi-file load unmaps what it mapped (no growth over many failures)."""
    good = str(tmp_path / "good.safetensors")
    save_file({"x": torch.zeros(1 << 20)}, good)
    bad = raw_safetensors(tmp_path / "bad.safetensors", GOOD, b"")

    def mappings():
        with open("/proc/self/maps") as f:
            return sum(1 for line in f if "good.safetensors" in line)

    for _ in range(50):
        with pytest.raises(FormatError):
            diffsynth_c.load_state_dict([good, bad])
    assert mappings() == 0


@pytest.mark.parametrize("api", ["load_state_dict", "hash_model_file", "load_keys_dict"])
def test_fifo_is_refused_without_blocking(tmp_path, api):
    """A FIFO is not a model file: refused at once (open must not wait for a writer that never comes)."""
    import subprocess
    import sys

    fifo = str(tmp_path / "pipe.safetensors")
    os.mkfifo(fifo)
    code = (
        f"import diffsynth_c\ntry:\n    diffsynth_c.{api}({fifo!r})\nexcept diffsynth_c.FormatError as e:\n"
        "    print('FormatError:', e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        r = subprocess.run(
            [sys.executable, "-c", code],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
            cwd=root,
            env=dict(os.environ, PYTHONPATH=root),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{api} of a FIFO blocked")
    assert r.stdout.strip() == f"FormatError: {fifo}: is not a regular file", r.stderr


def test_a_dimension_over_int64_is_refused_even_beside_a_zero(tmp_path):
    """[0, 2**63] holds no element, so no size overflows; torch's sizes are int64 all the same."""
    p = raw_safetensors(
        tmp_path / "z.safetensors", '{"a":{"dtype":"F32","shape":[0,9223372036854775808],"data_offsets":[0,0]}}', b""
    )
    for api in (diffsynth_c.load_state_dict, diffsynth_c.hash_model_file, diffsynth_c.load_keys_dict):
        with pytest.raises(
            FormatError, match=r"z\.safetensors: tensor 'a': shape \[0, 9223372036854775808\] of dtype F32 overflows"
        ):
            api(p)


def test_read_mode_truncation_names_the_files_real_size(tmp_path, monkeypatch):
    p = str(tmp_path / "t.safetensors")
    save_file({"a": torch.ones(1 << 16), "b": torch.ones(1 << 16)}, p)
    monkeypatch.setenv("DIFFSYNTH_C_LOAD_MODE", "read")
    dm = diffsynth_c.DiskMap(p, "cpu")
    os.truncate(p, 1000)
    with pytest.raises(FormatError, match=r"t\.safetensors: tensor 'b': the file now holds 1000 bytes, fewer than"):
        dm["b"]
