"""VRAM-managed layers: DiffSynth's ``AutoWrappedLinear``, ``AutoWrappedModule``,
``AutoWrappedNonRecurseModule`` and ``enable_vram_management``, with the weights fetched ahead.

Same constructor arguments, attributes (``state``, ``name``, the
LoRA hot-load lists ``lora_A_weights``/``lora_B_weights``/``lora_merger``, ``disk_map``,
``disk_offload``; ``vram_management_enabled`` on the model), the same four states and the same transitions as DiffSynth's
(``diffsynth/core/vram/layers.py``): 0 offload, 1 onload, 2 preparing (entered in ``forward`` when
``vram_limit`` is None or memory is left under it), and the temporary computation copy. Outputs
are bit-identical to DiffSynth's layers for the same weights and inputs.

What differs is how the computation copy is made. DiffSynth copies each layer's weights to the
computation device when the layer runs (pageable memory, blocking copies, fp8 converted on the CPU
so the bus carries bf16, a deep copy of the whole module for wrapped modules, ``mem_get_info``
on every call). Here every layer of a model shares one ``Scheduler`` (``prefetch.py``): it learns
the order the layers run in and fetches the next layers' weights while the current one computes,
from pinned memory on a copy stream, casting on the GPU; wrapped modules run their forward on a copy
of their structure holding the fetched tensors (``torch.func.functional_call``), not a deep copy of
the weights (what the forward sets on the module stays on the copy, as with DiffSynth's); under
``torch.compile`` the layers trace DiffSynth's own casts, so graphs break no more often; the free memory that
``vram_limit`` is compared with is queried at most twice a second and counted in between.
Normalisation layers of known types (``torch.nn.RMSNorm``, ``torch.nn.LayerNorm``, DiffSynth's
``RMSNorm``) run our CUDA norm kernels on a CUDA computation device (``DIFFSYNTH_C_NORM_KERNELS=0``
turns that off; their results match torch's within its own test tolerances, not bit for bit).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import time
from typing import Any, Union  # noqa: F401  Union: DiffSynth's layers export it

import torch

from ..core.vram_state import STATES, VRAM_CONFIG_KEYS, vram_args
from ..upstream import FOREIGN_BASES
from .disk_map import DiskMap
from .initialization import skip_model_initialization
from .prefetch import Need, Scheduler, materialize

_FP8_COMPUTE = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


class _Interop(type):
    """With ours in DiffSynth's place, DiffSynth's isinstance checks must still see layers made
    from its classes held from before the patch: FOREIGN_BASES (filled by patch_diffsynth, kept in
    the leaf module ``upstream``) names DiffSynth's class for each of our bases."""

    def __instancecheck__(cls, obj: Any) -> bool:
        if type.__instancecheck__(cls, obj):
            return True
        other = FOREIGN_BASES.get(cls)
        return other is not None and isinstance(obj, other)


IS_NPU_AVAILABLE = importlib.util.find_spec("torch_npu") is not None and torch.npu.is_available()


def get_device_name() -> str:
    """The current device, as DiffSynth names it: 'cuda:N' where CUDA is, else 'npu:N', else
    'cpu:cpu' (torch.cpu.current_device())."""
    kind = "cuda" if torch.cuda.is_available() else "npu" if IS_NPU_AVAILABLE else "cpu"
    return f"{kind}:{getattr(torch, kind).current_device()}"


def parse_device_type(device: Any) -> str | None:
    """'cuda', 'cpu', 'npu', 'mps'... of a device or its name, as DiffSynth parses it."""
    if isinstance(device, torch.device):
        return device.type
    if isinstance(device, str):
        if device.startswith("npu"):
            return "npu"
        try:
            return torch.device(device).type
        except RuntimeError:
            return "cpu"
    return None


def _mem_get_info(device: Any) -> tuple[int, int]:
    """(free, total) bytes of the device, as DiffSynth reads them; host memory for the CPU."""
    kind = parse_device_type(device)
    if kind == "mps":
        allocated, total = torch.mps.current_allocated_memory(), torch.mps.recommended_max_memory()
        return total - allocated, total
    query = getattr(getattr(torch, kind, None), "mem_get_info", None)
    if query is not None:
        return query(device)
    if kind == "cpu":
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                info[k] = int(v.split()[0]) * 1024
        return info.get("MemAvailable", 0), info.get("MemTotal", 0)
    raise RuntimeError(f"vram_limit: cannot read the free memory of device {device!r}")


