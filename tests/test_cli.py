"""The command line (diffsynth-c / python -m diffsynth_c): inspect, hash, bench, errors and exit
codes. convert is tested with the folders it writes (test_folders.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import safetensors.torch
import torch
from diffsynth.core.loader.file import hash_model_file as ds_hash_model_file

from .test_model_loading import lpips_file


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffsynth_c", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_inspect_lists_tensors_metadata_hash_and_the_diffsynth_model(tmp_path):
    p = lpips_file(tmp_path)
    r = cli("inspect", p, "--limit", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{p}: safetensors, ")
    assert f"model hash: {ds_hash_model_file(p)}" in lines
    assert "image_metrics_lpips_squeeze" in lines[-1]
    assert "more (--limit 0 shows all)" in r.stdout


def test_inspect_json_and_torch_checkpoints(tmp_path):
    st = str(tmp_path / "a.safetensors")
    safetensors.torch.save_file(
        {"w": torch.zeros(4, 3, dtype=torch.bfloat16), "ids": torch.zeros(5, dtype=torch.int64)},
        st,
        metadata={"format": "pt"},
    )
    r = cli("inspect", st, "--json")
    report = json.loads(r.stdout)
    assert report["files"][0]["tensors"] == [["ids", "I64", [5], 40], ["w", "BF16", [4, 3], 24]]
    assert report["files"][0]["metadata"] == {"format": "pt"}
    assert report["model_hash"] == ds_hash_model_file(st)
    bin_path = str(tmp_path / "m.bin")
    torch.save({"x": torch.zeros(2, 2), "n": {"y": torch.ones(3, dtype=torch.float16)}}, bin_path)
    report = json.loads(cli("inspect", bin_path, "--json").stdout)
    assert report["files"][0]["format"] == "torch zip checkpoint"
    assert report["files"][0]["tensors"] == [["x", "F32", [2, 2], 16], ["n.y", "F16", [3], 6]]
    assert report["model_hash"] == ds_hash_model_file(bin_path)


def test_hash_and_bench(tmp_path):
    st = str(tmp_path / "a.safetensors")
    safetensors.torch.save_file({"w": torch.randn(256, 256)}, st)
    r = cli("hash", st)
    assert r.returncode == 0 and r.stdout.strip() == ds_hash_model_file(st)
    r = cli("bench", st, "--repeat", "1")
    assert r.returncode == 0, r.stderr
    loaders = [line.split()[0] for line in r.stdout.splitlines()[2:]]
    assert loaders == ["diffsynth_c", "diffsynth", "safetensors"]


def test_errors_are_one_line_unless_debug(tmp_path):
    missing = str(tmp_path / "missing.safetensors")
    r = cli("inspect", missing)
    assert r.returncode == 1
    assert (
        r.stderr.startswith("diffsynth-c: error: ")
        and "missing.safetensors" in r.stderr
        and "Traceback" not in r.stderr
    )
    r = cli("--debug", "hash", missing)
    assert r.returncode == 1 and "Traceback" in r.stderr
    r = cli()
    assert r.returncode == 2 and "usage: diffsynth-c" in r.stderr
    r = cli("--help")
    assert r.returncode == 0 and "inspect FILE" in r.stdout


def test_download_prints_the_path_and_fails_with_one_line(tmp_path):
    import os

    from .hub import Hub

    hub = Hub()
    hub.add_repo("owner/model", {"model.safetensors": b"x" * 1000, "sub/a.json": b"{}"})
    hub.start()
    try:
        env = dict(os.environ, MODELSCOPE_ENDPOINT=hub.url, HF_ENDPOINT=hub.url)
        run = lambda *a: subprocess.run(
            [sys.executable, "-m", "diffsynth_c", *a],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=False,
        )
        r = run("download", "owner/model", "model.safetensors", "--local-dir", str(tmp_path))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == os.path.join(str(tmp_path), "owner/model", "model.safetensors")
        assert (tmp_path / "owner/model/model.safetensors").read_bytes() == b"x" * 1000
        r = run("download", "nobody/none", "--source", "huggingface", "--local-dir", str(tmp_path))
        assert r.returncode == 1 and r.stderr.startswith("diffsynth-c: error: ") and "nobody/none" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        hub.stop()


def test_patch_puts_our_model_config_in_diffsynth():
    import diffsynth.core
    import diffsynth.core.loader.config as ds_config

    import diffsynth_c

    diffsynth_c.patch_diffsynth()
    try:
        assert (
            ds_config.ModelConfig is diffsynth_c.ModelConfig and diffsynth.core.ModelConfig is diffsynth_c.ModelConfig
        )
    finally:
        diffsynth_c.unpatch_diffsynth()
    assert ds_config.ModelConfig is not diffsynth_c.ModelConfig
