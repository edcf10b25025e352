"""The drop-in: make an installed DiffSynth load through diffsynth_c.

``patch_diffsynth()`` rebinds DiffSynth's loading functions and classes to diffsynth_c's, in
DiffSynth's own modules and in every ``diffsynth.*`` module that imported them by name (such as
``diffsynth.models.model_loader``, which holds ``load_model`` and ``hash_model_file``), so an
unchanged pipeline script gets the faster loads. ``unpatch_diffsynth()`` puts every binding back,
also in the ``diffsynth`` modules first imported while patched. The ``ModelConfig(...)`` objects
that DiffSynth's pipeline signatures build as defaults when their module is imported are converted
to diffsynth_c's (and back on unpatch), so the order of the patch and the pipeline imports does not
matter.
``import diffsynth_c.auto`` patches on import. ``DIFFSYNTH_C_PATCH=1`` in the environment patches
an unchanged script as soon as it imports DiffSynth (``_startup.py``, started by the installed
``diffsynth_c-patch.pth`` or by ``import diffsynth_c``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from .upstream import FOREIGN_BASES, ORIGINALS

# (DiffSynth module, name) -> (our module, name): every DiffSynth entry point that reads weights,
# builds a model for loading or wraps layers for VRAM management. One table: a route added later is
# one more group here.
_TABLE = {
    **{
        ("diffsynth.core.loader.file", name): ("diffsynth_c.loader.file", name)
        for name in (
            "load_state_dict",
            "load_state_dict_from_safetensors",
            "load_state_dict_from_bin",
            "load_metadata_from_safetensors",
            "merge_metadata_value",
            "hash_model_file",
            "hash_state_dict_keys",
            "load_keys_dict",
            "load_keys_dict_from_safetensors",
            "load_keys_dict_from_bin",
            "convert_state_dict_keys_to_single_str",
            "convert_keys_dict_to_single_str",
            "convert_state_dict_to_keys_dict",
        )
    },
    **{
        ("diffsynth.core.loader.model", name): ("diffsynth_c.loader.model", name)
        for name in ("load_model", "load_model_with_disk_offload", "get_init_context")
    },
    ("diffsynth.core.loader.config", "ModelConfig"): ("diffsynth_c.loader.config", "ModelConfig"),
    **{
        ("diffsynth.core.vram.disk_map", name): ("diffsynth_c.vram.disk_map", name)
        for name in ("DiskMap", "SafetensorsCompatibleBinaryLoader", "SafetensorsCompatibleTensor")
    },
    ("diffsynth.core.vram.initialization", "skip_model_initialization"): (
        "diffsynth_c.vram.initialization",
        "skip_model_initialization",
    ),
    **{
        ("diffsynth.core.vram.layers", name): ("diffsynth_c.vram.layers", name)
        for name in (
            "AutoTorchModule",
            "LoRAHotLoadMixin",
            "AutoWrappedModule",
            "AutoWrappedNonRecurseModule",
            "AutoWrappedLinear",
            "AutoWrappedQuantizedModule",
            "enable_vram_management",
            "enable_vram_management_recursively",
            "fill_vram_config",
            "_materialize_root_params_from_disk",
        )
    },
}
# Classes whose instances are made when a DiffSynth module is imported (ModelConfig defaults in
# the signatures of its pipelines' from_pretrained): patching converts those default objects.
_DEFAULT_CLASSES = (("diffsynth.core.loader.config", "ModelConfig"),)
# DiffSynth's classes that our isinstance checks also accept while patched (its quantised layers
# derive from them and stay DiffSynth's)
_BASES = ("AutoTorchModule", "LoRAHotLoadMixin")

_saved: list[tuple[Any, str, Any]] = []  # (module, attribute, DiffSynth's object) of every rebinding
_saved_defaults: list[tuple[Any, str, Any]] = []  # (function, __defaults__/__kwdefaults__, DiffSynth's)


def _pairs() -> list[tuple[Any, Any]]:
    """(DiffSynth's object, ours) for every entry of the table; imports DiffSynth."""
    import importlib

    pairs = []
    for (ds_mod, ds_name), (our_mod, our_name) in _TABLE.items():
        theirs = ORIGINALS.get((ds_mod, ds_name))
        if theirs is None:
            theirs = getattr(importlib.import_module(ds_mod), ds_name)
            ORIGINALS[(ds_mod, ds_name)] = theirs
        pairs.append((theirs, getattr(importlib.import_module(our_mod), our_name)))
    return pairs


def original(ds_module: str, name: str) -> Any:
    """DiffSynth's own object, patched or not."""
    _pairs()
    return ORIGINALS[(ds_module, name)]


def is_patched() -> bool:
    """Whether patch_diffsynth's bindings are in place."""
    return bool(_saved)


def patch_diffsynth() -> int:
    """Rebinds DiffSynth's loaders to diffsynth_c's in every loaded ``diffsynth`` module. Returns how
    many bindings changed (0 when already patched)."""
    if _saved:
        return 0
    import importlib

    for base in _BASES:
        ours = getattr(importlib.import_module(_TABLE[("diffsynth.core.vram.layers", base)][0]), base)
        FOREIGN_BASES[ours] = original("diffsynth.core.vram.layers", base)
    _saved.extend(_rebind({id(theirs): (theirs, ours) for theirs, ours in _pairs()}))
    _saved_defaults.extend(_convert_defaults(_default_classes()))
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
    FOREIGN_BASES.clear()
    while _saved:
        module, attr, value = _saved.pop()
        setattr(module, attr, value)
    while _saved_defaults:
        function, attr, value = _saved_defaults.pop()
        setattr(function, attr, value)
    _convert_defaults({ours: theirs for theirs, ours in _default_classes().items()})
    return n + len(_rebind({id(ours): (ours, theirs) for theirs, ours in _pairs()}))


def load_model_auto(
    path: Any, vram_config: Any = None, vram_limit: Any = None, state_dict: Any = None, quantize: Any = None
) -> list:
    """What DiffSynth's ModelPool.auto_load_model does for one file set, through diffsynth_c: every
    model whose hash matches, built and loaded. Raises ValueError naming the file and hash when no
    entry matches, as DiffSynth does."""
    from diffsynth.models.model_loader import ModelPool

    pool = ModelPool()
    was_patched = is_patched()
    if not was_patched:
        patch_diffsynth()
    try:
        pool.auto_load_model(
            path, vram_config=vram_config, vram_limit=vram_limit, state_dict=state_dict, quantize=quantize
        )
    finally:
        if not was_patched:
            unpatch_diffsynth()
    return pool.model


def _default_classes() -> dict[type, type]:
    """{DiffSynth's class: ours} of the classes whose default objects the patch converts."""
    import importlib

    table = {}
    for ds_mod, ds_name in _DEFAULT_CLASSES:
        our_mod, our_name = _TABLE[(ds_mod, ds_name)]
        table[original(ds_mod, ds_name)] = getattr(importlib.import_module(our_mod), our_name)
    return table


def _functions(module: Any) -> Iterator[Any]:
    """The Python functions defined in module, at its top level and in its classes."""
    import types

    seen = set()
    for value in list(vars(module).values()):
        inner = (
            list(vars(value).values()) if isinstance(value, type) and value.__module__ == module.__name__ else [value]
        )
        for f in inner:
            f = getattr(f, "__func__", f)  # staticmethod, classmethod
            if isinstance(f, types.FunctionType) and f.__module__ == module.__name__ and id(f) not in seen:
                seen.add(id(f))
                yield f


def _converted(value: Any, classes: dict[type, type]) -> Any:
    """An instance of the class classes maps value's class to, with value's dataclass fields."""
    import dataclasses

    target = classes[type(value)]
    names = {f.name for f in dataclasses.fields(target) if f.init}
    return target(**{f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.name in names})


def _convert_defaults(classes: dict[type, type]) -> list[tuple[Any, str, Any]]:
    """In every loaded ``diffsynth`` module, replaces each default argument value of its functions
    that is an instance of a key of classes (say DiffSynth's ModelConfig, built when the pipeline
    module was imported) by the same fields in the mapped class. Returns (function, attribute,
    old value) of each change."""
    changed = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "diffsynth" or name.startswith("diffsynth.")):
            continue
        for f in _functions(module):
            if f.__defaults__ and any(type(v) in classes for v in f.__defaults__):
                changed.append((f, "__defaults__", f.__defaults__))
                f.__defaults__ = tuple(_converted(v, classes) if type(v) in classes else v for v in f.__defaults__)
            if f.__kwdefaults__ and any(type(v) in classes for v in f.__kwdefaults__.values()):
                changed.append((f, "__kwdefaults__", f.__kwdefaults__))
                f.__kwdefaults__ = {
                    k: _converted(v, classes) if type(v) in classes else v for k, v in f.__kwdefaults__.items()
                }
    return changed


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
