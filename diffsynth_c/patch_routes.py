"""Routes the DiffSynth files that read weights themselves through diffsynth_c's readers.

Most of DiffSynth loads through ``diffsynth.core.loader``, which ``patch_diffsynth`` rebinds. A few
model and pipeline files call the readers directly: ``torch.load`` in
``diffsynth/models/wan_video_image_encoder.py``, ``models/fid.py`` and ``pipelines/ace_step.py``,
and ``safe_open`` in ``models/yue2_vae.py`` (imported inside ``from_pretrained``).

``install_routes()`` gives each ``torch.load`` caller a module-level ``torch`` of its own: a module
object with torch's attributes (the same objects) whose ``load`` reads checkpoints with the C
reader (``diffsynth_c.core.torchfile``) when the call is one it represents exactly: a path, the
weights-only unpickler (asked for, or torch's default), a CPU ``map_location`` (or none, for a
checkpoint saved from the CPU) and no other option. Anything else, and any file the C reader does not take or refuses, goes to the original
``torch.load`` with the same arguments, so its results and errors stay torch's.
``yue2_vae`` imports ``safe_open`` from ``safetensors`` when it runs, so the name there can only be
reached through the ``safetensors`` module: while routed, ``safetensors.safe_open`` is a function
that sends calls made from ``yue2_vae`` (framework ``pt``) to ``diffsynth_c.safe_open`` and every
other call, from any other module, to safetensors' own ``safe_open``. Modules imported after
``install_routes()`` are routed when they are imported. ``remove_routes()`` puts every original
back.
"""

from __future__ import annotations

import importlib.abc
import os
import pickletools
import re
import sys
import types
import warnings
import zipfile
from typing import Any

TORCH_LOAD_MODULES = (
    "diffsynth.models.wan_video_image_encoder",
    "diffsynth.models.fid",
    "diffsynth.pipelines.ace_step",
)
SAFE_OPEN_CALLERS = ("diffsynth.models.yue2_vae",)

_state: dict[str, Any] = {"active": False, "safe_open": None, "finder": None}
_routed: dict[str, Any] = {}  # module name -> the torch object its `torch` global held before


def _torch_default_weights_only(pickle_module: Any) -> bool:
    import torch.serialization as ser

    default = getattr(ser, "_default_to_weights_only", None)
    try:
        return bool(default(pickle_module)) if default is not None else False
    except Exception:  # noqa: BLE001  an unknown torch: leave the call to torch
        return False


def _is_cpu(map_location: Any) -> bool:
    import torch

    if isinstance(map_location, (str, torch.device)):
        try:
            return torch.device(map_location).type == "cpu"
        except (RuntimeError, ValueError):
            return False
    return False


_DEVICE_TAG = re.compile(r"[a-z_]+(:\d+)?")


def _saved_on_cpu(path: Any) -> bool:
    """Whether every storage of a torch.save zip was saved from the CPU: no string of its data.pkl
    is a location tag other than 'cpu' (a key that looks like one sends the file to torch, which
    is only slower). False for anything else, so torch.load decides."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                return False
            data = z.read(pkl)
        for op, arg, _pos in pickletools.genops(data):
            if isinstance(arg, str) and arg != "cpu" and _DEVICE_TAG.fullmatch(arg) and arg.split(":")[0] in _DEVICES:
                return False
        return True
    except Exception:  # noqa: BLE001  not a zip checkpoint we can read: torch.load decides
        return False


_DEVICES = {
    "cuda",
    "mps",
    "xpu",
    "hpu",
    "npu",
    "mtia",
    "meta",
    "privateuseone",
    "xla",
    "ipu",
    "lazy",
    "maia",
    "hip",
    "ve",
}


def routed_torch_load(original: Any) -> Any:
    """A torch.load with original's signature that reads through the C reader where it can."""

    def load(
        f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: Any = None, **kw: Any
    ) -> Any:
        plain = (
            isinstance(f, (str, os.PathLike))
            and pickle_module is None
            and not kw
            and (weights_only is True or (weights_only is None and _torch_default_weights_only(pickle_module)))
            and os.path.isfile(f)
            and (_is_cpu(map_location) or (map_location is None and _saved_on_cpu(f)))
        )
        if plain:
            from . import _core
            from .core.settings import mode, threads
            from .core.torchfile import load_tree

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # a file we do not take goes to torch below
                    value = load_tree(f, threads(), mode())
            except (_core.FormatError, OSError):
                value = None  # torch reads it, or raises its own error for it
            if value is not None:
                return value
        return original(f, map_location, pickle_module, weights_only=weights_only, **kw)

    load.__wrapped__ = original  # type: ignore[attr-defined]
    load.__doc__ = "torch.load, through diffsynth_c's checkpoint reader where it represents the call (patch_routes)."
    return load


