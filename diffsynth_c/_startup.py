"""Patching with no line of code: ``DIFFSYNTH_C_PATCH=1 python my_pipeline.py``.

An installed diffsynth_c puts ``diffsynth_c-patch.pth`` into site-packages. At interpreter start
it imports this module only when ``DIFFSYNTH_C_PATCH=1`` is set (it costs nothing otherwise), and
this module imports neither DiffSynth nor torch: it waits on ``sys.meta_path`` for the script's
own ``import diffsynth...`` and patches as soon as the ``diffsynth`` package has been executed,
before the script's import statement returns. Modules the script imports afterwards take our
objects from the patched ``diffsynth.core`` modules.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``diffsynth`` with the other finders, then makes its loader run the patch right after
    the package's code. Removes itself on first use."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "diffsynth":
            return None
        _remove()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None  # not installed: the import fails as it would without us
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_patch(module: Any) -> None:
            exec_module(module)
            from .patch import patch_diffsynth

            patch_diffsynth()

        # on the loader instance, made for this one module: it stays DiffSynth's loader for
        # everything else (resources, reloads)
        loader.exec_module = exec_then_patch
        return spec


_FINDER = _PatchAfterImport()


def _remove() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Patches now if DiffSynth is already imported, else when it is."""
    if "diffsynth" in sys.modules:
        from .patch import patch_diffsynth

        patch_diffsynth()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


install()
