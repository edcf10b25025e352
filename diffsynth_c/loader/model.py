"""``load_model``: DiffSynth's model construction and loading, on the C core.

The model is built inside ``skip_model_initialization`` (no weight is initialised and then
overwritten), the state dict comes from diffsynth_c (``load_state_dict`` or a ``DiskMap``), and is
assigned to the model (``assign=True``: the loaded tensors become the parameters, so a plain load
holds one copy of the weights). Then ``.to(dtype, device)`` and ``.eval()``, as DiffSynth does,
branch for branch. VRAM management (``module_map``/``vram_config``) wraps the model in diffsynth_c's
layers (``vram/layers.py``); quantisation (``quantize=``, a config of DiffSynth's
``diffsynth.core.quant``) runs DiffSynth's branches on our reads and layers.
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


class _Bfloat16:
    """load_model's default torch_dtype: torch.bfloat16, as DiffSynth's, without importing torch when
    diffsynth_c is imported (``torch_dtype=None`` keeps the file's dtypes, as in DiffSynth)."""

    def __repr__(self) -> str:
        return "torch.bfloat16"


BFLOAT16 = _Bfloat16()


def _dtype(torch_dtype: Any) -> Any:
    if torch_dtype is BFLOAT16:
        import torch

        return torch.bfloat16
    return torch_dtype


def get_init_context(torch_dtype: Any, device: Any) -> list:
    """DiffSynth's init contexts of a model about to be loaded: DeepSpeed ZeRO-3's partitioning
    when it is enabled, else ``skip_model_initialization()`` (parameters on the meta device)."""
    return _init_contexts(_dtype(torch_dtype), device)


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
    torch_dtype: Any = BFLOAT16,
    device: Any = "cpu",
    state_dict_converter: Any = None,
    use_disk_map: bool = False,
    module_map: Any = None,
    vram_config: Any = None,
    vram_limit: Any = None,
    state_dict: Any = None,
    quantize: Any = None,
    subfolder: str | None = None,
    device_map: Any = None,
    max_memory: dict | None = None,
    *,
    variant: str | None = None,
    process_group: Any = None,
) -> Any:
    """DiffSynth's ``load_model`` (same arguments; ``torch_dtype`` defaults to bfloat16, None keeps
    the file's dtypes; ``quantize``: a QuantizeConfig of ``diffsynth.core.quant``). ``path``
    may also be a model folder, with ``subfolder`` and ``variant`` as diffusers takes them; ``device_map`` ("cuda",
    "cpu", "auto", "balanced", a device or a dict) and ``max_memory`` place the model's blocks on
    several devices as diffusers does (see ``device_map.py``), recorded in ``model.hf_device_map``.
    With a ``torch.distributed`` ``process_group`` each rank reads a share of the files and the
    ranks exchange the rest (``distributed.py``); DeepSpeed ZeRO-3 keeps DiffSynth's route."""

    if subfolder is not None or variant is not None:
        from .folder import resolve

        path = [
            f for p in (path if isinstance(path, (list, tuple)) else [path]) for f in resolve(p, subfolder, variant)
        ]
    torch_dtype = _dtype(torch_dtype)
    if device_map is not None:
        return _load_with_device_map(
            model_class,
            path,
            config or {},
            torch_dtype,
            state_dict_converter,
            device_map,
            max_memory,
            module_map,
            quantize,
            state_dict,
        )
    config = {} if config is None else config
    if quantize is not None:
        model = _load_quantized(
            model_class,
            path,
            config,
            torch_dtype,
            device,
            state_dict_converter,
            use_disk_map,
            module_map,
            vram_config,
            vram_limit,
            state_dict,
            quantize,
        )
        model.quantize_config = quantize  # LoRA hot-loading needs it to find the quantised layers
        return model.eval() if hasattr(model, "eval") else model
    if module_map is not None:
        return _load_vram_managed(
            model_class,
            path,
            config,
            torch_dtype,
            device,
            state_dict_converter,
            module_map,
            vram_config,
            vram_limit,
            state_dict,
        )
    model = _build(model_class, config, torch_dtype, device)
    keep = _kept(model_class, torch_dtype)
    load_dtype = None if keep else torch_dtype  # kept modules must come from the file's own values
    if state_dict is None and process_group is not None and not _zero3():
        state_dict = (
            DiskMap(path, device, torch_dtype=load_dtype, process_group=process_group)
            if use_disk_map
            else load_state_dict(path, load_dtype, device, process_group=process_group)
        )
    if state_dict is None:
        state_dict = (
            DiskMap(path, device, torch_dtype=load_dtype) if use_disk_map else load_state_dict(path, load_dtype, device)
        )
    state_dict = _state_dict_of(state_dict, state_dict_converter)
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


