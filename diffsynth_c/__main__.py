"""Command line: ``diffsynth-c`` (or ``python -m diffsynth_c``).

    diffsynth-c inspect FILE...          keys, dtypes, shapes, sizes, metadata, the model hash, and
                                         (DiffSynth installed) which of its models the files are
    diffsynth-c hash FILE...             DiffSynth's model hash of a file, a file set or a folder
    diffsynth-c convert SRC... DST       .bin/.pth/.ckpt (or any file set or folder) into safetensors
                                         shards plus an index, hash preserved
    diffsynth-c bench FILE...            load the files with diffsynth_c and the installed peers
    diffsynth-c download MODEL_ID [PATTERN] [--source modelscope|huggingface] [--local-dir DIR]
                                         fetch a model's files as ModelConfig does; prints the path

Errors go to stderr as one line (the whole traceback with --debug); the exit status is 0 on
success, 1 when the command failed, 2 for a wrong command line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any


def convert(
    src: list[str], dst: str, max_shard_size: str = "10GB", weights_name: str = "diffusion_pytorch_model"
) -> list[str]:
    """Writes the state dict of src into dst as safetensors shards; returns the files written.
    Raises ValueError when the checkpoint holds something safetensors cannot (a nested dict or a
    non-tensor value) and when the written hash differs from the source's."""
    import torch

    from .loader.file import hash_model_file, load_state_dict
    from .loader.folder import save_state_dict

    sd = load_state_dict(src if len(src) > 1 else src[0])
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{', '.join(src)}: values safetensors cannot hold (nested dicts or non-tensors): {bad[:5]}")
    files = save_state_dict(sd, dst, max_shard_size=max_shard_size, weights_name=weights_name)
    before, after = hash_model_file(src if len(src) > 1 else src[0]), hash_model_file(dst)
    if before != after:
        raise ValueError(f"the converted files hash to {after}, the source to {before}")
    return files


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _bits(dtype: str) -> int:
    """Bits per element of a safetensors dtype name (BOOL 8, BF16 16, F8_E4M3 8, C64 64...)."""
    import re

    m = re.match(r"[A-Z]+?(\d+)", dtype)
    return int(m.group(1)) if m else 8


