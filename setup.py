"""Build hook for the optional C++ extension ``rspo_kernels._cpu``.

Everything else about the package lives in ``pyproject.toml``. The extension is built from every
``csrc/*.cpp`` with OpenMP when the compiler supports it (the kernels also build without it).
"""
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import setup


def _openmp_flags() -> list[str]:
    """``["-fopenmp"]`` if the C++ compiler accepts it (gcc, clang with libomp), else ``[]``."""
    if sys.platform == "win32" or os.environ.get("RSPO_KERNELS_NO_OPENMP"):
        return []
    cxx = (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "omp.cpp")
        src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            ok = subprocess.run([*cxx, "-fopenmp", str(src), "-o", str(Path(tmp, "omp"))],
                                capture_output=True).returncode == 0
        except OSError:
            ok = False
    return ["-fopenmp"] if ok else []


sources = sorted(str(p) for p in Path("csrc").glob("*.cpp"))
if sources:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext

    ParallelCompile("RSPO_KERNELS_BUILD_JOBS", default=0).install()  # compile the sources in parallel
    omp = _openmp_flags()
    ext = Pybind11Extension(
        "rspo_kernels._cpu",
        sources,
        cxx_std=17,
        extra_compile_args=["-O3", *omp],
        extra_link_args=omp,
    )
    ext.depends = sorted(str(p) for p in Path("csrc").glob("*.hpp"))
    setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
else:
    setup()
