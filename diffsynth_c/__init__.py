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
from .loader.model import detect_model, load_model
from .loader.safetensors_file import safe_open
from .patch import load_model_auto, patch_diffsynth, unpatch_diffsynth
from .vram import LAYER_NAMES as _LAYER_NAMES
from .vram import DiskMap, skip_model_initialization

__all__ = [
    "AutoWrappedLinear",
    "AutoWrappedModule",
    "AutoWrappedNonRecurseModule",
    "DiskMap",
    "DownloadError",
    "FormatError",
    "ModelConfig",
    "__version__",
    "cuda_available",
    "detect_model",
    "enable_vram_management",
    "hash_model_file",
    "hash_state_dict_keys",
    "load_keys_dict",
    "load_model",
    "load_model_auto",
    "load_state_dict",
    "patch_diffsynth",
    "safe_open",
    "save_state_dict",
    "skip_model_initialization",
    "unpatch_diffsynth",
]


def __getattr__(name: str):  # the VRAM-managed layers import torch: only when asked for
    if name in _LAYER_NAMES:
        from .vram import layers

        return getattr(layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _catchable_as_safetensors_errors() -> None:
    """FormatError also derives from safetensors' SafetensorError where safetensors is installed:
    code written for DiffSynth (which raises safetensors' errors for a malformed or truncated file)
    catches ours too; ``except FormatError`` and ``except ValueError`` keep working."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return
    if not issubclass(FormatError, SafetensorError):
        FormatError.__bases__ = (*FormatError.__bases__, SafetensorError)


_catchable_as_safetensors_errors()

from .loader import guard as _guard

_guard.install()

if __import__("os").environ.get("DIFFSYNTH_C_PATCH") == "1":
    from . import _startup  # noqa: F401  patches now if DiffSynth is imported, else as soon as it is