class _MemoryGauge:
    """Used memory of the computation device in GiB: queried at most every 0.5 s, and in between
    counted up by the bytes the layers moved there (no driver call on every layer)."""

    def __init__(self) -> None:
        self.used: dict[str, float] = {}
        self.when: dict[str, float] = {}

    def used_gib(self, device: Any) -> float:
        key = str(device)
        now = time.monotonic()
        if key not in self.used or now - self.when[key] > 0.5:
            free, total = _mem_get_info(device)
            self.used[key] = (total - free) / (1024**3)
            self.when[key] = now
        return self.used[key]

    def add(self, device: Any, nbytes: int) -> None:
        key = str(device)
        if key in self.used:
            self.used[key] += nbytes / (1024**3)

    def forget(self) -> None:
        self.used.clear()

    def __deepcopy__(self, memo: dict) -> _MemoryGauge:
        return self


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class AutoTorchModule(torch.nn.Module, metaclass=_Interop):
    """DiffSynth's AutoTorchModule: the dtypes and devices of the four states, and the moves."""

    def __init__(
        self,
        offload_dtype: Any = None,
        offload_device: Any = None,
        onload_dtype: Any = None,
        onload_device: Any = None,
        preparing_dtype: Any = None,
        preparing_device: Any = None,
        computation_dtype: Any = None,
        computation_device: Any = None,
        vram_limit: float | None = None,
    ):
        if type.__instancecheck__(AutoTorchModule, self):
            super().__init__()
        else:
            # DiffSynth's quantised layer calls ``AutoTorchModule.__init__(self, ...)`` by the name the
            # patch rebound to this class: its own MRO continues at torch.nn.Module, as here
            torch.nn.Module.__init__(self)
        self.set_dtype_and_device(
            **vram_args(locals()),
            vram_limit=vram_limit,
        )
        self.state = 0
        self.name = ""
        self.computation_device_type = parse_device_type(self.computation_device)

    def set_dtype_and_device(
        self,
        offload_dtype: Any = None,
        offload_device: Any = None,
        onload_dtype: Any = None,
        onload_device: Any = None,
        preparing_dtype: Any = None,
        preparing_device: Any = None,
        computation_dtype: Any = None,
        computation_device: Any = None,
        vram_limit: float | None = None,
    ) -> None:
        """Unset dtypes default to the computation dtype, unset devices to 'disk' for a 'disk'
        dtype and to the computation device otherwise (DiffSynth's defaults)."""
        given = locals()
        for state in STATES[:-1]:
            dtype = given[f"{state}_dtype"] or computation_dtype
            device = given[f"{state}_device"] or ("disk" if dtype == "disk" else computation_device)
            setattr(self, f"{state}_dtype", dtype)
            setattr(self, f"{state}_device", device)
        self.computation_dtype = computation_dtype
        self.computation_device = computation_device
        self.vram_limit = vram_limit

    def cast_to(self, weight: Any, dtype: Any, device: Any) -> Any:
        """A new tensor: weight converted to dtype on device (DiffSynth's empty_like + copy_)."""
        r = torch.empty_like(weight, dtype=dtype, device=device)
        r.copy_(weight)
        return r

    def check_free_vram(self) -> bool:
        """Whether the computation device uses less than vram_limit GiB."""
        gauge = self.__dict__.get("_gauge")
        if gauge is None:
            free, total = _mem_get_info(self.computation_device)
            return (total - free) / (1024**3) < self.vram_limit
        return gauge.used_gib(self.computation_device) < self.vram_limit

    def _state_changed(self, moved_by_pipeline: bool = True) -> None:
        """What was fetched ahead for this layer may no longer be what it holds; after the
        pipeline moved a model (offload/onload), the device's memory is read again."""
        scheduler = self.__dict__.get("_scheduler")
        if scheduler is not None:
            scheduler.forget(self)
        gauge = self.__dict__.get("_gauge")
        if gauge is not None and moved_by_pipeline:
            gauge.forget()

    def offload(self) -> None:
        """To the offload state (0): the weights in the offload dtype on the offload device."""
        if self.state != 0:
            self.to(dtype=self.offload_dtype, device=self.offload_device)
            self.state = 0
            self._state_changed()

    def onload(self) -> None:
        """To the onload state (1): the weights in the onload dtype on the onload device."""
        if self.state != 1:
            self.to(dtype=self.onload_dtype, device=self.onload_device)
            self.state = 1
            self._state_changed()

    def param_name(self, name: str) -> str:
        """The key of this layer's tensor ``name`` in the model's state dict (and so in its files)."""
        return name if self.name == "" else self.name + "." + name

    # --- the computation copy -----------------------------------------------------------------
    def _stored(self) -> tuple[Any, Any]:
        """(dtype, device) the weights are kept in, in the current state."""
        if self.state == 2:
            return self.preparing_dtype, self.preparing_device
        return self.onload_dtype, self.onload_device

    def current_need(self) -> Need | None:
        """What the computation copy needs now, or None when the stored weights are it."""
        dtype, device = self._stored()
        if dtype == self.computation_dtype and device == self.computation_device:
            return None
        return self._need(on_disk=self.disk_offload and device == "disk")

    def _need(self, on_disk: bool) -> Need:
        raise NotImplementedError

    @torch._dynamo.disable
    def _fetch(self, need: Need) -> dict:
        """The computation tensors of need: through the model's scheduler (fetched ahead where
        it could), on demand without one."""
        scheduler = self.__dict__.get("_scheduler")
        if scheduler is None:
            return materialize(need)
        return scheduler.fetch(self, need)

    def _note_prepared(self, tensors: Any) -> None:
        gauge = self.__dict__.get("_gauge")
        if gauge is not None and self.preparing_device != "disk":
            gauge.add(self.preparing_device, _tensor_bytes(tensors))


class LoRAHotLoadMixin(metaclass=_Interop):
    """LoRA weights added at run time (``pipe.load_lora(..., hotload=True)``), as DiffSynth adds them."""

    def init_lora_hotload(self) -> None:
        """Empty LoRA lists and no merger: the layer computes without LoRA until weights are added."""
        self.lora_A_weights = []
        self.lora_B_weights = []
        self.lora_merger = None

    def lora_forward(self, x: Any, out: Any) -> Any:
        """out plus every hot-loaded LoRA's x @ A.T @ B.T, or the lora_merger's combination of them."""
        if self.lora_merger is None:
            for lora_A, lora_B in zip(self.lora_A_weights, self.lora_B_weights):
                out = out + x @ lora_A.T.to(device=x.device, dtype=x.dtype) @ lora_B.T.to(
                    device=x.device, dtype=x.dtype
                )
            return out
        lora_output = torch.stack(
            [x @ lora_A.T @ lora_B.T for lora_A, lora_B in zip(self.lora_A_weights, self.lora_B_weights)]
        )
        return self.lora_merger(out, lora_output)


