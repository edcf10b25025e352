"""diffusers' conventions for model folders: index files, shards, subfolders, and saving in shards.

A folder resolves to the files a diffusers or transformers model keeps there: the
``*.safetensors.index.json`` (or ``.bin.index.json``) and the shards its ``weight_map`` names, or the
single weights file, or every ``*-0000k-of-0000n.safetensors`` shard. An index is checked before
use: every shard exists, every key is listed once, and each shard holds exactly the keys the
index gives it. ``save_state_dict`` writes shards named as diffusers names them plus the index
(sorted keys, indent 2); the C core writes each file under a temporary name and renames it into
place, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import _core, progress
from ..core.settings import threads
from ..dlpack import safetensors_name_of

WEIGHTS = ("diffusion_pytorch_model", "model", "pytorch_model")
_SAVING = ".saving"  # suffix of the marker of a save in progress (see _commit)
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.(safetensors|bin)$")
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: Any) -> int:
    """Bytes of a size given as an int or a string like "5GB" (10**9) or "500MiB" (2**20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"a size must be positive, not {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"cannot parse the size {size!r} (expected an int or e.g. '5GB', '500MiB')")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"a size must be positive, not {size!r}")
    return value


def _read_index(index_path: str) -> tuple[dict[str, str], Any]:
    """(weight_map, metadata.total_size or None) of an index json, checked for repeated keys."""

    def no_repeats(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise ValueError(f"{index_path}: key '{k}' is listed twice")
            seen[k] = v
        return seen

    with open(index_path, encoding="utf-8") as f:
        try:
            data = json.load(f, object_pairs_hook=no_repeats)
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_path}: not valid JSON: {e}") from None
        except RecursionError:  # Python's decoder recurses once per nesting level
            raise ValueError(f"{index_path}: the JSON nests too deeply to be an index") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path}: no weight_map of tensor names to shard files")
    metadata = data.get("metadata")
    return weight_map, metadata.get("total_size") if isinstance(metadata, dict) else None


def _check_index(index_path: str, folder: str, weight_map: dict[str, str], declared: Any) -> list[str]:
    shards = sorted(set(weight_map.values()))
    paths = []
    for shard in shards:
        p = os.path.join(folder, shard)
        if os.path.basename(shard) != shard or not os.path.isfile(p):
            raise FileNotFoundError(f"{index_path}: shard '{shard}' is missing from {folder}")
        paths.append(p)
    if shards[0].endswith(".safetensors"):
        listed: dict[str, set] = {}
        for k, shard in weight_map.items():
            listed.setdefault(shard, set()).add(k)
        total = 0
        for shard, p in zip(shards, paths):
            tensors = _core.read_header(p)[2]
            names = {t[0] for t in tensors}
            total += sum(t[4] - t[3] for t in tensors)
            if names != listed[shard]:
                extra, missing = sorted(names - listed[shard]), sorted(listed[shard] - names)
                raise ValueError(
                    f"{index_path}: shard '{shard}' does not hold what the index lists"
                    + (f"; not in the shard: {missing[:5]}" if missing else "")
                    + (f"; not in the index: {extra[:5]}" if extra else "")
                )
        if isinstance(declared, float) and declared.is_integer():
            declared = int(declared)  # some writers store 1.5e9; 1e400 parses as infinity and is refused below
        if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int)):
            raise ValueError(f"{index_path}: metadata.total_size must be a whole number of bytes, not {declared!r}")
        if declared is not None and declared != total:
            raise ValueError(
                f"{index_path}: metadata.total_size is {declared} but the shards hold {total} bytes of tensors"
            )
    return paths


def with_variant(name: str, variant: str | None) -> str:
    """A weights file name with diffusers' variant before its last extension, as diffusers and
    transformers name them: "model.safetensors" -> "model.fp16.safetensors",
    "model.safetensors.index.json" -> "model.safetensors.index.fp16.json"."""
    if not variant:
        return name
    head, _, ext = name.rpartition(".")
    return f"{head}.{variant}.{ext}"


