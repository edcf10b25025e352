"""GPU tests: collected everywhere, run only where torch sees a CUDA device and diffsynth_c's CUDA
library opens (diffsynth_c.cuda_available()). Files are written here with a few lines of Python so
that these tests need nothing beyond torch (the GPU machines have no network)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import diffsynth_c
from diffsynth_c.dlpack import safetensors_name_of

HAVE_GPU = torch.cuda.is_available() and diffsynth_c.cuda_available()


def pytest_collection_modifyitems(config, items):
    if HAVE_GPU:
        return
    from diffsynth_c.kernels import cuda_status

    skip = pytest.mark.skip(reason=f"needs a CUDA device: {cuda_status()}")
    for item in items:
        if "tests/gpu/" in item.nodeid.replace("\\", "/"):
            item.add_marker(skip)


def write_safetensors(path, tensors: dict[str, torch.Tensor]) -> str:
    """A safetensors file with the tensors' bytes in the dict's order (an odd-sized U8 tensor puts
    the next one at an unaligned offset)."""
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": safetensors_name_of(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [off, off + len(data)],
        }
        blobs.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    return str(path)