def _load_with_device_map(
    model_class: Any,
    path: Any,
    config: dict,
    torch_dtype: Any,
    state_dict_converter: Any,
    device_map: Any,
    max_memory: Any,
    module_map: Any,
    quantize: Any,
    state_dict: Any,
) -> Any:
    import torch

    from . import device_map as placement

    if module_map is not None or quantize is not None or state_dict is not None:
        raise ValueError(
            "load_model: device_map places the model's blocks itself; it does not combine with "
            "module_map/vram_config, quantize or a given state_dict"
        )
    whole = isinstance(device_map, torch.device) or (
        isinstance(device_map, str) and (device_map in ("cuda", "cpu") or device_map.startswith("cuda:"))
    )
    if whole:
        device = torch.device(device_map)
        budgets = placement.parse_max_memory(max_memory)
        key = "cpu" if device.type == "cpu" else (device.index or 0)
        if key in budgets:
            model = _build(model_class, config, torch_dtype, "meta")
            need = sum(
                size for _, size in placement.placement_units(model, torch_dtype, _kept(model_class, torch_dtype))
            )
            if need > budgets[key]:
                raise ValueError(
                    f"device_map={device_map!r}: the model needs {need / (1 << 30):.2f} GiB, "
                    f"max_memory[{key!r}] is {budgets[key] / (1 << 30):.2f} GiB"
                )
        model = load_model(model_class, path, config, torch_dtype, device, state_dict_converter)
        model.hf_device_map = {"": device}
        return model
    if isinstance(device_map, str) and device_map not in placement.STRATEGIES:
        raise ValueError(
            f"device_map: unknown value {device_map!r}; expected one of "
            f"{', '.join(placement.STRATEGIES)}, 'cuda:N', a torch.device or a dict"
        )
    model = _build(model_class, config, torch_dtype, "meta")
    keep = _kept(model_class, torch_dtype)

    def cast(name: str, t: Any) -> Any:
        if keep:
            return _keep_cast(name, t, keep, torch_dtype)
        return t.to(torch_dtype) if t.is_floating_point() else t

    model = placement.load_placed(model, path, device_map, max_memory, torch_dtype, keep, state_dict_converter, cast)
    if hasattr(model, "eval"):
        model = model.eval()
    return model


def _kept(model_class: Any, torch_dtype: Any) -> list:
    """The class's _keep_in_fp32_modules, when torch_dtype is not float32 already."""
    import torch

    if torch_dtype is None or torch_dtype == torch.float32:  # None: every tensor keeps the file's dtype
        return []
    return list(getattr(model_class, "_keep_in_fp32_modules", None) or [])


def _build(model_class: Any, config: dict, torch_dtype: Any, device: Any) -> Any:
    from contextlib import ExitStack

    with ExitStack() as stack:
        for ctx in _init_contexts(torch_dtype, device):
            stack.enter_context(ctx)
        return model_class(**config)


def _state_dict_of(source: Any, state_dict_converter: Any) -> dict:
    """A plain dict of every tensor of source (a DiskMap or a dict), renamed by the converter."""
    if state_dict_converter is not None:
        return state_dict_converter(source)
    if isinstance(source, DiskMap):  # every key will be read: read them on several threads
        source.prefetch(list(source))
    return {k: source[k] for k in source}


