"""``load_model``: DiffSynth's model construction and loading, on the C core.

The model is built inside ``skip_model_initialization`` (no weight is initialised and then
overwritten), the state dict comes from diffsynth_c (``load_state_dict`` or a ``DiskMap``), and is
assigned to the model (``assign=True``: the loaded tensors become the parameters, so a plain load
holds one copy of the weights). Then ``.to(dtype, device)`` and ``.eval()``, as DiffSynth does,
branch for branch. VRAM management (``module_map``/``vram_config``) and quantisation are handed to
DiffSynth's own implementation, reading through diffsynth_c's ``DiskMap``, when DiffSynth is
installed; without it they raise ``NotImplementedError``.
"""

from __future__ import annotations

from typing import Any

from ..vram.disk_map import DiskMap
from ..vram.initialization import skip_model_initialization
from .file import load_state_dict


def _zero3() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def _init_contexts(torch_dtype: Any, device: Any) -> list:
    if _zero3():  # DeepSpeed ZeRO-3 partitions the weights while the model is built, as in DiffSynth
        import deepspeed
        from transformers.modeling_utils import set_zero3_state

        return [deepspeed.zero.Init(remote_device=device, dtype=torch_dtype), set_zero3_state()]
    return [skip_model_initialization()]


def _keep_cast(name: str, t: Any, keep: list[str], torch_dtype: Any) -> Any:
    """A floating tensor in float32 when its name passes through a module of _keep_in_fp32_modules
    (matched on the dotted name's parts, as diffusers matches them), else in torch_dtype."""
    import torch

    if not torch.is_floating_point(t):
        return t
    parts = name.split(".")
    return t.to(torch.float32 if any(m in parts for m in keep) else torch_dtype)


def _paths_of(path: Any) -> str:
    return ", ".join(map(str, path)) if isinstance(path, (list, tuple)) else str(path)


def _assign(model: Any, state_dict: dict, path: Any) -> None:
    """model.load_state_dict(state_dict, assign=True); torch's error (missing or unexpected keys,
    shape mismatches, with the keys and shapes) gets the file names in front."""
    try:
        model.load_state_dict(state_dict, assign=True)
    except RuntimeError as e:
        raise RuntimeError(f"{_paths_of(path)}: {e}") from None


def load_model(
    model_class: Any,
    path: Any,
    config: dict | None = None,
    torch_dtype: Any = None,
    device: Any = "cpu",
    state_dict_converter: Any = None,
    use_disk_map: bool = False,
    module_map: Any = None,
    vram_config: Any = None,
    vram_limit: Any = None,
    state_dict: Any = None,
    quantize: Any = None,
    subfolder: str | None = None,
) -> Any:
    """DiffSynth's ``load_model`` (same arguments; ``torch_dtype`` defaults to bfloat16). ``path``
    may also be a model folder, with ``subfolder`` as diffusers takes it."""
    import torch
    from contextlib import ExitStack

    if subfolder is not None:
        from .folder import resolve

        path = resolve(path, subfolder)
    if torch_dtype is None:
        torch_dtype = torch.bfloat16
    if module_map is not None or quantize is not None:
        return _delegate(model_class, path, config, torch_dtype, device, state_dict_converter, use_disk_map,
                         module_map, vram_config, vram_limit, state_dict, quantize)
    config = {} if config is None else config
    with ExitStack() as stack:
        for ctx in _init_contexts(torch_dtype, device):
            stack.enter_context(ctx)
        model = model_class(**config)
    keep = list(getattr(model_class, "_keep_in_fp32_modules", None) or []) if torch_dtype != torch.float32 else []
    load_dtype = None if keep else torch_dtype  # kept modules must come from the file's own values
    if state_dict is None:
        state_dict = DiskMap(path, device, torch_dtype=load_dtype) if use_disk_map else load_state_dict(path, load_dtype, device)
    if state_dict_converter is not None:
        state_dict = state_dict_converter(state_dict)
    else:
        if isinstance(state_dict, DiskMap):  # every key will be read: read them on several threads
            state_dict.prefetch(list(state_dict))
        state_dict = {k: state_dict[k] for k in state_dict}
    if keep:
        state_dict = {k: _keep_cast(k, v, keep, torch_dtype) for k, v in state_dict.items()}
    if _zero3():
        from transformers.integrations.deepspeed import _load_state_dict_into_zero3_model

        _load_state_dict_into_zero3_model(model, state_dict)
    else:
        _assign(model, state_dict, path)
    del state_dict
    if keep:  # diffusers' torch_dtype: everything in torch_dtype but the modules kept in float32
        model = model.to(device=device)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            t.data = _keep_cast(name, t.data, keep, torch_dtype)
    else:
        model = model.to(dtype=torch_dtype, device=device)
    if hasattr(model, "eval"):
        model = model.eval()
    return model


def _delegate(*args: Any) -> Any:
    """VRAM-managed and quantised loads: DiffSynth's own code, with its module globals pointing at
    diffsynth_c's DiskMap, load_state_dict and skip_model_initialization while it runs."""
    try:
        import diffsynth.core.loader.model as ds_model
    except ImportError:
        raise NotImplementedError(
            "load_model with module_map/vram_config or quantize needs DiffSynth's VRAM-managed layers: "
            "install diffsynth (diffsynth_c's own layers are not there yet)"
        ) from None
    from ..patch import original, patched_module

    with patched_module(ds_model):
        return original("diffsynth.core.loader.model", "load_model")(*args)


def detect_model(path: Any) -> list[dict]:
    """The entries of DiffSynth's MODEL_CONFIGS whose model_hash is this file set's hash (read from
    the headers / data.pkl only). Needs diffsynth installed."""
    from diffsynth.configs import MODEL_CONFIGS

    from .file import hash_model_file

    model_hash = hash_model_file(path)
    return [c for c in MODEL_CONFIGS if c["model_hash"] == model_hash]


def load_model_auto(path: Any, vram_config: Any = None, vram_limit: Any = None, state_dict: Any = None,
                    quantize: Any = None) -> list:
    """What DiffSynth's ModelPool.auto_load_model does for one file set, through diffsynth_c: every
    model whose hash matches, built and loaded. Raises ValueError naming the file and hash when no
    entry matches, as DiffSynth does."""
    from diffsynth.models.model_loader import ModelPool

    from ..patch import is_patched, patch_diffsynth, unpatch_diffsynth

    pool = ModelPool()
    was_patched = is_patched()
    if not was_patched:
        patch_diffsynth()
    try:
        pool.auto_load_model(path, vram_config=vram_config, vram_limit=vram_limit, state_dict=state_dict,
                             quantize=quantize)
    finally:
        if not was_patched:
            unpatch_diffsynth()
    return pool.model
