"""Mirrors ``diffsynth.core.loader``: every public name of DiffSynth's package is here."""

# settings, conversion and torchfile moved to diffsynth_c.core; importing their old paths here keeps
# ``diffsynth_c.loader.settings`` (and the others) reachable as attributes, as before the move.
from . import conversion, settings, torchfile  # noqa: F401
from .config import ModelConfig
from .file import hash_model_file, hash_state_dict_keys, load_keys_dict, load_state_dict
from .model import load_model, load_model_with_disk_offload

__all__ = [
    "ModelConfig",
    "hash_model_file",
    "hash_state_dict_keys",
    "load_keys_dict",
    "load_model",
    "load_model_with_disk_offload",
    "load_state_dict",
]
