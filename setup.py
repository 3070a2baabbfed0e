"""Build hook for the optional C++ extension ``rspo_kernels._cpu``.

Everything else about the package lives in ``pyproject.toml``. The extension is built from every
``csrc/*.cpp`` with a C++17 compiler, with OpenMP when the compiler supports it (the kernels also
build without it). It is optional: without a working compiler (or with
``RSPO_KERNELS_NO_EXTENSION=1``) the install still succeeds, ``import rspo_kernels`` warns once,
and every function runs on the torch backend instead.
"""

import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import setup

_NOT_BUILT = (
    "rspo_kernels: the optional C++ extension (rspo_kernels._cpu) could not be built: {error}. "
    "Installing without it; the library falls back to the slower torch backend on CPU. To build it, "
    "install a C++17 compiler (Debian/Ubuntu: apt install g++; macOS: xcode-select --install; "
    "Windows: Visual Studio Build Tools with 'Desktop development with C++') and reinstall."
)


def _openmp_flags() -> list[str]:
    """``["-fopenmp"]`` if the C++ compiler accepts it (gcc, clang with libomp), else ``[]``."""
    if sys.platform == "win32" or os.environ.get("RSPO_KERNELS_NO_OPENMP"):
        return []
    cxx = (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "omp.cpp")
        src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            result = subprocess.run([*cxx, "-fopenmp", str(src), "-o", str(Path(tmp, "omp"))], capture_output=True)
        except OSError:
            return []
    return ["-fopenmp"] if result.returncode == 0 else []


# RSPO_KERNELS_NO_EXTENSION=1 installs the pure-Python package only (the torch backend on CPU).
sources = [] if os.environ.get("RSPO_KERNELS_NO_EXTENSION") else sorted(str(p) for p in Path("csrc").glob("*.cpp"))
if sources:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
    from pybind11.setup_helpers import build_ext as _pybind11_build_ext

    class build_ext(_pybind11_build_ext):  # noqa: N801 - setuptools looks the command up by this name
        """pybind11's ``build_ext``, but a failed build of an optional extension is not an error.

        setuptools already skips an ``optional`` extension that fails to compile; a missing
        compiler can also fail earlier (while setting up the compiler or probing flags), and
        ``OSError`` is what a missing executable raises. Both end here with one message.
        """

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any failure leaves the pure-Python package usable
                if not getattr(ext, "optional", False):
                    raise
                print(_NOT_BUILT.format(error=f"{type(exc).__name__}: {exc}"), file=sys.stderr)

    ParallelCompile("RSPO_KERNELS_BUILD_JOBS", default=0).install()  # compile the sources in parallel
    omp = _openmp_flags()
    ext = Pybind11Extension(
        "rspo_kernels._cpu",
        sources,
        cxx_std=17,
        extra_compile_args=["-O3", *omp],
        extra_link_args=omp,
        optional=True,
    )
    ext.depends = sorted(str(p) for p in Path("csrc").glob("*.hpp"))
    setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
else:
    setup()
