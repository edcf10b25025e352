"""Mirrors ``diffsynth.core.vram``: model construction without initialisation, lazy file maps, and
the VRAM-managed layers (imported on first use: they need torch, the rest of the package does not).
Every public name of DiffSynth's package is here."""

from typing import Any, Union  # noqa: F401  DiffSynth's package exports Union (from its layers)

from .disk_map import DiskMap
from .initialization import skip_model_initialization

# A literal list, so linters and type checkers (which do not run code) see every exported name.
__all__ = [
    "IS_NPU_AVAILABLE",
    "AutoTorchModule",
    "AutoWrappedLinear",
    "AutoWrappedModule",
    "AutoWrappedNonRecurseModule",
    "AutoWrappedQuantizedModule",
    "DiskMap",
    "LoRAHotLoadMixin",
    "enable_vram_management",
    "enable_vram_management_recursively",
    "fill_vram_config",
    "get_device_name",
    "parse_device_type",
    "skip_model_initialization",
]
# the VRAM-managed layers' names, resolved by __getattr__ on first use
LAYER_NAMES = tuple(n for n in __all__ if n not in ("DiskMap", "skip_model_initialization"))


def __getattr__(name: str) -> Any:
    if name in LAYER_NAMES:
        from . import layers

        return getattr(layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