def _own_tensors(module: torch.nn.Module, recurse_wrapped: bool) -> list[tuple[str, Any, bool]]:
    """(dotted name, tensor, is_parameter) of module's parameters and buffers, skipping the subtrees
    of wrapped children unless recurse_wrapped (they fetch their own weights)."""
    out = []

    def walk(m: torch.nn.Module, prefix: str) -> None:
        for n, p in m._parameters.items():
            if p is not None:
                out.append((prefix + n, p, True))
        for n, b in m._buffers.items():
            if b is not None:
                out.append((prefix + n, b, False))
        for n, child in m._modules.items():
            if child is None or (not recurse_wrapped and isinstance(child, AutoTorchModule)):
                continue
            walk(child, prefix + n + ".")

    walk(module, "")
    return out


def _converts(t: Any) -> bool:
    """Whether nn.Module.to(dtype) converts this tensor."""
    return t.is_floating_point() or t.is_complex()


class _ManagedLayer(AutoTorchModule):
    """The state transitions DiffSynth's wrapped modules and linears share, disk included."""

    def _offload_to_disk(self) -> None:
        raise NotImplementedError

    def _managed_tensors(self) -> Any:
        raise NotImplementedError

    def offload(self) -> None:
        """offload / onload / preparing -> offload"""
        if self.state != 0:
            if self.disk_offload:
                self._offload_to_disk()
            else:
                self.to(dtype=self.offload_dtype, device=self.offload_device)
            self.state = 0
            self._state_changed()

    def onload(self) -> None:
        """offload -> onload (read from disk when only the offload state is on disk)"""
        if self.state < 1:
            if self.disk_offload and self.onload_device != "disk" and self.offload_device == "disk":
                self.load_from_disk(self.onload_dtype, self.onload_device)
            elif self.onload_device != "disk":
                self.to(dtype=self.onload_dtype, device=self.onload_device)
            self.state = 1
            self._state_changed()

    def preparing(self) -> None:
        """onload -> preparing: the weights move to the preparing device and stay there."""
        if self.state != 2:
            if self.disk_offload and self.preparing_device != "disk" and self.onload_device == "disk":
                self.load_from_disk(self.preparing_dtype, self.preparing_device)
            elif self.preparing_device != "disk":
                self.to(dtype=self.preparing_dtype, device=self.preparing_device)
            self.state = 2
            self._state_changed(moved_by_pipeline=False)
            self._note_prepared(self._managed_tensors())


class AutoWrappedModule(_ManagedLayer):
    """DiffSynth's AutoWrappedModule: a whole module managed as one layer."""

    def __init__(
        self,
        module: torch.nn.Module,
        offload_dtype: Any = None,
        offload_device: Any = None,
        onload_dtype: Any = None,
        onload_device: Any = None,
        preparing_dtype: Any = None,
        preparing_device: Any = None,
        computation_dtype: Any = None,
        computation_device: Any = None,
        vram_limit: float | None = None,
        name: str = "",
        disk_map: Any = None,
        **kwargs: Any,
    ):
        super().__init__(
            **vram_args(locals()),
            vram_limit=vram_limit,
        )
        self.module = module
        if offload_dtype == "disk":
            self.name = name
            self.disk_map = disk_map
            # the parameters read from disk: all of them, or only the module's own (non-recursive)
            self.required_params = [n for n, _ in self.module.named_parameters(recurse=self._recurse_wrapped)]
            self.disk_offload = True
        else:
            self.disk_offload = False

    _recurse_wrapped = True

    @torch._dynamo.disable
    def load_from_disk(self, torch_dtype: Any, device: Any, copy_module: bool = False) -> torch.nn.Module:
        """The module with its parameters read from the disk map in torch_dtype on device (a deep copy
        with copy_module, else the module itself)."""
        module = copy.deepcopy(self.module) if copy_module else self.module
        state_dict = {
            n: self.disk_map[self.param_name(n)].to(dtype=torch_dtype, device=device) for n in self.required_params
        }
        module.load_state_dict(state_dict, assign=True)
        module.to(dtype=torch_dtype, device=device)
        return module

    def offload_to_disk(self, model: torch.nn.Module) -> None:
        """To the meta device, except modules holding buffers (they are not in the file), whose
        children are offloaded one by one."""
        for _ in model.buffers():
            for child in model.children():
                self.offload_to_disk(child)
            break
        else:
            model.to("meta")

    def _offload_to_disk(self) -> None:
        self.offload_to_disk(self.module)

    def _managed_tensors(self) -> Any:
        return (t for _, t, _ in _own_tensors(self.module, self._recurse_wrapped))

    def cast_to(self, module: Any, dtype: Any, device: Any) -> Any:
        """A deep copy of module in dtype on device (DiffSynth's computation copy)."""
        return copy.deepcopy(module).to(dtype=dtype, device=device)

    def _need(self, on_disk: bool) -> Need:
        names, sources, keys, dtypes = [], [], [], []
        disk_names = set(self.required_params) if on_disk else set()
        for n, t, _is_param in _own_tensors(self.module, self._recurse_wrapped):
            names.append(n)
            if n in disk_names:  # read from the file and converted whatever its dtype, as DiffSynth
                sources.append(None)
                keys.append(self.param_name(n))
                dtypes.append(self.computation_dtype)
            elif on_disk and not self._disk_converts_rest:
                names.pop()
                continue
            else:
                sources.append(t)
                keys.append(None)
                dtypes.append(self.computation_dtype if _converts(t) else None)
        return Need(names, sources, keys, dtypes, self.computation_device, self.__dict__.get("disk_map"))

    _disk_converts_rest = True  # DiffSynth's load_from_disk ends with module.to(dtype, device)

    def computation(self) -> torch.nn.Module:
        """DiffSynth's computation(): the module itself when it is already in the computation dtype
        and device, else a copy there. (forward does not call this: it fetches the tensors.)"""
        dtype, device = self._stored()
        if dtype == self.computation_dtype and device == self.computation_device:
            return self.module
        if self.disk_offload and device == "disk":
            return self.load_from_disk(self.computation_dtype, self.computation_device, copy_module=True)
        return self.cast_to(self.module, dtype=self.computation_dtype, device=self.computation_device)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's forward on its weights in the computation dtype and device (fetched
        ahead by the model's scheduler where they are stored elsewhere); enters the preparing state
        first from onload when vram_limit allows, as DiffSynth's does."""
        if self.state == 1 and (self.vram_limit is None or self.check_free_vram()):
            self.preparing()
        if torch.compiler.is_compiling():  # traced as DiffSynth's forward is: no more graph breaks than its
            return self.computation()(*args, **kwargs)
        tensors = self._computation_tensors()
        fast = _norm_by_kernel(self.module, tensors, args, kwargs, self.computation_device)
        if fast is not None:
            return fast
        if tensors is None:
            return self.module(*args, **kwargs)
        return torch.func.functional_call(self._computation_copy(tensors), tensors, args, kwargs, strict=False)

    @torch._dynamo.disable
    def _computation_tensors(self) -> dict | None:
        """The computation's tensors (None: the stored ones are it). Not traced by torch.compile, as
        DiffSynth's fetches are not."""
        need = self.current_need()
        return None if need is None else self._fetch(need)

    @torch._dynamo.disable
    def _computation_copy(self, tensors: dict) -> torch.nn.Module:
        """A deep copy of the module, as DiffSynth's computation copy, except that the tensors about to
        be replaced by the fetched ones are shared instead of copied (and wrapped children are shared,
        as DiffSynth shares them): what the module's forward sets on itself stays on the copy."""
        memo: dict = {}
        for n, t, _ in _own_tensors(self.module, self._recurse_wrapped):
            if n in tensors:
                memo[id(t)] = t
        for m in self.module.modules():
            if m is not self.module and isinstance(m, AutoTorchModule):
                memo[id(m)] = m
        return copy.deepcopy(self.module, memo)

    def __getattr__(self, name: str) -> Any:
        if name in self.__dict__ or name == "module":
            return super().__getattr__(name)
        return getattr(self.module, name)


