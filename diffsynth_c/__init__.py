"""diffsynth_c: DiffSynth-Studio's model loading with a C core.

The names and signatures of ``diffsynth.core`` (``load_state_dict``, ``hash_model_file``,
``hash_state_dict_keys``, ...), the same results, and the bytes moved by C: headers validated
before any tensor byte is read, pages read in on worker threads with the GIL released, dtype
conversion in C, tensors handed to torch and numpy through DLPack without a copy.
"""

from ._core import FormatError, __version__
from .kernels import cuda_available
from .loader import hash_model_file, hash_state_dict_keys, load_keys_dict, load_state_dict
from .loader.config import DownloadError, ModelConfig
from .loader.folder import save_state_dict
from .loader.model import detect_model, load_model, load_model_auto
from .patch import patch_diffsynth, unpatch_diffsynth
from .vram import DiskMap, skip_model_initialization

__all__ = [
    "FormatError",
    "__version__",
    "load_state_dict",
    "hash_model_file",
    "hash_state_dict_keys",
    "load_keys_dict",
    "cuda_available",
    "load_model",
    "save_state_dict",
    "ModelConfig",
    "DownloadError",
    "detect_model",
    "load_model_auto",
    "DiskMap",
    "skip_model_initialization",
    "patch_diffsynth",
    "unpatch_diffsynth",
]

if __import__("os").environ.get("DIFFSYNTH_C_PATCH") == "1":
    patch_diffsynth()
