"""Shared fixtures: model files generated on the fly, never downloaded.

The oracles (diffsynth, safetensors, torch) are required: the README's test command installs
them, and a test suite that silently skipped its comparisons would prove nothing.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

ALL_TORCH_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.uint16,
    torch.int32,
    torch.uint32,
    torch.int64,
    torch.uint64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e8m0fnu,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
]


def random_tensor(shape, dtype, seed=0):
    """Random bits of every kind (NaN and inf included for floats): the loaders must not care."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).to(torch.bool)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def raw_safetensors(path, header: bytes | str | dict, data: bytes = b"", length: int | None = None) -> str:
    """Writes a safetensors file byte by byte (for malformed inputs): 8-byte length, header, data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if length is None else length
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + header + data)
    return str(path)


def sparse_safetensors(path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16", itemsize: int = 2) -> str:
    """A well-formed safetensors file of the given tensor shapes whose data section is a hole
    (sparse, zero on read, no disk blocks): for tests that only read headers, such as hashing."""
    header, offset = {}, 0
    for key in sorted(shapes):  # as safetensors writes them: data in name order
        nbytes = math.prod(shapes[key]) * itemsize
        header[key] = {"dtype": dtype, "shape": list(shapes[key]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return str(path)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN-safe)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def assert_same_state_dict(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref), "key order differs"
    for k, r in ref.items():
        o = ours[k]
        assert same_tensor(o, r), f"tensor {k!r} differs: {o.dtype} {tuple(o.shape)} vs {r.dtype} {tuple(r.shape)}"


def run_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter with this checkout importable."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


@pytest.fixture
def model_files(tmp_path):
    """A two-shard model with DiT-like names, bf16 weights, f32 norms, an int64 buffer, a 0-d and an
    empty tensor, and a key present in both shards (the later shard's tensor wins)."""
    from safetensors.torch import save_file

    shard1 = {
        "blocks.0.attn.to_q.weight": random_tensor((64, 64), torch.bfloat16, 1),
        "blocks.0.attn.to_q.bias": random_tensor((64,), torch.bfloat16, 2),
        "blocks.0.norm.weight": random_tensor((64,), torch.float32, 3),
        "pos_ids": torch.arange(16, dtype=torch.int64),
        "scale": torch.tensor(0.5, dtype=torch.float32),
        "shared.weight": random_tensor((8, 8), torch.bfloat16, 4),
    }
    shard2 = {
        "blocks.1.attn.to_q.weight": random_tensor((64, 64), torch.bfloat16, 5),
        "blocks.1.ff.weight": random_tensor((128, 64), torch.float16, 6),
        "empty": torch.empty((0, 4), dtype=torch.bfloat16),
        "shared.weight": random_tensor((8, 8), torch.bfloat16, 7),
    }
    p1, p2 = tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"
    save_file(shard1, str(p1), metadata={"format": "pt"})
    save_file(shard2, str(p2))
    return [str(p1), str(p2)]


def pytest_sessionstart(session):
    """Under scripts/sanitize.sh the sanitized build must be the one imported."""
    if os.environ.get("DIFFSYNTH_C_EXPECT_SANITIZED") == "1":
        import diffsynth_c

        where = os.path.dirname(diffsynth_c.__file__)
        assert os.sep + os.path.join("build", "asan") + os.sep in where + os.sep, f"imported {where}, not build/asan"