def _torch_for_module(torch_module: Any) -> types.ModuleType:
    """A module object that is torch for every attribute but ``load``."""
    proxy = types.ModuleType(torch_module.__name__, torch_module.__doc__)
    proxy.__dict__.update({k: v for k, v in vars(torch_module).items() if k not in ("__name__", "__doc__")})
    proxy.load = routed_torch_load(torch_module.load)
    # attributes torch adds later (lazily imported submodules) come from torch itself
    proxy.__getattr__ = lambda name: getattr(torch_module, name)  # type: ignore[method-assign]
    proxy.__diffsynth_c_route__ = True
    return proxy


def _route_module(module: types.ModuleType) -> None:
    name = module.__name__
    if name in _routed or name not in TORCH_LOAD_MODULES:
        return
    current = vars(module).get("torch")
    if current is None or getattr(current, "__diffsynth_c_route__", False):
        return
    _routed[name] = current
    module.torch = _torch_for_module(current)


def _safe_open_router(original: Any) -> Any:
    def safe_open(filename: Any, framework: Any = "pt", device: Any = "cpu", **kw: Any) -> Any:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if _state["active"] and caller in SAFE_OPEN_CALLERS and framework in ("pt", "torch"):
            from .loader.safetensors_file import safe_open as ours

            return ours(filename, framework, device, **kw)
        return original(filename, framework, device, **kw)

    safe_open.__wrapped__ = original  # type: ignore[attr-defined]
    safe_open.__doc__ = original.__doc__
    return safe_open


class _RouteOnImport(importlib.abc.MetaPathFinder):
    """Routes the listed modules that are imported after install_routes(), once they have run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in TORCH_LOAD_MODULES or not _state["active"]:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _RoutingLoader(spec.loader)
                return spec
        return None


class _RoutingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        if _state["active"]:
            _route_module(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def install_routes() -> int:
    """Routes the listed DiffSynth modules (loaded now or later) and ``yue2_vae``'s ``safe_open``
    through diffsynth_c. Returns how many modules were routed now (0 when already installed)."""
    if _state["active"]:
        return 0
    _state["active"] = True
    for name in TORCH_LOAD_MODULES:
        module = sys.modules.get(name)
        if module is not None:
            _route_module(module)
    finder = _RouteOnImport()
    sys.meta_path.insert(0, finder)
    _state["finder"] = finder
    try:
        import safetensors
    except ImportError:
        pass
    else:
        _state["safe_open"] = safetensors.safe_open
        safetensors.safe_open = _safe_open_router(safetensors.safe_open)
    return len(_routed)


def remove_routes() -> int:
    """Puts back every original install_routes() replaced. Returns how many modules it restored."""
    if not _state["active"]:
        return 0
    _state["active"] = False
    n = 0
    for name, original in list(_routed.items()):
        module = sys.modules.get(name)
        if module is not None and getattr(vars(module).get("torch"), "__diffsynth_c_route__", False):
            module.torch = original
            n += 1
    _routed.clear()
    finder = _state["finder"]
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)
    _state["finder"] = None
    original = _state["safe_open"]
    if original is not None:
        import safetensors

        if getattr(safetensors.safe_open, "__wrapped__", None) is original:
            safetensors.safe_open = original
        _state["safe_open"] = None
    return n
