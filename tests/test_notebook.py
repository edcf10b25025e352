"""docs/quickstart.ipynb runs top to bottom on the CPU and finds diffsynth_c's tensors identical to DiffSynth's.

The notebook is executed with nbclient on a kernel of this very interpreter (a kernel spec written
for the test, so no other Python installed on the machine is picked), from docs/ and with this
checkout importable, as a reader of a plain checkout would run it.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat", reason="requirements/dev.txt installs nbformat")
nbclient = pytest.importorskip("nbclient", reason="requirements/dev.txt installs nbclient")
pytest.importorskip("ipykernel", reason="requirements/dev.txt installs ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "docs", "quickstart.ipynb")
KERNEL = "diffsynth-c-test"


def _text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append(o.get("text", ""))
        elif "data" in o:
            out.append(o["data"].get("text/plain", ""))
    return "".join(out)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the outputs before committing"


def test_quickstart_runs_and_matches_diffsynth(tmp_path, monkeypatch):
    spec = tmp_path / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "diffsynth_c test (this interpreter)",
                "language": "python",
                "env": {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))},
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no profile or history written to $HOME
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=120,
        resources={"metadata": {"path": os.path.join(ROOT, "docs")}},
    )
    start = time.monotonic()
    client.execute()  # raises CellExecutionError naming the cell when one fails
    elapsed = time.monotonic() - start
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.get("output_type") == "error"]
    (comparison,) = [c for c in nb.cells if "comparison" in c.metadata.get("tags", [])]
    text = _text(comparison)
    assert "identical to DiffSynth: True" in text, text
    assert "DIFFERENT" not in text, text
    plots = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert plots, "the timing plot was not drawn"
    assert elapsed < 120, f"the notebook took {elapsed:.0f} s"
