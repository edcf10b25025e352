"""Mirrors ``diffsynth.core.loader``."""

from .file import hash_model_file, hash_state_dict_keys, load_keys_dict, load_state_dict

__all__ = ["load_state_dict", "hash_model_file", "hash_state_dict_keys", "load_keys_dict"]
