"""The package builds as a wheel with warnings as errors, and the C core runs without torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

from .conftest import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_builds_without_warnings(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            "build", "*.so", "*.egg-info", "__pycache__", ".git", ".pytest_cache", "benchmarks"
        ),
    )
    env = dict(os.environ, DIFFSYNTH_C_WERROR="1", DIFFSYNTH_C_CURL="1")  # this machine has libcurl: no fallback
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("diffsynth_c-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("diffsynth_c/_core") and n.endswith(".so") for n in names)
    assert "diffsynth_c/loader/file.py" in names
    assert "diffsynth_c/_core.pyi" in names and "diffsynth_c/py.typed" in names  # editors see the types
    assert "diffsynth_c-patch.pth" in names  # DIFFSYNTH_C_PATCH=1 with no line of code

    # Installed, the .pth patches a script that never names diffsynth_c, only with the variable set.
    site_dir = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site_dir), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    script = (
        f"import site, sys; site.addsitedir({str(site_dir)!r})\n"  # processes the .pth as at start-up
        "print('diffsynth_c' in sys.modules, 'diffsynth' in sys.modules)\n"
        "from diffsynth.core import load_state_dict\n"
        "print(load_state_dict.__module__)\n"
        "import diffsynth_c; print(diffsynth_c.__file__.startswith(" + repr(str(site_dir)) + "))\n"
    )
    for value, expected in (
        ("1", "True False\ndiffsynth_c.loader.file\nTrue"),
        ("0", "False False\ndiffsynth.core.loader.file\nTrue"),
    ):
        r = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(tmp_path),
            env=dict(os.environ, DIFFSYNTH_C_PATCH=value, PYTHONPATH=""),
            check=False,
        )
        assert r.returncode == 0 and r.stdout.strip() == expected, (value, r.stdout, r.stderr[-3000:])


def test_c_core_needs_no_torch(tmp_path):
    p = tmp_path / "x.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    r = run_python(
        f"""
import sys
import diffsynth_c
from diffsynth_c import _core
assert _core.read_header({str(p)!r})[2][0][0] == 'w'
(pairs,) = _core.load([{str(p)!r}], None, 2)
assert pairs[0][1].nbytes == 8
assert len(_core.hash_files([{str(p)!r}])) == 32
assert 'torch' not in sys.modules, 'importing diffsynth_c or using its C core imported torch'
print('ok')
"""
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_without_libcurl_the_core_builds_and_only_downloads_fail(tmp_path):
    """Where libcurl's headers are missing (an offline GPU machine) the core still builds, loads
    files, and says why it cannot download instead of retrying a network that is not the cause."""
    pkg = tmp_path / "pkg"
    shutil.copytree(
        os.path.join(ROOT, "diffsynth_c"), pkg / "diffsynth_c", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    env = dict(os.environ, DIFFSYNTH_C_WERROR="1", DIFFSYNTH_C_CUDA="0", DIFFSYNTH_C_CURL="0")
    r = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(pkg), "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "libcurl not found, building without downloads" in r.stderr
    p = tmp_path / "x.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    code = f"""
import sys
sys.path.insert(0, {str(pkg)!r})
import diffsynth_c
from diffsynth_c import _core
assert diffsynth_c.__file__.startswith({str(pkg)!r}), diffsynth_c.__file__
assert _core.build_info()["curl"] is False
assert list(diffsynth_c.load_state_dict({str(p)!r})) == ["w"]
try:
    diffsynth_c.ModelConfig(model_id="org/model", origin_file_pattern="a.safetensors", download_source="huggingface",
                            local_model_path={str(tmp_path / "models")!r}).download_if_necessary()
except RuntimeError as e:
    print(e)
"""
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9"),
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "this build of diffsynth_c has no libcurl, so it cannot download" in r.stdout, r.stdout


def test_curl_probe_answers_no_when_compiling_fails(tmp_path):
    """setup.py's libcurl probe: yes with this machine's compiler, no (not a crash of the build)
    with one that fails."""
    code = f"""
import sys, setuptools
setuptools.setup = lambda **kw: None  # import setup.py for its functions, build nothing
sys.path.insert(0, {ROOT!r})
import setup
from distutils.ccompiler import new_compiler
from distutils.sysconfig import customize_compiler
c = new_compiler()
customize_compiler(c)
print(setup.links_with_curl(c, {str(tmp_path / "a")!r}))
c.set_executables(compiler_so="false", compiler="false", linker_exe="false")
print(setup.links_with_curl(c, {str(tmp_path / "b")!r}))
"""
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(tmp_path), check=False
    )
    assert r.returncode == 0 and r.stdout.split() == ["True", "False"], r.stdout + r.stderr[-3000:]
