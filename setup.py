"""Build script: the pure-Python package plus the pybind11 CPU extension ``fastrlhf.kernels._C`` (built with the kernels, so they lift out together).

``kernels/`` (top level in the source tree) is installed as ``fastrlhf.kernels``.
The extension is required: if no C++ compiler is found the install stops with a clear message
(there is no silent fallback that CI could not see).
"""
import os
import shutil
import sys
import sysconfig
from glob import glob

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError as e:  # pragma: no cover - pyproject's build-system requires pybind11
    raise SystemExit("fastrlhf: building needs pybind11 (pip install pybind11), listed in pyproject's build-system") from e


class BuildExt(build_ext):
    """build_ext that fails loudly when there is no working C++ compiler."""

    def build_extensions(self):
        cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
        exe = cxx.split()[0]
        if shutil.which(exe) is None and shutil.which("c++") is None and shutil.which("g++") is None:
            sys.exit(
                f"fastrlhf: no C++ compiler found (looked for {exe!r}, 'c++', 'g++'). The CPU ops in csrc/ "
                "(fastrlhf.kernels._C) must be compiled: install one (Debian/Ubuntu: apt-get install g++) and retry."
            )
        super().build_extensions()


ext = Pybind11Extension(
    "fastrlhf.kernels._C",
    sorted(glob("csrc/*.cpp")),
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    packages=find_packages(include=["fastrlhf", "fastrlhf.*"]) + ["fastrlhf.kernels", "fastrlhf.benchmarks"],
    package_dir={"fastrlhf": "fastrlhf", "fastrlhf.kernels": "kernels", "fastrlhf.benchmarks": "benchmarks"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
)
