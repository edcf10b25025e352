"""Builds diffsynth_c._core from csrc/*.c (C11, -Wall -Wextra; -Werror with DIFFSYNTH_C_WERROR=1).

The element conversions in kernels/dtype.h are compiled into the C core too, so the CPU tests
check the same arithmetic the CUDA kernels run.
"""

import glob
import os
import re

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def project_version() -> str:
    with open(os.path.join(HERE, "pyproject.toml"), encoding="utf-8") as f:
        return re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)


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
    )


setup(ext_modules=[core_extension()])
