"""The VRAM configurations DiffSynth's guide documents (none, fp8 storage, disk offload, bf16
storage with fp32 computation) and ``quantize=`` through the CPU test backend, alone and with CPU
offload: the cases the end-to-end pipeline scripts run in each fresh interpreter."""

from __future__ import annotations

import torch
from diffsynth.core.quant import QuantizeConfig

from tests import quant_cpu_backend as qb

BF16, F8, F32 = torch.bfloat16, torch.float8_e4m3fn, torch.float32


def vram(offload: tuple, onload: tuple, preparing: tuple, computation: tuple) -> dict:
    """ModelConfig keyword arguments for the four states, each a (dtype, device) pair."""
    out = {}
    for state, (dtype, device) in zip(
        ("offload", "onload", "preparing", "computation"), (offload, onload, preparing, computation)
    ):
        out[state + "_dtype"], out[state + "_device"] = dtype, device
    return out


def configs(exclude: list[str]) -> dict[str, dict]:
    """{case name: ModelConfig keyword arguments}; ``exclude`` names the modules quantize= leaves alone."""
    quant = QuantizeConfig(method=qb.METHOD, exclude_modules=exclude)
    return {
        "none": {},
        "fp8_storage": vram((F8, "cpu"), (F8, "cpu"), (F8, "cpu"), (BF16, "cpu")),
        "disk": vram(("disk", "disk"), ("disk", "disk"), (BF16, "cpu"), (BF16, "cpu")),
        "bf16_storage_fp32_compute": vram((BF16, "cpu"), (BF16, "cpu"), (BF16, "cpu"), (F32, "cpu")),
        "quantize": {"quantize": quant},
        "quantize_cpu_offload": {"quantize": quant, **vram((BF16, "cpu"), (BF16, "cpu"), (BF16, "cpu"), (BF16, "cpu"))},
    }
