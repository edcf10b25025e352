"""Mirrors ``diffsynth.core.vram``: model construction without initialisation and lazy file maps."""

from .disk_map import DiskMap
from .initialization import skip_model_initialization

__all__ = ["DiskMap", "skip_model_initialization"]