def _check_variant(path: str, variant: Any) -> None:
    if variant is not None and (
        not isinstance(variant, str) or not variant or "/" in variant or os.sep in variant or variant in (".", "..")
    ):
        raise ValueError(f"{path}: variant must be a name such as 'fp16', not {variant!r}")


def resolve(path: Any, subfolder: str | None = None, variant: str | None = None) -> list[str]:
    """The weight files of a file or folder path (with an optional subfolder), in load order. With
    ``variant`` (as diffusers takes it, e.g. "fp16"), a folder's files of that variant:
    ``diffusion_pytorch_model.fp16.safetensors``, or the index ``...safetensors.index.fp16.json``
    and its shards; a file path is taken as it is."""
    path = os.fspath(path)
    if subfolder:
        path = os.path.join(path, subfolder)
    _check_variant(path, variant)
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or folder")
        return [path]
    _check_no_unfinished_save(path)
    for ext in ("safetensors", "bin"):
        for stem in WEIGHTS:
            index = os.path.join(path, with_variant(f"{stem}.{ext}.index.json", variant))
            if os.path.isfile(index):
                return _check_index(index, path, *_read_index(index))
        for stem in WEIGHTS:
            single = os.path.join(path, with_variant(f"{stem}.{ext}", variant))
            if os.path.isfile(single):
                return [single]
    shards = sorted(f for f in os.listdir(path) if _SHARD.search(f) and f.endswith(".safetensors"))
    if variant:  # diffusers names a variant's shards "<stem>.<variant>-00001-of-00002.safetensors"
        shards = [f for f in shards if f[: _SHARD.search(f).start()].endswith(f".{variant}")]
        if not shards:
            raise FileNotFoundError(
                errno.ENOENT,
                f"{path}: no weights of variant '{variant}' (looked for "
                f"{with_variant('diffusion_pytorch_model.safetensors', variant)}, "
                f"{with_variant('diffusion_pytorch_model.safetensors.index.json', variant)} and the like)",
                path,
            )
    if shards:
        counts = {_SHARD.search(f).group(2) for f in shards}
        if len(counts) == 1 and len(shards) == int(counts.pop()):
            return [os.path.join(path, f) for f in shards]
        raise FileNotFoundError(f"{path}: the shards there do not form one complete set: {shards[:6]}")
    raise IsADirectoryError(
        errno.EISDIR, f"{path}: is a directory with no index json, weights file or shards of a model", path
    )


def expand(paths: list, variant: str | None = None) -> list:
    """paths with every folder replaced by its weight files (of ``variant``, when given)."""
    out = []
    for p in paths:
        if isinstance(p, (str, os.PathLike)) and os.path.isdir(p):
            out.extend(resolve(p, variant=variant))
        else:
            out.append(p)
    return out


# ---- saving ----------------------------------------------------------------------------------


def plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Groups tensor names in order into shards of at most max_shard_size bytes; a tensor larger than
    that gets a shard of its own (as diffusers / huggingface_hub split state dicts)."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes:
        if size > max_shard_size:
            shards.append([name])
            continue
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards


