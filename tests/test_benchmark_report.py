"""benchmarks/report.py on small made-up results files: it writes the generated section of the page
between its markers (keeping the hand-written text around it), draws the PNG plots, replaces the
section on a rerun instead of adding one, and says "not measured" for what has no results."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINE = {
    "cpu": "Test CPU 9000",
    "cores": 2,
    "ram_gib": 23.5,
    "kernel": "6.1.0-test",
    "python": "3.11.7",
    "text": "2 x Test CPU 9000, 24 GiB RAM, Linux 6.1.0-test, Python 3.11.7",
}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(ROOT, "benchmarks", "report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _doc(benchmark: str, **data) -> dict:
    return {
        "benchmark": benchmark,
        "date": "2026-12-01 12:00 UTC",
        "machine": MACHINE,
        "command": f"python benchmarks/{benchmark}.py",
        **data,
    }


def _load(size: int, ours_s: float, scenarios=("warm", "cold")) -> dict:
    figures = {}
    for key in scenarios:
        loaders, rows = {}, []
        for name, s in (("diffsynth_c", ours_s), ("diffsynth", ours_s * 1.5), ("safetensors", ours_s * 2)):
            loaders[name] = {
                "total": s,
                "call": s / 2,
                "gbps": size / s / 1e9,
                "peak": 100.0,
                "identical": True,
                "runs_s": [s, s * 1.01, s * 0.99],
                "bytes": size,
            }
            rows.append([name, f"{s:.3f}", f"{s / 2:.3f}", f"{size / s / 1e9:.2f}", "100", f"{s / ours_s:.2f}x", "yes"])
        loaders["fastsafetensors"] = {"error": "ImportError: nope"}
        figures[key] = {
            "title": f"scenario {key}",
            "loaders": loaders,
            "table": {
                "title": key,
                "header": [
                    "loader",
                    "total s (median)",
                    "call s",
                    "GB/s",
                    "peak RSS MiB",
                    "time vs diffsynth_c",
                    "identical",
                ],
                "rows": rows,
            },
        }
    return _doc(
        "load",
        size_gib=size / 2**30,
        size_bytes=size,
        shards=4,
        repeat=3,
        ceilings_gbps={"pread_prefaulted": 9.0, "pread_fresh": 6.0, "memcpy": 13.0, "pread_cold": 1.0},
        scenarios=figures,
        unavailable={"instanttensor": "CUDA only"},
    )


def _write_results(folder, ours_s: float, gpu: bool = False) -> None:
    folder.mkdir(exist_ok=True)
    docs = {
        "load-1GiB": _load(1 << 30, ours_s, ("warm", "cold", "bf16-to-f32")),
        "load-0.25GiB": _load(1 << 28, ours_s / 4, ("warm",)),
        "hash": _doc(
            "hash",
            repeat=20,
            files=9,
            same_hash=True,
            model_configs=["qwen_image_dit"],
            ms={"diffsynth": 3.4, "diffsynth_c": 0.7},
            hash="abc",
            table={"title": "hash", "header": ["function", "ms"], "rows": [["diffsynth", "3.40"]]},
        ),
        "model_load": _doc(
            "model_load",
            size_gib=1,
            size_bytes=1 << 30,
            shards=4,
            layers=2,
            repeat=3,
            load_model={
                "load_model": {"diffsynth_c": {"s": 0.1}, "diffsynth": {"s": 0.2}},
                "load_model (use_disk_map)": {"diffsynth_c": {"s": 0.2}, "diffsynth": {"s": 1.5}},
            },
            disk_map={
                "diffsynth_c": {"first_tensor_ms": 1.1, "all_keys_s": 0.1, "gbps": 10.0},
                "diffsynth": {"first_tensor_ms": 9.3, "all_keys_s": 1.0, "gbps": 1.0},
            },
            tables=[{"title": "DiskMap", "header": ["library", "ms"], "rows": [["diffsynth_c", "1.1"]]}],
        ),
    }
    if gpu:
        docs["gpu_load"] = _doc(
            "gpu_load",
            gpu="Test GPU",
            pinned_h2d_gbps=50.0,
            loads={
                "bf16 file, as stored": {"diffsynth_c": {"s": 0.1, "gbps": 40.0}, "diffsynth": {"s": 0.5, "gbps": 8.0}}
            },
            tables=[{"title": "gpu loads", "header": ["loader", "GB/s"], "rows": [["diffsynth_c", "40.00"]]}],
            missed=[],
        )
    for name, doc in docs.items():
        (folder / f"{name}.json").write_text(json.dumps(doc))


def _run(report, tmp_path) -> str:
    assert (
        report.main(
            [
                "--results",
                str(tmp_path / "results"),
                "--doc",
                str(tmp_path / "docs" / "benchmarks.md"),
                "--img",
                str(tmp_path / "docs" / "img"),
            ]
        )
        == 0
    )
    return (tmp_path / "docs" / "benchmarks.md").read_text()


def test_report_writes_the_section_and_plots_and_replaces_them_on_a_rerun(report, tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "benchmarks.md"
    page.write_text("# Benchmarks\n\n## Commands\n\nhand-written\n")
    _write_results(tmp_path / "results", 0.5)
    text = _run(report, tmp_path)
    assert text.startswith("# Benchmarks\n\n## Commands\n\nhand-written\n")
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert "Test CPU 9000, 2 cores, 24 GiB RAM, Linux 6.1.0-test" in text
    assert "| diffsynth_c " in text and "1.50x" in text  # the headline ratio of diffsynth to ours
    assert "Not measured: instanttensor (CUDA only)." in text
    assert "Not measured: no GPU lent." in text
    assert "Not measured in this run (no results of `benchmarks/save.py`)." in text
    for name in ("load-by-loader.png", "load-by-size.png", "hash.png", "diskmap.png"):
        data = (tmp_path / "docs" / "img" / name).read_bytes()
        assert data.startswith(PNG) and 5_000 < len(data) < 200_000, (name, len(data))
        assert f"](img/{name})" in text
    assert not (tmp_path / "docs" / "img" / "gpu.png").exists()

    # hand-written text after the section survives; the rerun replaces the section with new figures
    page.write_text(text + "\n## After\n\nmore prose\n")
    _write_results(tmp_path / "results", 0.3, gpu=True)
    again = _run(report, tmp_path)
    assert again.count(report.BEGIN) == 1 and again.count(report.END) == 1
    assert again.startswith("# Benchmarks\n\n## Commands\n\nhand-written\n")
    assert again.endswith("## After\n\nmore prose\n")
    generated = again.split(report.BEGIN)[1]
    assert f"| {(1 << 30) / 0.3 / 1e9:.2f} " in generated and f"{(1 << 30) / 0.5 / 1e9:.2f}" not in generated
    assert "Not measured: no GPU lent." not in again and "Test GPU" in again
    assert (tmp_path / "docs" / "img" / "gpu.png").read_bytes().startswith(PNG)


def test_no_results_is_an_error_not_an_empty_page(report, tmp_path):
    (tmp_path / "results").mkdir()
    assert (
        report.main(
            ["--results", str(tmp_path / "results"), "--doc", str(tmp_path / "b.md"), "--img", str(tmp_path / "img")]
        )
        == 1
    )
    assert not (tmp_path / "b.md").exists()


def test_a_noisy_run_is_called_noisy(report):
    doc = _load(1 << 30, 0.5, ("warm",))
    assert report.noise_note([doc]) is None
    doc["scenarios"]["warm"]["loaders"]["diffsynth"]["runs_s"] = [0.5, 1.0]
    assert "2.00x (diffsynth, warm" in report.noise_note([doc])
