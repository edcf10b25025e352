"""``device_map`` and ``max_memory``: a model's top-level blocks placed on several devices, as
diffusers places them.

``plan_device_map`` decides; ``load_placed`` loads. The units of placement are the model's
children in registration order (the order they run in for a DiT), with containers
(``ModuleList``, ``ModuleDict``, ``Sequential``) opened into their children, and the root's own
parameters and buffers one by one. A unit is never split. Strategies:

- ``"cuda"``, ``"cuda:N"``, ``"cpu"`` (or a ``torch.device``): the whole model there;
  ``hf_device_map`` is ``{"": device}``.
- ``"auto"``: units in order fill the first GPU up to its ``max_memory``, then the next, then
  the CPU, then the disk when ``max_memory`` names ``"disk"``.
- ``"balanced"``: the same, with each GPU's share capped at an equal part of the model (plus the
  largest unit, so that whole blocks fit).
- a dict ``{module name: device}``: as given (every weight must be covered by a name or a prefix).

Without ``max_memory``, a GPU offers 90% of its free memory and the CPU 90% of the available host
memory; the disk is never used unless named. Units on the disk keep their weights on the meta
device and read them from the files (a ``DiskMap``) onto the execution device (the first GPU, or
the CPU) just before they run, and drop them after. Every placed unit gets a forward pre-hook
that moves tensor arguments to its device, so activations follow the blocks.
"""

from __future__ import annotations

from typing import Any

STRATEGIES = ("auto", "balanced", "cuda", "cpu")
_CONTAINERS = ("ModuleList", "ModuleDict", "Sequential")


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def parse_max_memory(max_memory: dict | None) -> dict:
    """{0: bytes, 1: bytes, "cpu": bytes, "disk": bytes or inf}: GPU keys as ints ("cuda:1" -> 1),
    sizes as parse_size takes them; the disk's size may be None (no limit)."""
    from .folder import parse_size

    out: dict = {}
    for key, value in (max_memory or {}).items():
        if isinstance(key, str) and key.startswith("cuda"):
            key = int(key.split(":", 1)[1]) if ":" in key else 0
        if not (key in ("cpu", "disk") or (isinstance(key, int) and not isinstance(key, bool) and key >= 0)):
            raise ValueError(f"max_memory: unknown device {key!r} (GPU indexes, 'cuda:N', 'cpu' or 'disk')")
        out[key] = float("inf") if key == "disk" and value is None else parse_size(value)
    return out


def _host_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def default_budgets(max_memory: dict | None) -> dict:
    """The devices a plan may use, in order (GPUs, then "cpu", then "disk"), with their bytes."""
    import torch

    given = parse_max_memory(max_memory)
    budgets: dict = {}
    gpus = sorted(k for k in given if isinstance(k, int))
    if not gpus and max_memory is None and torch.cuda.is_available():
        gpus = list(range(torch.cuda.device_count()))
    for g in gpus:
        budgets[g] = given[g] if g in given else int(torch.cuda.mem_get_info(g)[0] * 0.9)
    budgets["cpu"] = given.get("cpu", int(_host_available() * 0.9))
    if "disk" in given:
        budgets["disk"] = given["disk"]
    return budgets


def _tensor_bytes(name: str, t: Any, torch_dtype: Any, keep: list) -> int:
    import torch

    if (t.is_floating_point() or t.is_complex()) and torch_dtype is not None:
        dtype = torch.float32 if keep and any(m in name.split(".") for m in keep) else torch_dtype
        return t.numel() * torch.empty((), dtype=dtype).element_size()
    return t.numel() * t.element_size()


def placement_units(model: Any, torch_dtype: Any = None, keep: list | None = None) -> list[tuple[str, int]]:
    """(name, bytes in the loaded dtype) of every unit of placement, in order."""
    keep = keep or []
    units: list[tuple[str, int]] = []
    for name, t in list(model.named_parameters(recurse=False)) + list(model.named_buffers(recurse=False)):
        units.append((name, _tensor_bytes(name, t, torch_dtype, keep)))

    def walk(prefix: str, module: Any) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if type(child).__name__ in _CONTAINERS and len(child._parameters) == 0 and len(child._buffers) == 0:
                walk(full + ".", child)
                continue
            size = sum(
                _tensor_bytes(full + "." + n, t, torch_dtype, keep)
                for n, t in list(child.named_parameters()) + list(child.named_buffers())
            )
            units.append((full, size))

    walk("", model)
    return units


