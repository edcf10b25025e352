"""Mirrors ``diffsynth.core.loader``: every public name of DiffSynth's package is here."""

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
