"""Mirrors ``diffsynth.core.vram``: model construction without initialisation, lazy file maps, and
the VRAM-managed layers (imported on first use: they need torch, the rest of the package does not)."""

from typing import Any

from .disk_map import DiskMap
from .initialization import skip_model_initialization

LAYER_NAMES = (
    "AutoTorchModule",
    "AutoWrappedLinear",
    "AutoWrappedModule",
    "AutoWrappedNonRecurseModule",
    "LoRAHotLoadMixin",
    "enable_vram_management",
)

__all__ = ["DiskMap", "skip_model_initialization", *LAYER_NAMES]


def __getattr__(name: str) -> Any:
    if name in LAYER_NAMES:
        from . import layers

        return getattr(layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