class AutoWrappedNonRecurseModule(AutoWrappedModule):
    """DiffSynth's AutoWrappedNonRecurseModule: a module managed as one layer except for its wrapped
    children, which manage themselves."""

    _recurse_wrapped = False
    _disk_converts_rest = False  # DiffSynth's non-recursive load_from_disk converts only own parameters

    def _copy_with_shared_children(self, module: torch.nn.Module) -> tuple[torch.nn.Module, set]:
        """A deep copy whose wrapped children are the originals (they own their maps and devices)."""
        shared = {id(c): c for c in module.modules() if isinstance(c, AutoTorchModule)}
        return copy.deepcopy(module, shared), set(shared)

    def _detach_shared_children(self, module: torch.nn.Module, shared_ids: set) -> list:
        detached = []
        for parent in list(module.modules()):
            if isinstance(parent, AutoTorchModule):
                continue
            original = parent._modules
            kept = type(original)((n, c) for n, c in original.items() if id(c) not in shared_ids)
            if len(kept) != len(original):
                parent._modules = kept
                detached.append((parent, original))
        return detached

    def _restore_shared_children(self, detached: list) -> None:
        for parent, original in detached:
            parent._modules = original

    @torch._dynamo.disable
    def load_from_disk(self, torch_dtype: Any, device: Any, copy_module: bool = False) -> torch.nn.Module:
        """The module with its own parameters read from the disk map in torch_dtype on device; a copy
        with copy_module, whose wrapped children stay the originals."""
        if copy_module:
            module, shared_ids = self._copy_with_shared_children(self.module)
        else:
            module = self.module
        state_dict = {
            n: self.disk_map[self.param_name(n)].to(dtype=torch_dtype, device=device) for n in self.required_params
        }
        if copy_module:
            detached = self._detach_shared_children(module, shared_ids)
            try:
                module.load_state_dict(state_dict, assign=True, strict=False)
            finally:
                self._restore_shared_children(detached)
        else:
            module.load_state_dict(state_dict, assign=True, strict=False)
        return module

    def offload_to_disk(self, model: torch.nn.Module) -> None:
        """Does nothing, as DiffSynth's version in effect does (see below)."""
        # DiffSynth's version calls .to("meta") on each own parameter and drops the result: the
        # weights stay where they are. Kept so the states match.

    def cast_to(self, module: Any, dtype: Any, device: Any) -> Any:
        """A copy of module in dtype on device; its wrapped children are shared, not copied or moved."""
        result, shared_ids = self._copy_with_shared_children(module)
        detached = self._detach_shared_children(result, shared_ids)
        try:
            result = result.to(dtype=dtype, device=device)
        finally:
            self._restore_shared_children(detached)
        return result