def describe(path: str) -> dict:
    """What inspect prints for one file: format, tensors (name, dtype, shape, bytes), metadata."""
    from . import _core
    from .core.formats import is_safetensors
    from .core.torchfile import read_tree

    if is_safetensors(path):
        _hl, _start, tensors, meta = _core.read_header(path)
        rows = [(name, dtype, list(shape), end - begin) for name, dtype, shape, begin, end in tensors]
        return {"file": path, "format": "safetensors", "tensors": rows, "metadata": dict(meta or {})}
    tree = read_tree(path)
    rows = []
    if tree is not None:
        seen: set[int] = set()  # a dict the checkpoint shares is listed once (and a cycle ends)

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                if id(obj) in seen:
                    return
                seen.add(id(obj))
                for k, v in obj.items():
                    walk(f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}", v)
            elif isinstance(obj, _core.TensorRef):
                n = 1
                for d in obj.shape:
                    n *= d
                rows.append((prefix, obj.dtype, list(obj.shape), n * _bits(obj.dtype) // 8))

        walk("", tree[0])
    return {"file": path, "format": "torch zip checkpoint", "tensors": rows, "metadata": {}}


def _known_models(paths: list[str]) -> list[str]:
    try:
        from .loader.model import detect_model

        return [f"{c['model_name']} ({c['model_class']})" for c in detect_model(paths if len(paths) > 1 else paths[0])]
    except ImportError:
        return []


def inspect(paths: list[str], limit: int, as_json: bool) -> str:
    from .loader.file import hash_model_file
    from .loader.folder import expand

    files = expand(paths)
    reports = [describe(str(p)) for p in files]
    model_hash = hash_model_file(files if len(files) > 1 else files[0])
    models = _known_models([str(p) for p in files])
    if as_json:
        return json.dumps({"files": reports, "model_hash": model_hash, "diffsynth_models": models}, indent=2)
    out = []
    for r in reports:
        sizes = [b for _, _, _, b in r["tensors"] if b is not None]
        out.append(f"{r['file']}: {r['format']}, {len(r['tensors'])} tensors, {_human(sum(sizes))}")
        if r["metadata"]:
            out.append("  metadata: " + ", ".join(f"{k}={v}" for k, v in r["metadata"].items()))
        shown = r["tensors"] if limit <= 0 else r["tensors"][:limit]
        width = max((len(n) for n, *_ in shown), default=0)
        for name, dtype, shape, nbytes in shown:
            size = _human(nbytes) if nbytes is not None else "?"
            out.append(f"  {name.ljust(width)}  {dtype:<8} {shape!s:<20} {size}")
        if len(shown) < len(r["tensors"]):
            out.append(f"  ... {len(r['tensors']) - len(shown)} more (--limit 0 shows all)")
    out.append(f"model hash: {model_hash}")
    out.append(
        "DiffSynth model: "
        + ("; ".join(models) if models else "none of DiffSynth's MODEL_CONFIGS (or DiffSynth not installed)")
    )
    return "\n".join(out)


def _peers() -> dict:
    """Loaders to time, by name: diffsynth_c always, the others when installed."""
    import importlib.util

    from .loader.file import load_state_dict

    loaders = {"diffsynth_c": lambda p: load_state_dict(p)}
    if importlib.util.find_spec("diffsynth"):

        def diffsynth_load(p):
            from diffsynth.core.loader.file import load_state_dict as theirs

            return theirs(p)

        loaders["diffsynth"] = diffsynth_load
    if importlib.util.find_spec("safetensors"):

        def safetensors_load(p):
            from safetensors.torch import load_file

            sd = {}
            for f in p if isinstance(p, list) else [p]:
                sd.update(load_file(f))
            return sd

        loaders["safetensors"] = safetensors_load
    return loaders


def _touch(sd: dict) -> None:
    """Reads one byte of every 4 KiB of every tensor (lazy mappings are not a load)."""
    import torch

    for t in sd.values():
        if isinstance(t, torch.Tensor) and t.numel():
            flat = (
                t.reshape(-1).view(torch.uint8) if t.is_contiguous() else t.contiguous().reshape(-1).view(torch.uint8)
            )
            flat[::4096].sum()


def bench(paths: list[str], repeat: int) -> str:
    from .loader.folder import expand

    files = [str(p) for p in expand(paths)]
    arg = files if len(files) > 1 else files[0]
    total = sum(os.path.getsize(f) for f in files)
    rows = []
    for name, load in _peers().items():
        if name != "diffsynth_c" and any(not f.endswith(".safetensors") for f in files) and name == "safetensors":
            continue
        times = []
        for _ in range(repeat + 1):  # the first run warms the page cache
            t = time.perf_counter()
            sd = load(arg)
            _touch(sd)
            times.append(time.perf_counter() - t)
            del sd
        rows.append((name, statistics.median(times[1:])))
    ours = dict(rows)["diffsynth_c"]
    lines = [
        f"{len(files)} file(s), {_human(total)}, warm page cache, median of {repeat}:",
        f"  {'loader':<12} {'s':>8} {'GB/s':>7} {'time vs ours':>14}",
    ]
    for name, t in rows:
        lines.append(f"  {name:<12} {t:8.3f} {total / t / 1e9:7.2f} {t / ours:13.2f}x")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="diffsynth-c", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--debug", action="store_true", help="print the whole traceback of an error")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    i = sub.add_parser("inspect", help="keys, dtypes, shapes, sizes, metadata and the model hash of files")
    i.add_argument("paths", nargs="+", metavar="FILE", help="files, a file set or a model folder")
    i.add_argument("--limit", type=int, default=40, help="tensors listed per file (0: all; default 40)")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    h = sub.add_parser("hash", help="DiffSynth's model hash of a file, a file set or a folder")
    h.add_argument("paths", nargs="+", metavar="FILE")
    h.add_argument("--no-shape", action="store_true", help="hash the keys only (with_shape=False)")
    c = sub.add_parser("convert", help="a checkpoint, file set or folder into safetensors shards")
    c.add_argument("src", nargs="+")
    c.add_argument("dst")
    c.add_argument("--max-shard-size", default="10GB", help="largest shard, e.g. 5GB or 500MiB (default 10GB)")
    c.add_argument("--weights-name", default="diffusion_pytorch_model", help="file name stem of the shards")
    b = sub.add_parser("bench", help="load files with diffsynth_c and the installed peers, print a table")
    b.add_argument("paths", nargs="+", metavar="FILE")
    b.add_argument("--repeat", type=int, default=3)
    d = sub.add_parser("download", help="a model's files from ModelScope or Hugging Face, as ModelConfig fetches them")
    d.add_argument("model_id")
    d.add_argument(
        "pattern", nargs="?", default=None, help="files inside the repository (fnmatch; 'dir/' for a folder)"
    )
    d.add_argument(
        "--source",
        choices=["modelscope", "huggingface"],
        default=None,
        help="default: DIFFSYNTH_DOWNLOAD_SOURCE, else modelscope",
    )
    d.add_argument("--local-dir", default=None, help="base folder (default: DIFFSYNTH_MODEL_BASE_PATH, else ./models)")
    return ap


def download(model_id: str, pattern: str | None, source: str | None, local_dir: str | None) -> str:
    """Runs ModelConfig.download_if_necessary; returns its path (one per line for several files)."""
    from .loader import config as config_module
    from .loader.config import ModelConfig

    config_module._download_tips_printed = True  # no download-source box: stdout is the path, stderr one line
    config = ModelConfig(
        model_id=model_id, origin_file_pattern=pattern, download_source=source, local_model_path=local_dir
    )
    config.download_if_necessary()
    return "\n".join(config.path) if isinstance(config.path, list) else str(config.path)


def main(argv: list[str] | None = None) -> int:
    """Runs one command of ``diffsynth-c`` (argv: the arguments after the program name, default
    sys.argv[1:]); returns the exit status: 0 done, 1 the command failed, 130 interrupted. A wrong
    command line exits with status 2 (argparse)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hash":
            from .loader.file import hash_model_file

            print(hash_model_file(args.paths if len(args.paths) > 1 else args.paths[0], not args.no_shape))
        elif args.command == "inspect":
            print(inspect(args.paths, args.limit, args.json))
        elif args.command == "convert":
            for f in convert(args.src, args.dst, args.max_shard_size, args.weights_name):
                print(f)
        elif args.command == "bench":
            print(bench(args.paths, max(1, args.repeat)))
        elif args.command == "download":
            print(download(args.model_id, args.pattern, args.source, args.local_dir))
    except KeyboardInterrupt:
        print("diffsynth-c: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; the traceback with --debug
        if args.debug:
            raise
        print(f"diffsynth-c: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
