"""The one definition of DiffSynth's VRAM states: a managed layer's weights move between four states
(offload, onload, preparing, computation), each with a dtype and a device. These are the eight
parameters of ``AutoTorchModule``, the wrapped layers, ``ModelConfig`` and a ``vram_config`` dict.

The signatures themselves stay spelled out, because DiffSynth's are (``inspect.signature`` of ours
equals DiffSynth's, and keyword and positional callers both work); everything that reads, passes
or checks the parameters goes through the names below, and ``tests/test_vram_layers.py`` checks
that every signature lists exactly them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STATES = ("offload", "onload", "preparing", "computation")

# AutoTorchModule's (and the wrapped layers') parameter order: dtype, then device, state by state
VRAM_CONFIG_KEYS = tuple(f"{state}_{what}" for state in STATES for what in ("dtype", "device"))

# ModelConfig's field order (and the order of its vram_config() dict): device, then dtype
MODEL_CONFIG_KEYS = tuple(f"{state}_{what}" for state in STATES for what in ("device", "dtype"))


def vram_args(values: Mapping[str, Any]) -> dict[str, Any]:
    """The eight VRAM parameters picked out of values (a function's locals(), a config dict), in
    AutoTorchModule's order; missing ones are None."""
    return {k: values.get(k) for k in VRAM_CONFIG_KEYS}