def _header(tensors: dict[str, Any], metadata: dict | None) -> tuple[bytes, list[tuple[int, int]], list]:
    """The JSON header of one safetensors file, the (address, nbytes) of each tensor in data order,
    and the CPU tensors that own those bytes. Tensors are laid out as safetensors lays them out
    (larger element size first, then by name)."""
    import torch

    owners, entries = [], {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("metadata must map strings to strings")
        entries["__metadata__"] = dict(metadata)
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    items, offset = [], 0
    for name in order:
        t = tensors[name]
        if t.layout != torch.strided:  # safetensors refuses these too (ValueError)
            raise ValueError(f"tensor '{name}': a {t.layout} tensor cannot be saved in safetensors (make it dense)")
        dtype = safetensors_name_of(t.dtype)
        if dtype is None:
            raise ValueError(f"tensor '{name}': dtype {t.dtype} has no safetensors name")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        shape = list(t.shape)
        if dtype == "F4":  # torch packs two float4 values per element; safetensors counts values
            if not shape:
                raise ValueError(f"tensor '{name}': a 0-d float4_e2m1fn_x2 tensor has no safetensors shape")
            shape[-1] *= 2
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        items.append((t.data_ptr(), nbytes))
        owners.append(t)
        offset += nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, items, owners


def save_state_dict(
    state_dict: dict[str, Any],
    path: Any,
    max_shard_size: Any = "10GB",
    metadata: dict | None = None,
    weights_name: str = "diffusion_pytorch_model",
) -> list[str]:
    """Writes state_dict into the folder path as diffusers' save_pretrained does: one
    ``{weights_name}.safetensors``, or shards ``{weights_name}-00001-of-0000N.safetensors`` plus
    ``{weights_name}.safetensors.index.json``. Returns the files written."""
    folder = os.fspath(path)
    if not isinstance(state_dict, dict):
        raise TypeError(f"{folder}: save_state_dict needs a dict of tensors, not {type(state_dict).__name__}")
    if (
        not isinstance(weights_name, str)
        or weights_name in ("", ".", "..")
        or "\0" in weights_name
        or os.path.basename(weights_name) != weights_name
        or "/" in weights_name
    ):
        raise ValueError(f"{folder}: weights_name must be a file name inside the folder, not {weights_name!r}")
    limit = parse_size(max_shard_size)
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise TypeError(f"state dict keys must be strings, not {type(k).__name__} ({k!r})")
        if not hasattr(v, "element_size"):
            raise TypeError(f"'{k}': only tensors can be saved in safetensors, not {type(v).__name__}")
    os.makedirs(folder, exist_ok=True)
    sizes = [(k, v.numel() * v.element_size()) for k, v in state_dict.items()]
    shards = plan_shards(sizes, limit)
    n = len(shards)
    names = (
        [f"{weights_name}.safetensors"]
        if n <= 1
        else [f"{weights_name}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    written = [os.path.join(folder, shard_name) for shard_name in names]
    # Shards are written side by side, one thread each: a file takes its writes one at a time
    # (Linux holds the inode lock through a buffered write), so threads help across files, not
    # within one. A single file gets all the threads (they overlap the disk's queue).
    workers = max(1, min(len(written), threads()))
    # the thread too: two threads of one process may save into one folder at once
    suffix = f".tmp-{threading.get_native_id()}-{os.getpid()}"
    temps = [target + suffix for target in written]

    def write_shard(target: str, keys: list[str]) -> int:
        header, items, owners = _header({k: state_dict[k] for k in keys}, metadata)
        _core.write_file(target, header, items, max(1, threads() // workers))
        del owners
        return sum(n for _, n in items)

    _clear_dead_saves(folder, weights_name)
    # the bar moves (on this thread) once a shard is written and durable
    label = f"Saving {os.path.basename(os.path.normpath(folder))}"
    try:
        with (
            progress.Progress(sum(s for _, s in sizes), label, min_total=progress.LOAD_MIN_BYTES) as bar,
            ThreadPoolExecutor(workers) as pool,
        ):
            jobs = [pool.submit(write_shard, t, k) for t, k in zip(temps, shards or [[]])]
            try:
                for job in jobs:
                    bar.update(job.result())
            except BaseException:
                for job in jobs:
                    job.cancel()  # shards not started are not written; running ones finish or clean up
                raise
    except BaseException:
        for t in temps:
            _remove(t)
        raise
    moves = list(zip(temps, written))
    index_path = os.path.join(folder, f"{weights_name}.safetensors.index.json")
    index_text = None
    if n > 1:
        index = {
            "metadata": {"total_size": sum(s for _, s in sizes)},
            "weight_map": {k: names[i] for i, keys in enumerate(shards) for k in keys},
        }
        index_text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        written.append(index_path)
    try:
        _commit(folder, weights_name, moves, index_path, index_text, suffix)
    except BaseException:
        # what was not renamed goes; a marker left in place keeps the folder refused until a save
        # completes, as the files in place may be a mix
        for t in [*temps, index_path + suffix]:
            _remove(t)
        raise
    return written


def _marker(folder: str, weights_name: str) -> str:
    return os.path.join(folder, f"{weights_name}.safetensors{_SAVING}")


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _commit(
    folder: str, weights_name: str, moves: list[tuple[str, str]], index_path: str, index_text: str | None, suffix: str
) -> None:
    """Puts a save's files in place, all or nothing as a loader sees the folder: every new file is
    already written and fsynced under a temporary name. A marker naming this process goes first;
    while it is there, resolve() refuses the folder. Then the old index goes, the new files are
    renamed into place, the index is written (last of the model files), the shards of an older
    save of the same name that the new one does not use are removed, and the marker goes."""
    marker = _marker(folder, weights_name)
    with _locked(folder):  # a save that commits at the same time waits: the last one is what stays
        _commit_locked(folder, weights_name, moves, index_path, index_text, suffix, marker)


@contextlib.contextmanager
def _locked(folder: str) -> Iterator[None]:
    """An exclusive flock on the folder itself (no lock file left among the model's files), across
    processes and threads (each holder opens the folder itself)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _commit_locked(
    folder: str,
    weights_name: str,
    moves: list[tuple[str, str]],
    index_path: str,
    index_text: str | None,
    suffix: str,
    marker: str,
) -> None:
    with open(marker + suffix, "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker + suffix, marker)
    _fsync_dir(folder)
    _remove(index_path)
    keep = set()
    for tmp, target in moves:
        os.replace(tmp, target)
        keep.add(os.path.basename(target))
    if index_text is not None:
        with open(index_path + suffix, "w", encoding="utf-8") as f:
            f.write(index_text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(index_path + suffix, index_path)
        keep.add(os.path.basename(index_path))
    stale = re.compile(re.escape(weights_name) + r"(-\d{5}-of-\d{5})?\.safetensors")
    for name in os.listdir(folder):
        if name not in keep and stale.fullmatch(name):
            _remove(os.path.join(folder, name))
    _fsync_dir(folder)
    os.remove(marker)
    _fsync_dir(folder)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _clear_dead_saves(folder: str, weights_name: str) -> None:
    """Removes what a save of weights_name into folder left when its process died: temporary files
    (``*.tmp-PID``) and the marker of an unfinished save. Those of a live process stay."""
    tmp = re.compile(re.escape(weights_name) + r"[-.].*\.tmp-(?:\d+-)?(\d+)")
    for name in os.listdir(folder):
        m = tmp.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _remove(os.path.join(folder, name))
    marker = _marker(folder, weights_name)
    pid = _marker_pid(marker)
    if pid is not None and pid != os.getpid() and not _pid_alive(pid):
        _remove(marker)  # the save that follows leaves the folder complete


def _marker_pid(marker: str) -> int | None:
    """The process a save marker names, or None when there is no marker (-1 when it is unreadable)."""
    try:
        with open(marker, encoding="utf-8") as f:
            text = f.read(32).strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else -1


def _check_no_unfinished_save(path: str) -> None:
    """Refuses a folder that a save is writing, or that a save stopped half-way left: its files may
    mix two versions of the model."""
    for name in os.listdir(path):
        if name.endswith(".safetensors" + _SAVING):
            pid = _marker_pid(os.path.join(path, name))
            state = "still running" if pid and pid > 0 and _pid_alive(pid) else "no longer running"
            raise _core.FormatError(
                f"{path}: a save of '{name[: -len('.safetensors' + _SAVING)]}' into this folder has not finished "
                f"(process {pid}, {state}); its files may mix two versions of the model (save it again)"
            )
