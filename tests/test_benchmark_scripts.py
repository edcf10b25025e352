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
    env["DIFFSYNTH_C_CGROUP_ROOT"] = str(tmp_path / "no-such-cgroup")
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
    assert "cgroup v1 memory group" in r.stderr and "no-such-cgroup" in r.stderr
    assert not os.path.exists(tmp_path / "bench" / "offload-stack-h2048-b42-4x")