class AutoWrappedLinear(torch.nn.Linear, _ManagedLayer, LoRAHotLoadMixin):
    """DiffSynth's AutoWrappedLinear: a Linear whose weight and bias are managed, LoRA hot-load and
    fp8 computation (``torch._scaled_mm``) when the computation dtype is float8_e4m3."""

    def __init__(
        self,
        module: torch.nn.Linear,
        offload_dtype: Any = None,
        offload_device: Any = None,
        onload_dtype: Any = None,
        onload_device: Any = None,
        preparing_dtype: Any = None,
        preparing_device: Any = None,
        computation_dtype: Any = None,
        computation_device: Any = None,
        vram_limit: float | None = None,
        name: str = "",
        disk_map: Any = None,
        **kwargs: Any,
    ):
        with skip_model_initialization():
            super().__init__(
                in_features=module.in_features, out_features=module.out_features, bias=module.bias is not None
            )
        self.set_dtype_and_device(
            **vram_args(locals()),
            vram_limit=vram_limit,
        )
        self.weight = module.weight
        self.bias = module.bias
        self.state = 0
        self.name = name
        self.init_lora_hotload()
        self.enable_fp8 = computation_dtype in _FP8_COMPUTE
        self.computation_device_type = parse_device_type(self.computation_device)
        if offload_dtype == "disk":
            self.disk_map = disk_map
            self.disk_offload = True
        else:
            self.disk_offload = False

    def fp8_linear(self, input: Any, weight: Any, bias: Any = None) -> Any:
        """x @ weight.T + bias in fp8 with a per-row scale of x (torch._scaled_mm), output in x's dtype."""
        device, origin_dtype, origin_shape = input.device, input.dtype, input.shape
        x = input.reshape(-1, origin_shape[-1])
        x_max = torch.max(torch.abs(x), dim=-1, keepdim=True).values
        scale_a = torch.clamp(x_max / torch.finfo(self.computation_dtype).max, min=1.0).float().to(device=device)
        scale_b = torch.ones((weight.shape[0], 1), device=device)  # made on the device: no host copy
        x = (x / (scale_a + 1e-8)).to(self.computation_dtype)
        weight = weight.to(self.computation_dtype)
        if bias is not None:
            bias = bias.to(torch.bfloat16)
        result = torch._scaled_mm(x, weight.T, scale_a=scale_a, scale_b=scale_b.T, bias=bias, out_dtype=origin_dtype)
        return result.reshape(origin_shape[:-1] + result.shape[-1:])

    @torch._dynamo.disable
    def load_from_disk(self, torch_dtype: Any, device: Any, assign: bool = True) -> tuple[Any, Any]:
        """(weight, bias) read from the disk map in torch_dtype on device; with assign they become the
        layer's parameters."""
        weight = self.disk_map[self.name + ".weight"].to(dtype=torch_dtype, device=device)
        bias = None if self.bias is None else self.disk_map[self.name + ".bias"].to(dtype=torch_dtype, device=device)
        if assign:
            state_dict = {"weight": weight}
            if bias is not None:
                state_dict["bias"] = bias
            self.load_state_dict(state_dict, assign=True)
        return weight, bias

    def _offload_to_disk(self) -> None:
        self.to("meta")

    def _managed_tensors(self) -> Any:
        return (self.weight, self.bias)

    def _need(self, on_disk: bool) -> Need:
        names = ["weight"] if self.bias is None else ["weight", "bias"]
        if on_disk:
            sources, keys = [None] * len(names), [self.name + "." + n for n in names]
        else:
            sources, keys = [getattr(self, n) for n in names], [None] * len(names)
        return Need(
            names,
            sources,
            keys,
            [self.computation_dtype] * len(names),
            self.computation_device,
            self.__dict__.get("disk_map"),
        )

    def computation(self) -> tuple[Any, Any]:
        """The weight and bias in the computation dtype on the computation device. Inside a graph
        torch.compile traces, DiffSynth's own casts (traced, no prefetch; a disk read is not traced)."""
        dtype, device = self._stored()
        if dtype == self.computation_dtype and device == self.computation_device:
            return self.weight, self.bias
        on_disk = self.disk_offload and device == "disk"
        if torch.compiler.is_compiling():
            if on_disk:
                return self.load_from_disk(self.computation_dtype, self.computation_device, assign=False)
            bias = (
                None if self.bias is None else self.cast_to(self.bias, self.computation_dtype, self.computation_device)
            )
            return self.cast_to(self.weight, self.computation_dtype, self.computation_device), bias
        tensors = self._fetch(self._need(on_disk))
        return tensors["weight"], tensors.get("bias")

    def linear_forward(self, x: Any, weight: Any, bias: Any) -> Any:
        """x @ weight.T + bias: fp8_linear for a float8_e4m3 computation dtype, else torch's linear."""
        if self.enable_fp8:
            return self.fp8_linear(x, weight, bias)
        return torch.nn.functional.linear(x, weight, bias)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """The linear on the computation weights (fetched ahead where they are stored elsewhere),
        plus the hot-loaded LoRAs; enters the preparing state first when vram_limit allows."""
        if self.state == 1 and (self.vram_limit is None or self.check_free_vram()):
            self.preparing()
        weight, bias = self.computation()
        out = self.linear_forward(x, weight, bias)
        if len(self.lora_A_weights) > 0:
            out = self.lora_forward(x, out)
        return out


def _plain_tensors(module: torch.nn.Module) -> bool:
    """Whether every tensor of module is a plain tensor held as a parameter or buffer: then its
    computation copy can be made from fetched tensors. Tensor subclasses (a backend's packed weights
    with their quant state) and tensors kept as plain attributes are copied as DiffSynth copies them."""
    for m in module.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
                return False
        if any(isinstance(v, torch.Tensor) for v in vars(m).values()):
            return False
    return True


