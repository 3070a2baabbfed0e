"""What a newcomer meets first (issue 23): install errors that say what to install, a set-up that
finds out quickly that PyTorch's wheel index is unreachable, and a README that says what works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
_HIDE = Path(__file__).resolve().parent / "hide_modules"

_IMPORT_ADAPTERS = """
import json
out = {}
for adapter in ("verl", "trl"):
    try:
        __import__(f"rspo_kernels.integrations.{adapter}")
    except ModuleNotFoundError as exc:
        out[adapter] = [str(exc), exc.name]
print(json.dumps(out))
"""


def test_a_missing_framework_names_the_extra_to_install():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PYTHONPATH": os.pathsep.join([str(_HIDE), str(_ROOT)]), "RSPO_TEST_HIDE_MODULES": "verl,trl"}
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ADAPTERS], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    for adapter in ("verl", "trl"):
        message, name = out[adapter]
        assert name.split(".")[0] == adapter  # still the missing module's name: importorskip works
        assert f"rspo_kernels.integrations.{adapter} needs the '{adapter}' extra" in message, message
        assert f"No module named '{name}'" in message and f'pip install -e ".[{adapter}]"' in message, message
