"""Command line: ``python -m diffsynth_c hash PATH...`` and ``python -m diffsynth_c convert SRC DST``.

convert turns a checkpoint DiffSynth discourages (.bin/.pth/.ckpt/.pt, read by the C core) or any
file set or folder into safetensors shards plus an index in DST, as diffusers names them. The
model hash is kept: the same keys and shapes, checked after writing.
"""

from __future__ import annotations

import argparse
import sys


def convert(src: list[str], dst: str, max_shard_size: str = "10GB", weights_name: str = "diffusion_pytorch_model") -> list[str]:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffsynth_c", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hash", help="DiffSynth's model hash of a file, a file set or a folder")
    h.add_argument("paths", nargs="+")
    h.add_argument("--no-shape", action="store_true", help="hash the keys only (with_shape=False)")
    c = sub.add_parser("convert", help="a checkpoint, file set or folder into safetensors shards")
    c.add_argument("src", nargs="+")
    c.add_argument("dst")
    c.add_argument("--max-shard-size", default="10GB")
    c.add_argument("--weights-name", default="diffusion_pytorch_model")
    args = ap.parse_args(argv)
    from .loader.file import hash_model_file

    try:
        if args.command == "hash":
            print(hash_model_file(args.paths if len(args.paths) > 1 else args.paths[0], not args.no_shape))
        else:
            for f in convert(args.src, args.dst, args.max_shard_size, args.weights_name):
                print(f)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