class AutoWrappedQuantizedModule(torch.nn.Linear, AutoTorchModule, LoRAHotLoadMixin):
    """DiffSynth's AutoWrappedQuantizedModule: a backend's quantised Linear (``diffsynth.core.quant``)
    managed as one layer; it moves between devices but is never re-typed, LoRA hot-load included.

    Same states, attributes and results as DiffSynth's. The computation copy comes through the
    model's prefetch scheduler: a layer on disk has its checkpoint tensors read ahead (then rebuilt
    with the backend's ``unflatten_state_dict`` into a shell, as DiffSynth rebuilds them), a resident
    layer whose tensors are plain has them copied ahead to the computation device."""

    def __init__(
        self,
        module: torch.nn.Module,
        offload_dtype: Any = None,
        offload_device: Any = None,
        onload_dtype: Any = None,
        onload_device: Any = None,
        preparing_dtype: Any = None,
        preparing_device: Any = None,
        computation_dtype: Any = None,
        computation_device: Any = None,
        vram_limit: float | None = None,
        name: str = "",
        disk_map: Any = None,
        quantize: Any = None,
        metadata: dict | None = None,
        **kwargs: Any,
    ):
        disk_offload = any(_is_disk(v) for v in (offload_dtype, offload_device, onload_dtype, onload_device))
        if disk_offload and (disk_map is None or quantize is None):
            raise ValueError(
                "Disk offload for quantized layers requires both `disk_map` and `quantize`, "
                "so each layer can rebuild its packed weight and quant state lazily."
            )
        AutoTorchModule.__init__(
            self,
            **vram_args(locals()),
            vram_limit=vram_limit,
        )
        self.in_features = module.in_features
        self.out_features = module.out_features
        self.module = module
        self.name = name
        self.disk_offload = disk_offload
        self.disk_map = disk_map
        self.quantize = quantize
        self.metadata = metadata
        self._required_keys = None
        self.init_lora_hotload()

    def _disk_required_keys(self) -> list:
        if self._required_keys is None:
            self._required_keys = [key for key in self.disk_map if key.startswith(self.name + ".")]
        return self._required_keys

    def _rebuild(self, subdict: dict, device: Any, target: Any = None) -> torch.nn.Module:
        """target (the module by default) holding the layer's tensors of subdict, rebuilt by the
        backend from the checkpoint's flat tensors and metadata, on device."""
        module = self.module if target is None else target
        prefix = self.name + "."
        rebuilt = self.quantize.unflatten_state_dict(subdict, self.metadata or {})
        module.load_state_dict({key[len(prefix) :]: value for key, value in rebuilt.items()}, assign=True)
        module.to(device=device)
        return module

    @torch._dynamo.disable
    def _load_from_disk(self, device: Any, target: Any = None) -> torch.nn.Module:
        return self._rebuild({key: self.disk_map[key] for key in self._disk_required_keys()}, device, target)

    def _module_device(self) -> Any:
        tensor = next(self.module.parameters(), None)
        if tensor is None:
            tensor = next(self.module.buffers(), None)
        return tensor.device

    def offload(self) -> None:
        """To the offload state: on disk, the layer becomes an empty shell of the backend."""
        if self.state != 0:
            if self.disk_offload:
                self.module = self.quantize.build_quantized_shell(
                    self.module, self.computation_dtype, layer_name=self.name
                )
            else:
                self.module.to(device=self.offload_device)
            self.state = 0
            self._state_changed()

    def onload(self) -> None:
        """To the onload state (read from disk when only the offload state is on disk)."""
        if self.state < 1:
            if self.disk_offload and self.onload_device != "disk" and self.offload_device == "disk":
                self._load_from_disk(self.onload_device)
            elif self.onload_device != "disk":
                self.module.to(device=self.onload_device)
            self.state = 1
            self._state_changed()

    @torch._dynamo.disable
    def preparing(self) -> None:
        """onload -> preparing: the layer moves to the preparing device and stays there."""
        if self.state != 2:
            if self.disk_offload and self.preparing_device != "disk" and self.onload_device == "disk":
                self._load_from_disk(self.preparing_device)
            elif self.preparing_device != "disk":
                self.module.to(device=self.preparing_device)
            self.state = 2
            self._state_changed(moved_by_pipeline=False)
            self._note_prepared(_tensor for _, _tensor, _ in _own_tensors(self.module, True))

    def _stored_device(self) -> Any:
        return self.preparing_device if self.state == 2 else self.onload_device

    def current_need(self) -> Need | None:
        """What the computation copy needs fetched: the layer's checkpoint tensors in their stored
        dtype (on disk), or its plain tensors (resident elsewhere); None when there is nothing to
        fetch ahead."""
        device = self._stored_device()
        if device == self.computation_device:
            return None
        if self.disk_offload and device == "disk":
            keys = list(self._disk_required_keys())
            return Need(keys, [None] * len(keys), keys, [None] * len(keys), self.computation_device, self.disk_map)
        if not _plain_tensors(self.module):
            return None
        own = _own_tensors(self.module, True)
        return Need(
            [n for n, _, _ in own],
            [t for _, t, _ in own],
            [None] * len(own),
            [None] * len(own),
            self.computation_device,
            None,
        )

    @torch._dynamo.disable
    def computation_module(self) -> torch.nn.Module:
        """The layer on the computation device: itself when it is stored there, else a copy (a shell
        rebuilt from the disk reads, or a copy holding the fetched tensors)."""
        device = self._stored_device()
        if device == self.computation_device:
            return self.module
        need = self.current_need()
        if self.disk_offload and device == "disk":
            transient = self.quantize.build_quantized_shell(self.module, self.computation_dtype, layer_name=self.name)
            return self._rebuild(self._fetch(need), self.computation_device, target=transient)
        if need is None:
            return copy.deepcopy(self.module).to(device=self.computation_device)
        tensors = self._fetch(need)
        memo = {id(t): t for _, t, _ in _own_tensors(self.module, True)}
        result = copy.deepcopy(self.module, memo)
        for name, t, is_param in _own_tensors(result, True):
            owner, _, leaf = name.rpartition(".")
            sub = result.get_submodule(owner) if owner else result
            if is_param:
                sub._parameters[leaf] = torch.nn.Parameter(tensors[name], requires_grad=t.requires_grad)
            else:
                sub._buffers[leaf] = tensors[name]
        return result

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """The backend's quantised forward on the computation device, plus the hot-loaded LoRAs."""
        if self.state == 1 and (self.vram_limit is None or self.check_free_vram()):
            self.preparing()
        module = self.computation_module()
        out = module(x, *args, **kwargs)
        if len(self.lora_A_weights) > 0:
            out = self.lora_forward(x, out)
        return out

    def __getattr__(self, name: str) -> Any:
        if name in self.__dict__ or name == "module":
            return super().__getattr__(name)
        return getattr(self.module, name)


