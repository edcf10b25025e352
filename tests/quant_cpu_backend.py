"""A quantisation backend that runs on the CPU, registered with DiffSynth's own
``register_quant_backend`` / ``register_quant_method``: the tests drive DiffSynth's quantised paths
and ours through the same backend, and compare.

Per-row symmetric int8 weights. The float32 scales are stored as their int32 bits, so that
``.to(dtype)`` never re-types them (the backend contract of ``diffsynth.core.quant.base``). It is
serialisable: a pre-quantised checkpoint carries the backend's mark in its metadata, and
``unflatten_state_dict`` refuses a checkpoint without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffsynth.core.quant import BackendConfig, QuantBackend, register_quant_backend, register_quant_method

BACKEND = "diffsynth_c_test_int8"
METHOD = "diffsynth_c_test_int8_w8"
MARK = "diffsynth_c_test_int8"


@dataclass
class Int8Config(BackendConfig):
    pass


class Int8Linear(torch.nn.Linear):
    """int8 weight ``qweight`` (out, in), per-row scale bits ``scale_bits``, bias in the model dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale_bits", torch.empty(out_features, dtype=torch.int32, device=device))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale_bits.view(torch.float32)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.dequantized().to(x.dtype), bias)


@register_quant_backend(BACKEND)
class Int8Backend(QuantBackend):
    def capabilities(self) -> dict:
        return {
            "is_serializable": True,
            "is_differentiable": True,
            "is_compileable": False,
            "requires_calibration": False,
        }

    def quantized_linear_classes(self) -> tuple:
        return (Int8Linear,)

    def create_quantized_linear(self, linear, compute_device=None, model_device=None):
        target = model_device or compute_device or linear.weight.device
        w = linear.weight.detach().to(device=compute_device or linear.weight.device, dtype=torch.float32)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        out = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        out.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).to(target)
        out.scale_bits = scale.view(torch.int32).to(target)
        if linear.bias is not None:
            out.bias = torch.nn.Parameter(linear.bias.detach().to(target), requires_grad=False)
        return out

    def create_quantized_linear_shell(self, linear, compute_dtype):
        return Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")

    def dequantize_to_linear(self, module, compute_dtype, compute_device=None, model_device=None):
        device = model_device or compute_device or module.qweight.device
        linear = torch.nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, dtype=compute_dtype, device=device
        )
        with torch.no_grad():
            linear.weight.copy_(module.dequantized())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        return linear

    def flatten_state_dict(self, state_dict):
        return state_dict, {MARK: "per-row"}

    def unflatten_state_dict(self, state_dict, metadata):
        if metadata.get(MARK) != "per-row":
            raise ValueError(f"not a checkpoint of {BACKEND}: metadata {metadata!r}")
        return state_dict


register_quant_method(METHOD, BACKEND, lambda kwargs: Int8Config.from_kwargs(kwargs), label="int8 per row (tests)")