def _load_vram_managed(
    model_class: Any,
    path: Any,
    config: dict,
    torch_dtype: Any,
    device: Any,
    state_dict_converter: Any,
    module_map: Any,
    vram_config: Any,
    vram_limit: Any,
    state_dict: Any,
) -> Any:
    """DiffSynth's VRAM-managed branch of load_model, on diffsynth_c's layers: the weights are loaded
    in the first dtype and device of vram_config that is not 'disk' and the layers take it from
    there; with offload on disk, only a DiskMap is made and the layers read from it."""
    from ..vram.layers import check_module_map, check_vram_config, enable_vram_management

    check_module_map(module_map)
    on_disk = isinstance(vram_config, dict) and vram_config.get("offload_device") == "disk"
    if not on_disk:
        check_vram_config(vram_config)
    states = ("offload", "onload", "preparing", "computation")
    load_device = next(d for d in (vram_config.get(f"{s}_device") for s in states) if d not in (None, "disk"))
    load_dtype = next(d for d in (vram_config.get(f"{s}_dtype") for s in states) if d not in (None, "disk"))
    model = _build(model_class, config, torch_dtype, device)
    if not on_disk:
        if state_dict is None:
            state_dict = DiskMap(path, load_device, torch_dtype=load_dtype)
        _assign(model, _state_dict_of(state_dict, state_dict_converter), path)
        model = enable_vram_management(model, module_map, vram_config=vram_config, disk_map=None, vram_limit=vram_limit)
    else:
        disk_map = DiskMap(path, load_device, state_dict_converter=state_dict_converter)
        check_vram_config(vram_config, disk_map)
        model = enable_vram_management(
            model, module_map, vram_config=vram_config, disk_map=disk_map, vram_limit=vram_limit
        )
    if hasattr(model, "eval"):
        model = model.eval()
    return model


def _load_quantized(
    model_class: Any,
    path: Any,
    config: dict,
    torch_dtype: Any,
    device: Any,
    state_dict_converter: Any,
    use_disk_map: bool,
    module_map: Any,
    vram_config: Any,
    vram_limit: Any,
    state_dict: Any,
    quantize: Any,
) -> Any:
    """DiffSynth's quantised branches of load_model, branch for branch, on diffsynth_c's reads and
    layers: the backend of ``quantize`` (a ``diffsynth.core.quant`` QuantizeConfig) quantises the
    targeted Linears after the load, or shells them before a pre-quantised checkpoint is loaded
    (its flat tensors rebuilt with the file's metadata); with ``module_map`` the quantised Linears
    become AutoWrappedQuantizedModule layers, disk offload of pre-quantised checkpoints included."""
    import torch

    from ..vram.layers import enable_vram_management
    from .file import load_metadata_from_safetensors

    model = _build(model_class, config, torch_dtype, device)
    if module_map is not None:
        states = ("offload", "onload", "preparing", "computation")
        if "disk" in vram_config.values():
            if not quantize.load_prequantized:
                raise ValueError(
                    "Disk offload with quantization is only supported for pre-quantized checkpoints (load_prequantized=True)."
                )
            load_device = next(vram_config[f"{s}_device"] for s in states if vram_config[f"{s}_device"] != "disk")
            disk_map = DiskMap(path, load_device, torch_dtype=None, state_dict_converter=state_dict_converter)
            metadata = load_metadata_from_safetensors(path)
            model = quantize.prepare_for_prequantized_load(model, compute_dtype=vram_config["computation_dtype"])
            return enable_vram_management(
                model,
                module_map,
                vram_config=vram_config,
                disk_map=disk_map,
                vram_limit=vram_limit,
                quantize=quantize,
                metadata=metadata,
            )
        offload_device = vram_config["offload_device"]
        computation_device, computation_dtype = vram_config["computation_device"], vram_config["computation_dtype"]
        load_dtype = None if quantize.load_prequantized else computation_dtype
        if state_dict is None:
            state_dict = DiskMap(path, offload_device, torch_dtype=load_dtype)
        state_dict = _state_dict_of(state_dict, state_dict_converter)
        if quantize.load_prequantized:
            model = quantize.prepare_for_prequantized_load(model, compute_dtype=computation_dtype)
            state_dict = quantize.unflatten_state_dict(state_dict, load_metadata_from_safetensors(path))
        _assign(model, state_dict, path)
        del state_dict
        model = quantize.quantize_model(model, compute_device=computation_device, model_device=offload_device)
        model = quantize.dequantize_model(
            model, compute_dtype=computation_dtype, compute_device=computation_device, model_device=offload_device
        )
        model = model.to(dtype=computation_dtype, device=offload_device)
        return enable_vram_management(
            model, module_map, vram_config=vram_config, disk_map=None, vram_limit=vram_limit, quantize=quantize
        )
    if quantize.load_prequantized:
        load_device, load_dtype = device, None
    else:
        load_device, load_dtype = "cpu", torch_dtype
    if state_dict is None:
        state_dict = (
            DiskMap(path, load_device, torch_dtype=load_dtype)
            if use_disk_map
            else load_state_dict(path, load_dtype, load_device)
        )
    state_dict = _state_dict_of(state_dict, state_dict_converter)
    if quantize.load_prequantized:
        model = quantize.prepare_for_prequantized_load(model, compute_dtype=torch_dtype or torch.bfloat16)
        state_dict = quantize.unflatten_state_dict(state_dict, load_metadata_from_safetensors(path))
    _assign(model, state_dict, path)
    del state_dict
    model = quantize.quantize_model(model, compute_device=device, model_device=device)
    model = quantize.dequantize_model(model, compute_dtype=torch_dtype or torch.bfloat16)
    return model.to(dtype=torch_dtype, device=device)


