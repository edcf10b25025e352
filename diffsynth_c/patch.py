"""The drop-in: make an installed DiffSynth load through diffsynth_c.

``patch_diffsynth()`` rebinds DiffSynth's loading functions and classes to diffsynth_c's, in
DiffSynth's own modules and in every ``diffsynth.*`` module that imported them by name (such as
``diffsynth.models.model_loader``, which holds ``load_model`` and ``hash_model_file``), so an
unchanged pipeline script gets the faster loads. ``unpatch_diffsynth()`` puts every binding back,
also in the ``diffsynth`` modules first imported while patched.
``import diffsynth_c.auto`` patches on import. ``DIFFSYNTH_C_PATCH=1`` in the environment patches
an unchanged script as soon as it imports DiffSynth (``_startup.py``, started by the installed
``diffsynth_c-patch.pth`` or by ``import diffsynth_c``).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator

# (DiffSynth module, name) -> (our module, name)
_TABLE = {
    ("diffsynth.core.loader.file", "load_state_dict"): ("diffsynth_c.loader.file", "load_state_dict"),
    ("diffsynth.core.loader.file", "load_state_dict_from_safetensors"): ("diffsynth_c.loader.file", "load_state_dict_from_safetensors"),
    ("diffsynth.core.loader.file", "load_state_dict_from_bin"): ("diffsynth_c.loader.file", "load_state_dict_from_bin"),
    ("diffsynth.core.loader.file", "load_metadata_from_safetensors"): ("diffsynth_c.loader.file", "load_metadata_from_safetensors"),
    ("diffsynth.core.loader.file", "hash_model_file"): ("diffsynth_c.loader.file", "hash_model_file"),
    ("diffsynth.core.loader.file", "hash_state_dict_keys"): ("diffsynth_c.loader.file", "hash_state_dict_keys"),
    ("diffsynth.core.loader.file", "load_keys_dict"): ("diffsynth_c.loader.file", "load_keys_dict"),
    ("diffsynth.core.loader.model", "load_model"): ("diffsynth_c.loader.model", "load_model"),
    ("diffsynth.core.loader.config", "ModelConfig"): ("diffsynth_c.loader.config", "ModelConfig"),
    ("diffsynth.core.vram.disk_map", "DiskMap"): ("diffsynth_c.vram.disk_map", "DiskMap"),
    ("diffsynth.core.vram.initialization", "skip_model_initialization"): ("diffsynth_c.vram.initialization", "skip_model_initialization"),
    **{
        ("diffsynth.core.vram.layers", name): ("diffsynth_c.vram.layers", name)
        for name in (
            "AutoTorchModule",
            "LoRAHotLoadMixin",
            "AutoWrappedModule",
            "AutoWrappedNonRecurseModule",
            "AutoWrappedLinear",
            "enable_vram_management",
        )
    },
}
# DiffSynth's classes that our isinstance checks also accept while patched (its quantised layers
# derive from them and stay DiffSynth's)
_BASES = ("AutoTorchModule", "LoRAHotLoadMixin")

_saved: list[tuple[Any, str, Any]] = []  # (module, attribute, DiffSynth's object) of every rebinding
_ORIGINALS: dict[tuple[str, str], Any] = {}


def _pairs() -> list[tuple[Any, Any]]:
    """(DiffSynth's object, ours) for every entry of the table; imports DiffSynth."""
    import importlib

    pairs = []
    for (ds_mod, ds_name), (our_mod, our_name) in _TABLE.items():
        theirs = _ORIGINALS.get((ds_mod, ds_name))
        if theirs is None:
            theirs = getattr(importlib.import_module(ds_mod), ds_name)
            _ORIGINALS[(ds_mod, ds_name)] = theirs
        pairs.append((theirs, getattr(importlib.import_module(our_mod), our_name)))
    return pairs


def original(ds_module: str, name: str) -> Any:
    """DiffSynth's own object, patched or not."""
    _pairs()
    return _ORIGINALS[(ds_module, name)]


def is_patched() -> bool:
    """Whether patch_diffsynth's bindings are in place."""
    return bool(_saved)


def patch_diffsynth() -> int:
    """Rebinds DiffSynth's loaders to diffsynth_c's in every loaded ``diffsynth`` module. Returns how
    many bindings changed (0 when already patched)."""
    if _saved:
        return 0
    from .vram import layers

    for base in _BASES:
        layers._FOREIGN[getattr(layers, base)] = original("diffsynth.core.vram.layers", base)
    _saved.extend(_rebind({id(theirs): (theirs, ours) for theirs, ours in _pairs()}))
    from .patch_routes import install_routes  # the files that call torch.load / safe_open themselves

    install_routes()
    return len(_saved)


def unpatch_diffsynth() -> int:
    """Puts back every binding patch_diffsynth changed, and DiffSynth's objects in the ``diffsynth``
    modules imported while patched (they took ours from the patched modules by name). Returns how
    many bindings changed."""
    if not _saved:
        return 0
    n = len(_saved)
    from .patch_routes import remove_routes

    remove_routes()
    from .vram import layers

    layers._FOREIGN.clear()
    while _saved:
        module, attr, value = _saved.pop()
        setattr(module, attr, value)
    return n + len(_rebind({id(ours): (ours, theirs) for theirs, ours in _pairs()}))


def _rebind(by_id: dict[int, tuple[Any, Any]]) -> list[tuple[Any, str, Any]]:
    """In every loaded ``diffsynth`` module, replaces each attribute that is one of the objects
    (by identity: by_id maps id(old) -> (old, new)) with its new object. Returns (module,
    attribute, old) of each replacement."""
    changed = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "diffsynth" or name.startswith("diffsynth.")):
            continue
        for attr, value in list(vars(module).items()):
            hit = by_id.get(id(value))
            if hit is not None and hit[0] is value:
                changed.append((module, attr, value))
                setattr(module, attr, hit[1])
    return changed


@contextmanager
def patched_module(module: Any) -> Iterator[None]:
    """While the block runs, DiffSynth's ``module`` sees diffsynth_c's DiskMap, load_state_dict and
    skip_model_initialization (for the quantised branches of load_model handed to DiffSynth's own
    code, which keep DiffSynth's layers)."""
    by_id = {id(theirs): ours for theirs, ours in _pairs()}
    changed = []
    for attr, value in list(vars(module).items()):
        ours = by_id.get(id(value))
        if ours is not None and attr not in ("load_model", "enable_vram_management"):
            changed.append((attr, value))
            setattr(module, attr, ours)
    try:
        yield
    finally:
        for attr, value in changed:
            setattr(module, attr, value)
