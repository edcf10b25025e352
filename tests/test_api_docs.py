"""Every public name has a docstring and annotations and is in docs/api.md; _core.pyi lists the whole C extension.

The public surface is what a user touches: ``diffsynth_c.__all__`` and the ``__all__`` of the
submodules that mirror ``diffsynth.core``, every public function and class defined in the modules
that hold DiffSynth's functions or our own user-facing ones, and a few named ones elsewhere.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re

import pytest

import diffsynth_c
from diffsynth_c import _core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_MD = os.path.join(ROOT, "docs", "api.md")
STUB = os.path.join(ROOT, "diffsynth_c", "_core.pyi")

WITH_ALL = ["diffsynth_c", "diffsynth_c.loader", "diffsynth_c.vram", "diffsynth_c.vram.layers"]
# every public function and class these modules define is public API
WHOLE_MODULES = [
    "diffsynth_c.loader.file",
    "diffsynth_c.loader.model",
    "diffsynth_c.vram.disk_map",
    "diffsynth_c.vram.initialization",
    "diffsynth_c.kernels",
    "diffsynth_c.dlpack",
]
NAMED = {
    "diffsynth_c.patch": ["patch_diffsynth", "unpatch_diffsynth", "is_patched"],
    "diffsynth_c.loader.config": ["ModelConfig", "DownloadError"],
    "diffsynth_c.loader.folder": ["save_state_dict", "parse_size"],
    "diffsynth_c.__main__": ["main"],
}


def public_names() -> list[tuple[str, str, object]]:
    """(module, name, object) of the public surface, each object once."""
    out, seen = [], set()

    def add(module: str, name: str, obj: object) -> None:
        if id(obj) not in seen and (inspect.isfunction(obj) or inspect.isclass(obj)):
            seen.add(id(obj))
            out.append((module, name, obj))

    for m in WITH_ALL:
        mod = importlib.import_module(m)
        for name in mod.__all__:
            add(m, name, getattr(mod, name))
    for m in WHOLE_MODULES:
        mod = importlib.import_module(m)
        for name, obj in vars(mod).items():
            if not name.startswith("_") and getattr(obj, "__module__", None) == m:
                add(m, name, obj)
    for m, names in NAMED.items():
        mod = importlib.import_module(m)
        for name in names:
            add(m, name, getattr(mod, name))
    return out


PUBLIC = public_names()
IDS = [f"{m}.{n}" for m, n, _ in PUBLIC]


def _own_doc(obj: object) -> str:
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__
    return (doc or "").strip()


def test_the_surface_is_not_empty():
    names = {n for _, n, _ in PUBLIC}
    assert {"load_state_dict", "hash_model_file", "DiskMap", "AutoWrappedLinear", "cast", "to_numpy"} <= names
    assert len(PUBLIC) > 40


@pytest.mark.parametrize("module,name,obj", PUBLIC, ids=IDS)
def test_public_name_has_docstring_and_annotations(module, name, obj):
    assert _own_doc(obj), f"{module}.{name} has no docstring"
    if inspect.isfunction(obj):
        functions = [(name, obj)]
    else:  # the public methods a class defines itself
        functions = [
            (f"{name}.{k}", v)
            for k, v in vars(obj).items()
            if inspect.isfunction(v) and (not k.startswith("_") or k == "__getitem__")
        ]
        for qual, f in functions:
            assert (f.__doc__ or "").strip(), f"{module}.{qual} has no docstring"
    for qual, f in functions:
        sig = inspect.signature(f)
        missing = [p for p, v in sig.parameters.items() if v.annotation is inspect.Parameter.empty and p != "self"]
        assert not missing, f"{module}.{qual}: parameters without annotations: {missing}"
        assert sig.return_annotation is not inspect.Signature.empty, f"{module}.{qual}: no return annotation"


def _code_spans(text: str) -> str:
    """The code of a markdown text: fenced blocks and inline spans."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    text = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return "\n".join(fenced + re.findall(r"`([^`\n]+)`", text))


@pytest.mark.parametrize("module,name,obj", PUBLIC, ids=IDS)
def test_public_name_is_in_api_reference(module, name, obj):
    with open(API_MD, encoding="utf-8") as f:
        spans = _code_spans(f.read())
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", spans) or re.search(rf"\.{re.escape(name)}(?!\w)", spans), (
        f"docs/api.md does not mention `{name}` ({module}) in code"
    )


def test_every_name_of_all_is_importable():
    for m in WITH_ALL:
        mod = importlib.import_module(m)
        for name in mod.__all__:
            assert getattr(mod, name) is not None, f"{m}.{name}"


# ---- the C extension's stub ------------------------------------------------------------------------


def _functions() -> dict[str, object]:
    """{name: function} of the C extension, read from the module itself (its method tables are spread
    over the binding files of csrc/)."""
    return {n: getattr(_core, n) for n in dir(_core) if inspect.isbuiltin(getattr(_core, n))}


def _stub() -> dict[str, set[str]]:
    """{top-level name: member names (for classes)} of _core.pyi."""
    with open(STUB, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            members = set()
            for sub in getattr(node, "body", []):
                if isinstance(sub, ast.FunctionDef):
                    members.add(sub.name)
                elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                    members.add(sub.target.id)
            names[node.name] = members
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = set()
    return names


def _core_public() -> set[str]:
    return {n for n in dir(_core) if not n.startswith("_")} | {"__version__"}


def test_every_function_has_a_docstring():
    functions = _functions()
    assert {"load", "read_header", "torch_read", "fetch", "cuda_upload", "write_file"} <= set(functions)
    undocumented = sorted(n for n, f in functions.items() if not (f.__doc__ or "").strip())
    assert not undocumented, f"_core functions without a docstring: {undocumented}"


def test_stub_lists_every_function_of_the_module():
    missing = set(_functions()) - set(_stub())
    assert not missing, f"diffsynth_c/_core.pyi lacks {sorted(missing)}"


def test_stub_and_module_name_the_same_things():
    stub = {n for n in _stub() if not n.startswith("_") or n.startswith("__")}  # _Path, test hooks
    assert stub == _core_public(), (
        f"in _core only: {sorted(_core_public() - stub)}; in _core.pyi only: {sorted(stub - _core_public())}"
    )


@pytest.mark.parametrize("cls", ["Tensor", "Region", "TensorRef"])
def test_stub_lists_the_members_of_each_type(cls):
    actual = {n for n in vars(getattr(_core, cls)) if not n.startswith("_") or n in ("__dlpack__", "__dlpack_device__")}
    actual -= {"n_fields", "n_sequence_fields", "n_unnamed_fields"}  # struct sequence bookkeeping
    assert actual <= _stub()[cls], f"_core.pyi's {cls} lacks {sorted(actual - _stub()[cls])}"


def test_stub_signatures_match_the_docstrings():
    """Each function's parameter names in the stub are the ones its C docstring gives, where it gives them."""
    with open(STUB, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        doc = getattr(_core, node.name).__doc__ or ""
        m = re.match(rf"{node.name}\(([^)]*)\)", doc)
        if not m:
            continue
        documented = [p.strip().split("=")[0].lstrip("*") for p in m.group(1).split(",") if p.strip()]
        documented = [p for p in documented if p]
        args = node.args
        stubbed = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        assert [p for p in documented if p not in stubbed] == [], f"{node.name}: {documented} vs {stubbed}"


def test_package_data_ships_the_stub():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    assert re.search(r'diffsynth_c = \[[^\]]*"py\.typed"[^\]]*"_core\.pyi"', text)
    assert os.path.exists(os.path.join(ROOT, "diffsynth_c", "py.typed"))


def test_lazy_layers_resolve_from_the_top():
    assert diffsynth_c.AutoWrappedLinear.__module__ == "diffsynth_c.vram.layers"


def test_links_between_the_docs_resolve():
    docs = os.path.join(ROOT, "docs")
    for page in sorted(os.listdir(docs)) + ["../README.md"]:
        if not page.endswith(".md"):
            continue
        with open(os.path.join(docs, page), encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", text):
            assert os.path.exists(os.path.join(docs, os.path.dirname(page), target)), f"{page}: broken link {target}"
