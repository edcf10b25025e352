"""Mutation fuzzing of the C parsers, in a child process so that a crash is seen as a crash: every
mutated file must give a result or a Python exception, never a signal. Deterministic seeds; a few
thousand cases per run (the long runs belong to issue 10's fuzz target)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import io, os, random, sys, zipfile, torch, warnings
import diffsynth_c
from diffsynth_c import _core
from diffsynth_c.loader.file import load_state_dict_from_bin
warnings.simplefilter("ignore")
seed, n, kind, base_path, tmp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rnd = random.Random(seed)
base = open(base_path, "rb").read()
pkl = None
if kind == "pickle":
    with zipfile.ZipFile(base_path) as z:
        name = next(i for i in z.namelist() if i.endswith("data.pkl"))
        pkl = z.read(name)
        others = [(i, z.read(i)) for i in z.namelist() if not i.endswith("data.pkl")]

def mutate(data):
    b = bytearray(data)
    for _ in range(rnd.randint(1, 8)):
        op = rnd.random()
        if op < 0.5 and b:
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif op < 0.7 and b:
            del b[rnd.randrange(len(b)):][: rnd.randint(1, 64)]
        elif op < 0.85:
            i = rnd.randrange(len(b) + 1)
            b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16)))
        elif b:
            b = b[: rnd.randrange(len(b))]
    return bytes(b)

for i in range(n):
    path = os.path.join(tmp, f"case{i % 4}" + (".safetensors" if kind == "safetensors" else ".bin"))
    if kind == "pickle":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", mutate(pkl))
            for name, data in others:
                z.writestr(name, data)
    else:
        with open(path, "wb") as f:
            f.write(mutate(base))
    print(i, flush=True) if i % 500 == 0 else None
    for fn in (diffsynth_c.hash_model_file, diffsynth_c.load_state_dict):
        try:
            r = fn(path)
            if isinstance(r, dict):
                for v in r.values():
                    if isinstance(v, torch.Tensor) and v.numel():
                        v.reshape(-1)[:1].clone()
        except Exception:
            pass
print("done")
"""


def _run(kind: str, base: str, tmp_path, seed: int, n: int) -> None:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(seed), str(n), kind, base, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=ROOT),
        check=False,
    )
    if r.returncode < 0:
        raise AssertionError(
            f"{kind} fuzz (seed {seed}) killed by {signal.Signals(-r.returncode).name} after case "
            f"{r.stdout.split()[-1] if r.stdout.split() else '?'}"
        )
    assert r.returncode == 0 and r.stdout.strip().endswith("done"), r.stderr[-2000:]


def _checkpoint(tmp_path) -> str:
    p = str(tmp_path / "base.bin")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    torch.save(
        {
            "a": base,
            "v": base[1:, 2:],
            "n": {"b": torch.ones(3, dtype=torch.bfloat16)},
            "f8": torch.zeros(5, dtype=torch.float8_e4m3fn),
            "p": torch.nn.Parameter(torch.ones(2)),
        },
        p,
    )
    return p


def test_fuzz_torch_checkpoint_bytes(tmp_path):
    _run("raw", _checkpoint(tmp_path), tmp_path, 1, 1500)


def test_fuzz_pickle_stream(tmp_path):
    _run("pickle", _checkpoint(tmp_path), tmp_path, 2, 2000)


def test_fuzz_safetensors_bytes(tmp_path):
    from safetensors.torch import save_file

    p = str(tmp_path / "base.safetensors")
    save_file(
        {"a": torch.randn(4, 6), "b": torch.ones(3, dtype=torch.bfloat16), "e": torch.empty(0)},
        p,
        metadata={"format": "pt"},
    )
    _run("safetensors", p, tmp_path, 3, 1500)