def load_model_with_disk_offload(
    model_class: Any,
    path: Any,
    config: dict | None = None,
    torch_dtype: Any = BFLOAT16,
    device: Any = "cpu",
    state_dict_converter: Any = None,
    module_map: Any = None,
) -> Any:
    """DiffSynth's ``load_model_with_disk_offload``: the model built on the meta device and wrapped
    in diffsynth_c's layers with every weight left on disk (read ahead by the prefetch scheduler
    when a layer is about to run), fp8 in the preparing state, computing in ``torch_dtype`` on
    ``device``, ``vram_limit`` 80 GiB."""
    import torch

    from ..vram.layers import enable_vram_management

    if isinstance(path, str):
        path = [path]
    config = {} if config is None else config
    with skip_model_initialization():
        model = model_class(**config)
    if hasattr(model, "eval"):
        model = model.eval()
    disk_map = DiskMap(path, device, state_dict_converter=state_dict_converter)
    vram_config = {
        "offload_dtype": "disk",
        "offload_device": "disk",
        "onload_dtype": "disk",
        "onload_device": "disk",
        "preparing_dtype": torch.float8_e4m3fn,
        "preparing_device": device,
        "computation_dtype": _dtype(torch_dtype),
        "computation_device": device,
    }
    enable_vram_management(model, module_map, vram_config=vram_config, disk_map=disk_map, vram_limit=80)
    return model


def detect_model(path: Any) -> list[dict]:
    """The entries of DiffSynth's MODEL_CONFIGS whose model_hash is this file set's hash (read from
    the headers / data.pkl only). Needs diffsynth installed."""
    from diffsynth.configs import MODEL_CONFIGS

    from .file import hash_model_file

    model_hash = hash_model_file(path)
    return [c for c in MODEL_CONFIGS if c["model_hash"] == model_hash]


def __getattr__(name: str) -> Any:
    # load_model_auto runs DiffSynth's ModelPool under the patch, so it lives in the patch's layer
    # (diffsynth_c.patch); this path keeps finding it without importing upward at import time.
    if name == "load_model_auto":
        from ..patch import load_model_auto

        return load_model_auto
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
