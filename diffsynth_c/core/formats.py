"""Which format a weight file is in, told by its name as DiffSynth tells it (the loaders, the
DiskMap and the CLI all ask)."""

from __future__ import annotations

import os
from typing import Any


def is_safetensors(path: Any) -> bool:
    """Whether path (str, bytes or os.PathLike) names a safetensors file: its name ends in
    ``.safetensors``, the test DiffSynth's loader makes."""
    return os.fspath(path).endswith(".safetensors") if not isinstance(path, bytes) else path.endswith(b".safetensors")
