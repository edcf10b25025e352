"""Comparing what we load from a checkpoint with what torch.load(weights_only=True) returns on the
same file: same structure, types, tensors (dtype, shape, strides, bits, conj/neg bits, Parameter,
requires_grad, Python attributes), and the same sharing (two places hold one object in ours
exactly when they do in torch's, cycles included)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

import diffsynth_c
from diffsynth_c.core.settings import mode, threads
from diffsynth_c.core.torchfile import load_tree


def torch_load(path: Any) -> Any:
    """torch.load(weights_only=True), or the exception it raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - the oracle's answer may be an error
        return e


def ours_load(path: Any) -> Any:
    """Our whole checkpoint as load_state_dict_from_bin reads it before DiffSynth's unwrapping (the
    C reader, or its fallback to torch.load), the fallback warning silenced; or the exception."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = load_tree(path, threads(), mode())
            return torch.load(path, map_location="cpu", weights_only=True) if tree is None else tree
    except Exception as e:  # noqa: BLE001
        return e


def _tensor_bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.contiguous().reshape(-1).view(torch.uint8)


def same(a: Any, b: Any, pairs: dict[int, int] | None = None, keep: list | None = None) -> bool:
    """a (ours) and b (torch's) are the same value with the same sharing."""
    pairs = {} if pairs is None else pairs
    keep = [] if keep is None else keep
    if isinstance(a, (list, tuple, dict, set, bytearray, torch.Tensor)):
        if id(a) in pairs:
            return pairs[id(a)] == id(b)
        pairs[id(a)] = id(b)
        keep.append((a, b))  # ids stay unique while we compare
    if type(a) is not type(b):
        return False
    if isinstance(a, (torch.storage.TypedStorage, torch.UntypedStorage)):
        return a.device == b.device and a.tolist() == b.tolist()
    if isinstance(a, torch.Tensor):
        if a.layout != b.layout or a.device != b.device:
            return False
        if a.layout != torch.strided or a.device.type == "meta":
            return a.shape == b.shape and (a.device.type == "meta" or torch.equal(a.to_dense(), b.to_dense()))
        if (a.dtype, a.shape, a.requires_grad, a.is_conj(), a.is_neg()) != (
            b.dtype,
            b.shape,
            b.requires_grad,
            b.is_conj(),
            b.is_neg(),
        ):
            return False
        if a.numel() and a.stride() != b.stride():
            return False
        if a.numel() and not torch.equal(_tensor_bits(a), _tensor_bits(b)):
            return False
        return same(dict(vars(a)), dict(vars(b)), pairs, keep)
    if isinstance(a, dict):
        if list(a) != list(b) or not all(same(a[k], b[k], pairs, keep) for k in a):
            return False
        return type(a) is dict or same(dict(vars(a)), dict(vars(b)), pairs, keep)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, pairs, keep) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def assert_same_as_torch(path: Any) -> Any:
    """Loads path both ways and asserts the answers agree (an error where torch errs). Returns ours."""
    theirs, ours = torch_load(path), ours_load(path)
    if isinstance(theirs, Exception):
        assert isinstance(ours, Exception), f"torch refuses ({theirs!r}) but we load {ours!r}"
        return ours
    assert not isinstance(ours, Exception), f"torch loads {theirs!r} but we raise {ours!r}"
    assert same(ours, theirs), f"ours {ours!r} != torch's {theirs!r}"
    return ours


__all__ = ["assert_same_as_torch", "diffsynth_c", "ours_load", "same", "torch_load"]
