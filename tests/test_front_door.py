"""What a newcomer meets first (issue 23): install errors that say what to install, a set-up that
finds out quickly that PyTorch's wheel index is unreachable, and a README that says what works."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
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


# What the README's .venv lacks (no framework is installed there): each adapter meets the first of
# them it imports, which for TRL is transformers, not trl. Hiding only the frameworks themselves is
# the other case: transformers installed (by another package), trl not.
_FRAMEWORK_FREE = "verl,trl,transformers,deepspeed,openrlhf,accelerate"


@pytest.mark.parametrize("hidden", [_FRAMEWORK_FREE, "verl,trl"], ids=["framework-free venv", "only the frameworks"])
def test_a_missing_framework_names_the_extra_to_install(hidden):
    if hidden == "verl,trl" and importlib.util.find_spec("transformers") is None:
        # The case needs transformers present while trl is not; CI reruns it once the frameworks are in.
        pytest.skip("transformers is not installed: the framework-free case covers this venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PYTHONPATH": os.pathsep.join([str(_HIDE), str(_ROOT)]), "RSPO_TEST_HIDE_MODULES": hidden}
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ADAPTERS], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    for adapter in ("verl", "trl"):
        message, name = out[adapter]
        # Still the missing module's own name (importorskip and `except ImportError` work), and one
        # that is missing here: the framework, or the first of its dependencies the adapter imports.
        assert name.split(".")[0] in hidden.split(","), name
        if hidden == "verl,trl":
            assert name.split(".")[0] == adapter
        assert f"rspo_kernels.integrations.{adapter} needs the '{adapter}' extra" in message, message
        assert f"No module named '{name}'" in message and f'pip install -e ".[{adapter}]"' in message, message


# --------------------------------------------------------------------------- make setup's index probe
_PROBE = _ROOT / "scripts" / "probe_index.py"


def _probe(url: str, timeout_s: float = 3.0) -> subprocess.CompletedProcess:
    env = os.environ | {"RSPO_INDEX_PROBE_TIMEOUT": str(timeout_s)}
    return subprocess.run(
        [sys.executable, str(_PROBE), url], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_passes_an_index_that_answers_to_pip():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/whl/cpu"  # a 404 still means "reachable"
        proc = _probe(url)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0 and proc.stdout.strip() == f"--index-url {url}" and proc.stderr == ""


def test_probe_says_once_that_an_unreachable_index_is_skipped():
    url = f"http://127.0.0.1:{_free_port()}/whl/cpu"  # nothing listens: connection refused
    proc = _probe(url)
    assert proc.returncode == 0 and proc.stdout == ""  # pip gets no --index-url: the configured index
    (line,) = proc.stderr.splitlines()
    assert line.strip().startswith(f"{url} is unreachable (") and "configured with instead" in line, line


def test_probe_gives_up_on_an_index_that_never_answers():
    """A host that accepts the connection and then says nothing: the probe's own deadline decides."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        proc = _probe(url, timeout_s=0.5)
    assert proc.stdout == "" and "is unreachable (" in proc.stderr, proc.stderr


def test_make_setup_probes_the_torch_index_before_installing_torch(tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(
        [make, "-n", "setup", f"VENV={tmp_path / 'venv'}", "TORCH_INDEX=https://example.org/cpu"],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    (torch_line,) = [line for line in dry.splitlines() if "pip install" in line and '"torch==' in line]
    assert f"$({tmp_path / 'venv'}/bin/python scripts/probe_index.py https://example.org/cpu)" in torch_line


# --------------------------------------------------------------------------- docs/cli.md's examples
def test_cli_page_examples_are_what_the_command_prints(tmp_path, capsys):
    from rspo_kernels.cli import main

    page = (_ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    csv_in, csv_out, jsonl_in, jsonl_out = re.findall(r"```text\n(.*?)```", page, flags=re.S)[:4]
    (tmp_path / "rewards.csv").write_text(csv_in)
    (tmp_path / "r.jsonl").write_text(jsonl_in)
    shown = re.findall(r"`(rspo-kernels weights [^`]*)` prints", page)
    assert len(shown) == 2
    for command, expected in zip(shown, (csv_out, jsonl_out), strict=True):
        argv = [str(tmp_path / w) if w.endswith((".csv", ".jsonl")) else w for w in command.split()[1:]]
        assert main(argv) == 0
        assert capsys.readouterr().out == expected, command


# --------------------------------------------------------------------------- lazy top-level names
def test_every_public_name_is_exported_lazily_and_resolves():
    """`import rspo_kernels` imports no torch (the CLI's --help relies on it): every public name is in
    the lazy table, and a new one added only as an eager import would break tests/test_cli.py."""
    import ast

    import rspo_kernels as rk

    assert set(rk.__all__) - {"__version__"} == set(rk._EXPORTS)
    tree = ast.parse((_ROOT / "rspo_kernels" / "__init__.py").read_text(encoding="utf-8"))
    (guard,) = [node for node in tree.body if isinstance(node, ast.If)]  # the TYPE_CHECKING block
    typed = {alias.name for node in guard.body for alias in node.names}
    assert typed == set(rk._EXPORTS)
    for name in rk._EXPORTS:
        assert getattr(rk, name) is not None and name in dir(rk)
