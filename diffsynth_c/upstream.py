"""What the patch and the VRAM layers share about DiffSynth's own objects, in a leaf module that
imports nothing of the package, so neither has to import the other.

``ORIGINALS`` keeps DiffSynth's objects as they were before any patch rebound their module
attributes (filled by ``patch``). ``FOREIGN_BASES`` maps our base classes (``AutoTorchModule``,
``LoRAHotLoadMixin``) to DiffSynth's while patched: our classes' isinstance checks then accept
layers made from DiffSynth's classes held from before the patch (``vram.layers`` reads it)."""

from __future__ import annotations

from typing import Any

ORIGINALS: dict[tuple[str, str], Any] = {}  # (DiffSynth module, name) -> DiffSynth's object
FOREIGN_BASES: dict[type, type] = {}  # our base class -> DiffSynth's, registered while patched