def plan_device_map(units: list[tuple[str, int]], strategy: str, budgets: dict) -> dict:
    """{unit name: device} for "auto" or "balanced" over budgets (see default_budgets). Raises
    ValueError naming the unit that fits nowhere."""
    if strategy not in ("auto", "balanced"):
        raise ValueError(
            f"device_map: unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}, "
            "'cuda:N', a torch.device or a dict"
        )
    left = dict(budgets)
    gpus = [d for d in budgets if isinstance(d, int)]
    if strategy == "balanced" and len(gpus) > 1:
        total = sum(size for _, size in units)
        largest = max((size for _, size in units), default=0)
        for g in gpus:
            left[g] = min(left[g], total // len(gpus) + largest)
    order = list(budgets)
    plan: dict = {}
    at = 0
    for name, size in units:
        while at < len(order) and size > left[order[at]]:
            at += 1  # whole blocks in order: once a device is full, the next one
        if at == len(order):
            room = ", ".join(f"{d}: {_gib(max(left[d], 0))} left" for d in order)
            raise ValueError(
                f"device_map={strategy!r}: '{name}' needs {_gib(size)} and no device has room for it ({room}); "
                "raise max_memory or allow 'disk' (max_memory={..., 'disk': None})"
            )
        plan[name] = order[at]
        left[order[at]] -= size
    return plan


def _device_of(where: Any) -> Any:
    import torch

    if isinstance(where, int):
        return torch.device("cuda", where)
    return torch.device(where)


def _move(obj: Any, device: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device) if obj.device != device else obj
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _submodule(model: Any, name: str) -> Any:
    return model.get_submodule(name) if name else model


def _owner(model: Any, key: str) -> tuple[Any, str]:
    """(module, attribute) holding the tensor under a state-dict key."""
    mod, _, attr = key.rpartition(".")
    return _submodule(model, mod), attr


def _set_tensor(model: Any, key: str, value: Any) -> None:
    import torch

    module, attr = _owner(model, key)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = torch.nn.Parameter(
            value, requires_grad=old.requires_grad if old is not None else False
        )
    else:
        module._buffers[attr] = value


def _inputs_to(device: Any) -> Any:
    def hook(module: Any, args: tuple, kwargs: dict) -> tuple:
        return _move(args, device), _move(kwargs, device)

    return hook


def load_placed(
    model: Any,
    path: Any,
    device_map: Any,
    max_memory: Any,
    torch_dtype: Any,
    keep: list,
    state_dict_converter: Any,
    cast: Any,
) -> Any:
    """Loads the weights of the meta-built model onto the devices of device_map (a strategy or a
    dict), installs the hooks, sets ``hf_device_map``. cast(name, tensor) applies torch_dtype and
    the kept-fp32 modules."""
    import torch

    from ..vram.disk_map import DiskMap

    budgets = default_budgets(max_memory)
    if isinstance(device_map, dict):
        plan = {name: (where if isinstance(where, (int, str)) else str(where)) for name, where in device_map.items()}
    else:
        plan = plan_device_map(placement_units(model, torch_dtype, keep), device_map, budgets)
    execution = next((_device_of(d) for d in plan.values() if d != "disk"), torch.device("cpu"))
    source = DiskMap(path, "cpu", torch_dtype=None if keep else torch_dtype, state_dict_converter=state_dict_converter)
    expected = list(model.state_dict().keys())
    covering: dict[str, str] = {}
    for key in expected:
        unit = max((n for n in plan if n == "" or key == n or key.startswith(n + ".")), key=len, default=None)
        if unit is None:
            raise ValueError(f"device_map: no entry places '{key}' (name its module or a prefix of it)")
        covering[key] = unit
    missing = [k for k in expected if k not in source]
    unexpected = [k for k in source if k not in set(expected)]
    if missing or unexpected:
        paths = ", ".join(map(str, source.path))
        raise RuntimeError(
            f"{paths}: Error(s) in loading state_dict for {type(model).__name__}: "
            f"missing key(s) {missing[:8]}, unexpected key(s) {unexpected[:8]}"
        )
    for name in list(plan):  # a root tensor is not a module: it cannot be read on demand
        if plan[name] == "disk" and not _is_module(model, name):
            plan[name] = execution.index if execution.type == "cuda" else "cpu"
    resident = [k for k in expected if plan[covering[k]] != "disk"]
    source.prefetch(resident)
    for key in resident:
        _set_tensor(model, key, cast(key, source[key]).to(_device_of(plan[covering[key]])))
    # what the files do not hold (non-persistent buffers) follows its unit too
    in_file = set(expected)
    for key, t in list(model.named_buffers()):
        if key not in in_file:
            unit = max((n for n in plan if n == "" or key == n or key.startswith(n + ".")), key=len, default="")
            where = plan.get(unit, "cpu")
            _set_tensor(model, key, cast(key, t).to(execution if where == "disk" else _device_of(where)))
    disk_units = [n for n, d in plan.items() if d == "disk"]
    for i, name in enumerate(plan):
        where = plan[name]
        module = _submodule(model, name) if name == "" or _is_module(model, name) else None
        if module is None or name == "":
            continue
        device = execution if where == "disk" else _device_of(where)
        module.register_forward_pre_hook(_inputs_to(device), with_kwargs=True)
        if where == "disk":
            keys = [k for k in expected if covering[k] == name]
            following = disk_units[disk_units.index(name) + 1 : disk_units.index(name) + 2]
            ahead = [k for k in expected if following and covering[k] == following[0]]
            _disk_hooks(model, module, keys, ahead, source, cast, device)
    model.hf_device_map = {n: d for n, d in plan.items()}
    return model


def _is_module(model: Any, name: str) -> bool:
    import torch

    try:
        return isinstance(model.get_submodule(name), torch.nn.Module)
    except AttributeError:
        return False


def _disk_hooks(model: Any, module: Any, keys: list, ahead: list, source: Any, cast: Any, device: Any) -> None:
    """Weights of a disk unit: read onto device before its forward (and the next disk unit's read
    started), back to the meta device after it."""

    def before(mod: Any, args: tuple, kwargs: dict) -> None:
        if ahead:
            source.prefetch(ahead)
        for key in keys:
            _set_tensor(model, key, cast(key, source[key]).to(device))

    def after(mod: Any, args: tuple, kwargs: dict, output: Any) -> None:
        for key in keys:
            module_, attr = _owner(model, key)
            current = module_._parameters.get(attr) if attr in module_._parameters else module_._buffers.get(attr)
            _set_tensor(model, key, current.detach().to("meta"))

    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(after, with_kwargs=True)
