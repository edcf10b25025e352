"""Mirrors ``diffsynth.core.vram``: model construction without initialisation, lazy file maps, and
the VRAM-managed layers (imported on first use: they need torch, the rest of the package does not).
Every public name of DiffSynth's package is here."""

from typing import Any, Union  # noqa: F401  DiffSynth's package exports Union (from its layers)

from .disk_map import DiskMap
from .initialization import skip_model_initialization

LAYER_NAMES = (
    "AutoTorchModule",
    "AutoWrappedLinear",
    "AutoWrappedModule",
    "AutoWrappedNonRecurseModule",
    "AutoWrappedQuantizedModule",
    "LoRAHotLoadMixin",
    "enable_vram_management",
    "enable_vram_management_recursively",
    "fill_vram_config",
    "parse_device_type",
    "get_device_name",
    "IS_NPU_AVAILABLE",
)

__all__ = ["DiskMap", "skip_model_initialization", *LAYER_NAMES]


def __getattr__(name: str) -> Any:
    if name in LAYER_NAMES:
        from . import layers

        return getattr(layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