# --- norms on our kernels ----------------------------------------------------------------------
def _norm_kind(module: torch.nn.Module) -> str | None:
    cls = type(module)
    if cls is torch.nn.RMSNorm:
        return "torch_rms"
    if cls is torch.nn.LayerNorm:
        return "torch_layer"
    if cls.__name__ == "RMSNorm" and cls.__module__ == "diffsynth.models.general_modules":
        return "diffsynth_rms"
    return None


def _norm_by_kernel(module: torch.nn.Module, tensors: dict | None, args: tuple, kwargs: dict, device: Any) -> Any:
    """The module's output from our CUDA norm kernels, or None where they do not apply (not a known
    norm, not on CUDA, kernels missing or off, a shape or dtype they do not take)."""
    kind = _norm_kind(module)
    if kind is None or kwargs or len(args) != 1 or parse_device_type(device) != "cuda":
        return None
    if os.environ.get("DIFFSYNTH_C_NORM_KERNELS", "1") == "0":
        return None
    from ..dlpack import safetensors_name_of
    from ..kernels import NORM_DTYPES, cuda_available, layer_norm, rms_norm

    x = args[0]
    if not (isinstance(x, torch.Tensor) and x.is_cuda and x.is_contiguous() and x.dim() > 0):
        return None
    get = lambda n: tensors[n] if tensors is not None and n in tensors else getattr(module, n, None)
    weight, bias = get("weight"), get("bias") if kind == "torch_layer" else None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return None  # the kernels have no backward: autograd needs the module's own forward
    for t in (x, weight, bias):
        if t is not None and (
            safetensors_name_of(t.dtype) not in NORM_DTYPES or t.device != x.device or not t.is_contiguous()
        ):
            return None
    if kind == "diffsynth_rms":
        if weight is not None and weight.dtype != x.dtype:  # torch would promote the product's dtype
            return None
        eps = module.eps
    else:
        shape = tuple(module.normalized_shape)
        if len(shape) != 1 or shape[0] != x.shape[-1]:
            return None
        eps = module.eps
        if eps is None:  # as torch.nn.RMSNorm: the epsilon of the F32 it computes in, for F16/BF16 too
            eps = torch.finfo(torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype).eps
        if weight is not None and weight.dtype != x.dtype:
            return None
    if not cuda_available():
        return None
    if kind == "torch_layer":
        return layer_norm(x, weight, bias, eps)
    return rms_norm(x, weight, eps)


# --- enabling ----------------------------------------------------------------------------------
def _is_disk(v: Any) -> bool:
    return isinstance(v, str) and v == "disk"


