"""``skip_model_initialization``: build a model without spending time or memory on weights that a
load will replace."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def skip_model_initialization(device: Any = "meta") -> Iterator[None]:
    """Inside the block, every parameter a module registers is moved to ``device`` (the meta device
    by default: no memory, no random initialisation) keeping its class, ``requires_grad`` and
    attributes, as DiffSynth's context manager does (``device=None``: ``tensor.to(None)``, the
    parameters stay where they were made, on the CPU). ``torch.nn.Module.register_parameter`` is
    restored on exit, also when the body raises; blocks nest."""
    import torch

    target = device
    original = torch.nn.Module.register_parameter

    def register_on_device(module: Any, name: str, param: Any) -> None:
        original(module, name, param)
        if param is None:
            return
        registered = module._parameters[name]
        attrs = dict(registered.__dict__, requires_grad=param.requires_grad)
        try:  # DiffSynth's way: the class takes its attributes as keyword arguments
            moved = type(registered)(registered.to(target), **attrs)
        except TypeError:  # a plain attribute set on the parameter: keep it all the same
            moved = type(registered)(registered.to(target), requires_grad=param.requires_grad)
            moved.__dict__.update({k: v for k, v in attrs.items() if k != "requires_grad"})
        module._parameters[name] = moved

    torch.nn.Module.register_parameter = register_on_device
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original
