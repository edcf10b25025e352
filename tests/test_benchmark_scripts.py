"""The benchmark scripts run as the README runs them: `python benchmarks/x.py` from any folder,
without PYTHONPATH (the demo is the README's main command)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hash_benchmark_runs_from_anywhere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DIFFSYNTH_C_BENCH_DIR"] = str(tmp_path)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "hash.py"), "--repeat", "1"],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "same hash: True" in r.stdout and "qwen_image_dit" in r.stdout


def test_offload_pressure_says_what_is_missing_without_a_cgroup_v1_memory_controller(tmp_path):
    """--pressure needs a cgroup v1 memory group: where the controller is not mounted it stops with
    a message saying so (exit 2), before writing any model file."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DIFFSYNTH_C_BENCH_DIR"] = str(tmp_path / "bench")
    env["DIFFSYNTH_C_CGROUP_V1"] = str(tmp_path / "no-such-cgroup")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "offload.py"), "--device", "cpu", "--pressure"],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--pressure needs the cgroup v1 memory controller" in r.stderr and "no-such-cgroup" in r.stderr
    assert not os.path.exists(tmp_path / "bench" / "offload-stack-h2048-b42-4x")


# ---- benchmarks/pipeline.py: bad input, clean-up, file layouts (no multi-GB files) ----------


def _pipeline_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pipeline", os.path.join(ROOT, "benchmarks", "pipeline.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_pipeline"] = mod  # its dataclasses look their module up there
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    return mod


def test_pipeline_without_cgroup_v1_says_so_before_generating_anything(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DIFFSYNTH_C_BENCH_DIR"] = str(tmp_path / "bench")
    env["DIFFSYNTH_C_CGROUP_V1"] = str(tmp_path / "no-cgroup-here")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "pipeline.py"), "--limited"],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "needs the cgroup v1 memory controller" in r.stderr and "no-cgroup-here" in r.stderr
    assert not any(f.endswith((".safetensors", ".pth")) for _, _, fs in os.walk(tmp_path) for f in fs)


def test_pipeline_rejects_unknown_cases_and_models(tmp_path):
    for args, words in (
        (["--vram", "fp4"], "unknown case 'fp4'"),
        (["--without", "unet"], "has no 'unet'"),
        (["--cache", "hot"], "unknown 'hot'"),
        (["--device", "cuda", "--vram", "disk"], "use --vram none"),
    ):
        r = subprocess.run(
            [sys.executable, os.path.join(ROOT, "benchmarks", "pipeline.py"), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr[-1000:])


def test_pipeline_no_space_is_a_clear_message_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    pb = _pipeline_module()
    made = tmp_path / "made"
    monkeypatch.delenv("DIFFSYNTH_C_BENCH_DIR", raising=False)
    monkeypatch.setattr(pb.tempfile, "mkdtemp", lambda prefix="": (made.mkdir(), str(made))[1])
    monkeypatch.setattr(
        pb.shutil, "disk_usage", lambda p: __import__("shutil")._ntuple_diskusage(1 << 40, 1 << 40, 1 << 20)
    )
    assert pb.main(["--without", "text_encoder"]) == 2
    err = capsys.readouterr().err
    assert "not enough space in" in err and "GiB are free" in err and "DIFFSYNTH_C_BENCH_DIR" in err
    assert not made.exists()


def _fake_runs(pb, monkeypatch, tmp_path):
    """generate() writes one small file, run_child() returns figures: the clean-up logic alone."""

    def generate(root, pipe, roles, source, pth):
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, "model.safetensors")
        with open(path, "wb") as f:
            f.write(b"x" * 4096)
        return {"dit": [path]}

    def run_child(job, cgroup=None, timeout=0):
        return {"call_s": 1.0, "total_s": 1.0, "peak_mib": 1.0, "load_peak_mib": 1.0, "fingerprint": {"dit": "same"}}

    monkeypatch.setattr(pb, "generate", generate)
    monkeypatch.setattr(pb, "run_child", run_child)


def test_pipeline_removes_what_it_generated_unless_told_to_keep(tmp_path, monkeypatch, capsys):
    pb = _pipeline_module()
    _fake_runs(pb, monkeypatch, tmp_path)
    monkeypatch.delenv("DIFFSYNTH_C_BENCH_DIR", raising=False)
    folders = []

    def mkdtemp(prefix=""):
        d = tmp_path / f"tmp{len(folders)}"
        d.mkdir()
        folders.append(d)
        return str(d)

    monkeypatch.setattr(pb.tempfile, "mkdtemp", mkdtemp)
    assert pb.main(["--repeat", "1", "--vram", "none", "--cache", "warm"]) == 0
    assert not folders[0].exists()
    assert "parameters bit-identical, plain and patched, in every run: yes" in capsys.readouterr().out
    assert pb.main(["--repeat", "1", "--vram", "none", "--cache", "warm", "--keep"]) == 0
    assert (folders[1] / "pipeline" / "model.safetensors").exists()
    kept = tmp_path / "kept"
    monkeypatch.setenv("DIFFSYNTH_C_BENCH_DIR", str(kept))
    assert pb.main(["--repeat", "1", "--vram", "none", "--cache", "warm"]) == 0
    assert (kept / "pipeline" / "model.safetensors").exists() and len(folders) == 2


def test_pipeline_files_hash_to_their_model_configs_entries(tmp_path):
    """Every model of every pipeline, written with its real names and shapes (sparse: headers
    only), is recognised by DiffSynth's own hash."""
    from diffsynth.core import hash_model_file

    pb = _pipeline_module()
    for pipe in pb.PIPELINES.values():
        for m in pipe.models:
            files = [f for f in (m.redirected,) if f] or list(m.files)
            if not files[0].endswith(".safetensors"):
                continue
            paths = [str(tmp_path / f"{pipe.name}-{m.role}-{f}") for f in files]
            for path, part in zip(paths, pb.split_layout(pb.model_layout(m), len(paths))):
                pb.write_safetensors_streamed(path, part, m.dtype, sparse=True)
            assert hash_model_file(paths if len(paths) > 1 else paths[0]) == m.model_hash, (pipe.name, m.role)