def check_vram_config(vram_config: dict, disk_map: Any = None) -> None:
    """Raises ValueError for a vram_config enable_vram_management cannot honour: an unknown key, no
    computation dtype or device, a state on disk after one that is not, disk offload without a
    DiskMap of .safetensors files, fp8 computation on a GPU without fp8 matrix multiplication."""
    if not isinstance(vram_config, dict):
        raise TypeError(
            f"vram_config must be a dict with the keys {', '.join(VRAM_CONFIG_KEYS)}, got {type(vram_config).__name__}"
        )
    unknown = sorted(set(vram_config) - set(VRAM_CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"vram_config: unknown key(s) {', '.join(map(repr, unknown))}; the keys are {', '.join(VRAM_CONFIG_KEYS)}"
        )
    for k in ("computation_dtype", "computation_device"):
        if vram_config.get(k) is None:
            raise ValueError(f"vram_config: '{k}' is required")
        if _is_disk(vram_config[k]):
            raise ValueError(f"vram_config: '{k}' cannot be 'disk': layers compute on a device")
    on_disk = []
    for state in ("offload", "onload", "preparing"):
        dtype, device = vram_config.get(f"{state}_dtype"), vram_config.get(f"{state}_device")
        if dtype is not None and device is not None and _is_disk(dtype) != _is_disk(device):
            raise ValueError(
                f"vram_config: {state}_dtype={dtype!r} and {state}_device={device!r}: 'disk' must be both or neither"
            )
        on_disk.append(_is_disk(dtype) or _is_disk(device))
    for i, state in enumerate(("onload", "preparing"), start=1):
        if on_disk[i] and not on_disk[i - 1]:
            before = ("offload", "onload")[i - 1]
            raise ValueError(
                f"vram_config: {state} on 'disk' needs {before} on 'disk' too (weights only move towards the computation)"
            )
    if on_disk[0]:
        if disk_map is None:
            raise ValueError(
                "vram_config: disk offload needs a disk_map (load_model passes one; or give DiskMap(paths, device))"
            )
        for p in getattr(disk_map, "path", []):
            if not str(p).endswith(".safetensors"):
                raise ValueError(
                    f"{p}: disk offload reads tensors one by one from .safetensors files; this is a torch checkpoint "
                    "(convert it: python -m diffsynth_c convert SRC DST)"
                )
    dtype, device = vram_config["computation_dtype"], vram_config["computation_device"]
    if dtype in _FP8_COMPUTE and parse_device_type(device) == "cuda":
        cap = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None
        if cap is None or cap < (8, 9):
            raise ValueError(
                f"vram_config: computation_dtype={dtype} needs fp8 matrix multiplication, which {device} "
                f"{'does not have (compute capability ' + '.'.join(map(str, cap)) + ' < 8.9)' if cap else 'is not available'}"
            )


def check_module_map(module_map: dict) -> None:
    """Raises TypeError unless module_map is {torch.nn.Module class: wrapper class}, as DiffSynth needs."""
    if not isinstance(module_map, dict):
        raise TypeError(f"module_map must be a dict {{module class: wrapper class}}, got {type(module_map).__name__}")
    for source, target in module_map.items():
        for what, cls in (("key", source), ("value", target)):
            if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
                raise TypeError(f"module_map: {what} {cls!r} is not a torch.nn.Module class")


def enable_vram_management_recursively(
    model: torch.nn.Module,
    module_map: dict,
    vram_config: dict,
    vram_limit: float | None = None,
    name_prefix: str = "",
    disk_map: Any = None,
    quantize: Any = None,
    **kwargs: Any,
) -> None:
    """Replaces every child whose class is in module_map by its wrapper, depth first; wrapped
    non-recursive modules have their own children wrapped too. With ``quantize`` (a DiffSynth
    QuantizeConfig), the backend's quantised Linears become AutoWrappedQuantizedModule first."""
    if isinstance(model, AutoWrappedNonRecurseModule):
        model = model.module
    for name, module in model.named_children():
        layer_name = name if name_prefix == "" else name_prefix + "." + name
        if quantize is not None and quantize.is_quantized_linear(module):
            wrapped = AutoWrappedQuantizedModule(
                module,
                **vram_config,
                vram_limit=vram_limit,
                name=layer_name,
                disk_map=disk_map,
                quantize=quantize,
                **kwargs,
            )
            setattr(model, name, wrapped)
            continue
        for source_module, target_module in module_map.items():
            if isinstance(module, source_module):
                wrapped = target_module(
                    module, **vram_config, vram_limit=vram_limit, name=layer_name, disk_map=disk_map, **kwargs
                )
                if isinstance(wrapped, AutoWrappedNonRecurseModule):
                    enable_vram_management_recursively(
                        wrapped,
                        module_map,
                        vram_config,
                        vram_limit=vram_limit,
                        name_prefix=layer_name,
                        disk_map=disk_map,
                        quantize=quantize,
                        **kwargs,
                    )
                setattr(model, name, wrapped)
                break
        else:
            enable_vram_management_recursively(
                module,
                module_map,
                vram_config,
                vram_limit=vram_limit,
                name_prefix=layer_name,
                disk_map=disk_map,
                quantize=quantize,
                **kwargs,
            )


def fill_vram_config(model: torch.nn.Module, vram_config: dict) -> dict:
    """A whole model managed as one layer: onload and preparing become the computation state (and
    DiffSynth's message says so)."""
    filled = vram_config.copy()
    for state in ("onload", "preparing"):
        filled[f"{state}_dtype"] = vram_config["computation_dtype"]
        filled[f"{state}_device"] = vram_config["computation_device"]
    if any(vram_config[k] != filled[k] for k in vram_config):
        print(
            f"No fine-grained VRAM configuration is provided for {model.__class__.__name__}. "
            f"[`onload`, `preparing`, `computation`] will be the same state. `vram_config` is set to {filled}"
        )
    return filled


def _materialize_root_params_from_disk(model: torch.nn.Module, disk_map: Any) -> None:
    """Parameters of the root that no wrapper holds: read from the disk map now."""
    for name, param in list(model.named_parameters(recurse=False)):
        if param is None or not param.is_meta or name not in disk_map:
            continue
        model.register_parameter(name, torch.nn.Parameter(disk_map[name], requires_grad=param.requires_grad))
    for name, buffer in list(model.named_buffers(recurse=False)):
        if buffer is None or name not in disk_map:
            continue
        model.register_buffer(name, disk_map[name], persistent=True)


def enable_vram_management(
    model: torch.nn.Module,
    module_map: dict,
    vram_config: dict,
    vram_limit: float | None = None,
    disk_map: Any = None,
    quantize: Any = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """DiffSynth's enable_vram_management: wraps the modules of model named in module_map (or the
    whole model, when its own class is there), sets ``vram_management_enabled``, and gives every
    wrapped layer of the model one prefetch scheduler. The configuration is checked first (see
    ``check_vram_config``). With ``quantize``, the quantised Linears of its backend become
    AutoWrappedQuantizedModule layers (``metadata``, in kwargs: the checkpoint's, for rebuilding
    pre-quantised layers read from disk)."""
    check_module_map(module_map)
    check_vram_config(vram_config, disk_map)
    for source_module, target_module in module_map.items():
        if isinstance(model, source_module):
            vram_config = fill_vram_config(model, vram_config)
            model = target_module(model, **vram_config, vram_limit=vram_limit, disk_map=disk_map, **kwargs)
            break
    else:
        enable_vram_management_recursively(
            model, module_map, vram_config, vram_limit=vram_limit, disk_map=disk_map, quantize=quantize, **kwargs
        )
        if disk_map is not None:
            _materialize_root_params_from_disk(model, disk_map)
    attach_scheduler(model)
    model.vram_management_enabled = True
    return model


def attach_scheduler(model: torch.nn.Module) -> Scheduler:
    """One scheduler and one memory gauge for every wrapped layer of model (ours; DiffSynth's own
    quantised layers keep their on-demand copies)."""
    scheduler = Scheduler()
    gauge = _MemoryGauge()
    for m in model.modules():
        if type.__instancecheck__(AutoTorchModule, m):
            m.__dict__["_scheduler"] = scheduler
            m.__dict__["_gauge"] = gauge
    return scheduler


def scheduler_of(model: torch.nn.Module) -> Scheduler | None:
    """The prefetch scheduler enable_vram_management gave model's layers (its ``stats`` count hits,
    misses, stale fetches and relearned orders)."""
    for m in model.modules():
        s = m.__dict__.get("_scheduler")
        if s is not None:
            return s
    return None


__all__ = [
    "AutoTorchModule",
    "AutoWrappedLinear",
    "AutoWrappedModule",
    "AutoWrappedNonRecurseModule",
    "AutoWrappedQuantizedModule",
    "DiskMap",
    "LoRAHotLoadMixin",
    "check_vram_config",
    "enable_vram_management",
    "enable_vram_management_recursively",
    "fill_vram_config",
    "get_device_name",
    "parse_device_type",
    "scheduler_of",
]
