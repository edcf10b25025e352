"""Seed corpora for the fuzz harnesses, from the real writers: safetensors files written by
safetensors.torch.save_file (for fuzz_safetensors and fuzz_plan), checkpoints written by
torch.save (whole archives for fuzz_torchfile and fuzz_torchzip, their data.pkl for
fuzz_unpickle), plus every regression input kept in tests/fuzz/regressions/<harness>/.

    python tests/fuzz/make_corpus.py OUT_DIR
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import tempfile
import zipfile

import safetensors.torch
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def state_dicts() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"w": torch.randn(3, 4, generator=g)},
        {
            "a.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
            "a.bias": torch.zeros(8, dtype=torch.float16),
            "ids": torch.arange(5),
            "flag": torch.tensor([True, False]),
            "f8": torch.zeros(4, dtype=torch.float8_e4m3fn),
        },
        {"empty": torch.empty(0, 3), "scalar": torch.tensor(1.5), "u8": torch.arange(3, dtype=torch.uint8)},
        {f"blocks.{i}.weight": torch.randn(2, 2, generator=g) for i in range(12)},
    ]


def main(out: str) -> None:
    dirs = {
        name: os.path.join(out, name)
        for name in ("fuzz_safetensors", "fuzz_torchfile", "fuzz_torchzip", "fuzz_unpickle", "fuzz_plan")
    }
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, sd in enumerate(state_dicts()):
            st = os.path.join(dirs["fuzz_safetensors"], f"seed{i}.safetensors")
            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in sd.items()}, st, metadata={"format": "pt"} if i % 2 else None
            )
            shutil.copy(st, os.path.join(dirs["fuzz_plan"], f"seed{i}.safetensors"))  # the planner's input too
            for j, obj in enumerate((sd, collections.OrderedDict(sd), {"state_dict": sd}, {"model": sd, "step": 3})):
                path = os.path.join(tmp, f"{i}-{j}.bin")
                torch.save(obj, path)
                shutil.copy(path, os.path.join(dirs["fuzz_torchfile"], f"seed{i}-{j}.bin"))
                shutil.copy(path, os.path.join(dirs["fuzz_torchzip"], f"seed{i}-{j}.bin"))
                with zipfile.ZipFile(path) as z:
                    pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
                    with open(os.path.join(dirs["fuzz_unpickle"], f"seed{i}-{j}.pkl"), "wb") as f:
                        f.write(z.read(pkl))
        # a shared storage (two views of one tensor) and a legacy (non-zip) file
        base = torch.randn(16)
        path = os.path.join(dirs["fuzz_torchfile"], "shared.bin")
        torch.save({"a": base, "b": base[4:8], "c": base.view(4, 4).t()}, path)
        torch.save(
            {"a": base}, os.path.join(dirs["fuzz_torchfile"], "legacy.bin"), _use_new_zipfile_serialization=False
        )
    regressions = os.path.join(HERE, "regressions")
    for name, d in dirs.items():
        src = os.path.join(regressions, name)
        if os.path.isdir(src):
            for f in os.listdir(src):
                shutil.copy(os.path.join(src, f), os.path.join(d, "regression-" + f))


if __name__ == "__main__":
    main(sys.argv[1])
