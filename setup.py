"""Builds diffsynth_c._core from csrc/*.c (C11, -Wall -Wextra; -Werror with DIFFSYNTH_C_WERROR=1),
and, when nvcc is found, the CUDA library diffsynth_c/_cuda.so from kernels/*.cu.

The element conversions in kernels/dtype.h are compiled into the C core too, so the CPU tests
check the same arithmetic the CUDA kernels run. The CUDA library links the CUDA runtime
statically and is opened by the core with dlopen only when a GPU is asked for: the package
imports and works on machines without nvcc, without a driver or without a GPU.

DIFFSYNTH_C_CUDA=0 skips the CUDA library; =1 makes a missing nvcc an error. NVCC names the
compiler (default: nvcc on PATH, then $CUDA_HOME/bin/nvcc, then /usr/local/cuda/bin/nvcc).

Downloads need libcurl (Debian: libcurl4-openssl-dev). Where its headers or library are missing
(an offline GPU machine, say), the core is built without them and only downloads fail, with a
message saying so. DIFFSYNTH_C_CURL=1 makes a missing libcurl an error (the project's own
environment sets it); =0 builds without libcurl even where it is present.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))

# fat binary for Ampere, Ada and Hopper, plus PTX for what comes after
CUDA_ARCHS = [("80", "sm_80"), ("89", "sm_89"), ("90", "sm_90"), ("90", "compute_90")]


def project_version() -> str:
    with open(os.path.join(HERE, "pyproject.toml"), encoding="utf-8") as f:
        return re.search(r'^version = "([^"]+)"', f.read(), re.MULTILINE).group(1)


def core_extension() -> Extension:
    version = project_version()
    flags = ["-std=c11", "-O3", "-Wall", "-Wextra", "-fvisibility=hidden", "-fno-strict-aliasing"]
    if os.environ.get("DIFFSYNTH_C_WERROR") == "1":
        flags.append("-Werror")
    if os.environ.get("DIFFSYNTH_C_SANITIZE"):
        flags += ["-fsanitize=" + os.environ["DIFFSYNTH_C_SANITIZE"], "-fno-omit-frame-pointer", "-O1", "-g"]
    return Extension(
        "diffsynth_c._core",
        sources=sorted(glob.glob("csrc/*.c")),
        depends=sorted(glob.glob("csrc/*.h") + glob.glob("kernels/*.h")),
        include_dirs=["csrc", "kernels"],
        define_macros=[("DS_VERSION", f'"{version}"')],
        extra_compile_args=flags,
        extra_link_args=["-pthread"] + [f for f in flags if f.startswith("-fsanitize")],
        libraries=["dl", "curl"],
    )


def find_nvcc() -> str | None:
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    for candidate in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def links_with_curl(compiler, build_temp: str) -> bool:
    """Whether a program using libcurl compiles and links with this compiler."""
    os.makedirs(build_temp, exist_ok=True)
    src = os.path.join(build_temp, "curl_probe.c")
    with open(src, "w", encoding="utf-8") as f:
        f.write("#include <curl/curl.h>\nint main(void) { return curl_global_init(CURL_GLOBAL_DEFAULT) != 0; }\n")
    try:
        objects = compiler.compile([src], output_dir=build_temp)
        compiler.link_executable(objects, "curl_probe", output_dir=build_temp, libraries=["curl"])
    except Exception:  # noqa: BLE001  CompileError/LinkError, of whichever copy of distutils compiled it
        return False
    return True


class BuildWithCuda(build_ext):
    """build_ext (with or without libcurl, see above), then the CUDA library next to the extension
    when nvcc is there."""

    def build_extensions(self) -> None:
        wanted = os.environ.get("DIFFSYNTH_C_CURL", "auto")
        if wanted == "0" or not links_with_curl(self.compiler, self.build_temp):
            if wanted == "1":
                raise RuntimeError("DIFFSYNTH_C_CURL=1 but libcurl was not found (Debian: libcurl4-openssl-dev)")
            print("diffsynth_c: libcurl not found, building without downloads", file=sys.stderr)
            for ext in self.extensions:
                ext.define_macros.append(("DS_NO_CURL", "1"))
                ext.libraries = [lib for lib in ext.libraries if lib != "curl"]
        super().build_extensions()

    def run(self) -> None:
        super().run()
        wanted = os.environ.get("DIFFSYNTH_C_CUDA", "auto")
        if wanted == "0":
            return
        nvcc = find_nvcc()
        if nvcc is None:
            if wanted == "1":
                raise RuntimeError("DIFFSYNTH_C_CUDA=1 but no nvcc was found (set NVCC or CUDA_HOME)")
            print("diffsynth_c: nvcc not found, building without the CUDA kernels", file=sys.stderr)
            return
        out_dir = os.path.dirname(self.get_ext_fullpath("diffsynth_c._core"))
        self.build_cuda(nvcc, os.path.join(out_dir, "_cuda.so"))

    def build_cuda(self, nvcc: str, target: str) -> None:
        sources = sorted(glob.glob(os.path.join("kernels", "*.cu")))
        deps = sources + glob.glob(os.path.join("kernels", "*.h")) + glob.glob(os.path.join("kernels", "*.cuh"))
        if not self.force and os.path.exists(target):
            newest = max(os.path.getmtime(p) for p in deps)
            if os.path.getmtime(target) >= newest:
                return
        tmp = os.path.join(self.build_temp, "kernels")
        os.makedirs(tmp, exist_ok=True)
        host = "-fPIC,-O3,-Wall,-Wextra,-fvisibility=hidden" + (
            ",-Werror" if os.environ.get("DIFFSYNTH_C_WERROR") == "1" else ""
        )
        flags = ["-std=c++17", "-O3", "--extended-lambda", "-Ikernels", "-Xcompiler", host]
        for virtual, real in CUDA_ARCHS:
            flags += ["-gencode", f"arch=compute_{virtual},code={real}"]
        objects = [os.path.join(tmp, os.path.basename(s)[:-3] + ".o") for s in sources]

        def compile_one(pair):
            src, obj = pair
            cmd = [nvcc, *flags, "-c", src, "-o", obj]
            print(" ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True)

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            list(pool.map(compile_one, zip(sources, objects)))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        partial = target + ".partial"
        subprocess.run([nvcc, "-shared", "-cudart", "static", "-o", partial, *objects, "-lpthread"], check=True)
        os.replace(partial, target)


# Installed at the top of site-packages: with DIFFSYNTH_C_PATCH=1, every interpreter patches DiffSynth
# as soon as the script imports it (diffsynth_c/_startup.py); without the variable it does nothing.
PATCH_PTH = (
    "diffsynth_c-patch.pth",
    'import os; os.environ.get("DIFFSYNTH_C_PATCH") == "1" and __import__("diffsynth_c._startup")\n',
)


class BuildPyWithPth(build_py):
    """build_py, plus the .pth file above at the root of the built tree (so, of the wheel)."""

    def run(self) -> None:
        super().run()
        name, line = PATCH_PTH
        os.makedirs(self.build_lib, exist_ok=True)
        with open(os.path.join(self.build_lib, name), "w", encoding="utf-8") as f:
            f.write(line)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PATCH_PTH[0])]


setup(ext_modules=[core_extension()], cmdclass={"build_ext": BuildWithCuda, "build_py": BuildPyWithPth})
