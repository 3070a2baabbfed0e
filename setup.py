"""Build hook for the optional C++ extension ``rspo_kernels._cpu``.

Everything else about the package lives in ``pyproject.toml``.
"""
from pathlib import Path

from setuptools import setup

ext_modules = []
sources = sorted(str(p) for p in Path("csrc").glob("*.cpp"))
if sources:
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    ext_modules.append(
        Pybind11Extension(
            "rspo_kernels._cpu",
            sources,
            cxx_std=17,
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    )
    setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
else:
    setup()
