"""Make modules look not installed, in this process and every Python child that inherits the environment.

Put this directory on ``PYTHONPATH`` and list the modules in ``RSPO_TEST_HIDE_MODULES``
(comma-separated). A ``None`` entry in ``sys.modules`` makes ``import name`` raise
``ModuleNotFoundError`` and ``importlib.util.find_spec(name)`` return ``None``, exactly what an
environment without the package (or without the built C++ extension) gives. The tests use it to
prove that an install with only the ``[test]`` extra skips, never fails.
"""

import os
import sys

for _name in filter(None, os.environ.get("RSPO_TEST_HIDE_MODULES", "").split(",")):
    sys.modules[_name.strip()] = None  # type: ignore[assignment]
