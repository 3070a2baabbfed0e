"""Shared pytest configuration: a deterministic hypothesis profile, reward strategies, and an
environment that keeps caches inside pytest's temporary directory."""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
import tempfile
import warnings

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))  # lets test modules import `oracles`

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. Triton reads this
# when a kernel is decorated, so it must be set before any rspo_kernels.ops module is imported.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where tests (and the subprocesses they start) may write caches: Triton's compiled kernels
# (~/.triton by default) and Ray's session files (/tmp/ray) and auth token (~/.ray). Set at import,
# before anything imports triton or ray; pytest_configure moves them under pytest's basetemp.
_CACHE_ENV = ("TRITON_HOME", "TRITON_CACHE_DIR", "RAY_TMPDIR", "RAY_AUTH_TOKEN_PATH")


@pytest.hookimpl(trylast=True)  # after pytest's tmpdir plugin has set up the base temporary directory
def pytest_configure(config):
    base = str(config._tmp_path_factory.getbasetemp())
    caches = os.path.join(base, "caches")
    os.makedirs(caches, exist_ok=True)
    token = os.path.join(caches, "ray_auth_token")
    with open(token, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(32))  # an existing token, so Ray never generates one in ~/.ray
    os.environ["TRITON_HOME"] = os.path.join(caches, "triton")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(caches, "triton", "cache")
    os.environ["RAY_AUTH_TOKEN_PATH"] = token
    # Ray puts unix sockets under <RAY_TMPDIR>/ray/session_<date>_<pid>/sockets/, and a socket path
    # may not exceed 107 bytes: the base temporary directory itself is the shortest choice.
    os.environ["RAY_TMPDIR"] = base if len(base) <= 40 else tempfile.mkdtemp(prefix="rk-")


# The C++ extension is optional: without it the package warns once at import (tested in
# test_optional_extension.py), which filterwarnings=error would turn into collection errors here,
# and the tests of the extension itself cannot run.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="rspo_kernels: the C.. extension", category=RuntimeWarning)
    import rspo_kernels  # noqa: E402, F401
EXTENSION_BUILT = importlib.util.find_spec("rspo_kernels._cpu") is not None
collect_ignore = [] if EXTENSION_BUILT else ["test_cpu_backend.py"]


def pytest_report_header(config):
    if not EXTENSION_BUILT:
        return "rspo_kernels._cpu is not built: tests/test_cpu_backend.py is not collected (torch backend only)"
    return None


settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@st.composite
def reward_groups(draw, min_n: int = 1, max_n: int = 8, binary: bool = False):
    """One group of rewards with ties on purpose: values come from a small palette."""
    n = draw(st.integers(min_n, max_n))
    if binary:
        return draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
    palette = draw(
        st.lists(
            st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32),
            min_size=1,
            max_size=max(1, n // 2 + 1),
        )
    )
    return draw(st.lists(st.sampled_from(palette), min_size=n, max_size=n))


# The loss tests' per-backend fixture, available to every test module without an import.
from loss_backends import backend  # noqa: E402, F401

# CI (.ci/run) runs the suite first without the frameworks, then installs them and runs again
# exactly what skipped: with RSPO_SKIPPED_LOG set, the id of every skipped test (or module, when
# it skips as a whole at import) is appended to that file. Taken out of the environment, so that
# the pytest runs some tests start in a subprocess (with modules hidden on purpose) do not write there.
_SKIPPED_LOG = os.environ.pop("RSPO_SKIPPED_LOG", None)


def _log_skip(report) -> None:
    if _SKIPPED_LOG and report.skipped and report.nodeid:
        with open(_SKIPPED_LOG, "a", encoding="utf-8") as f:
            f.write(report.nodeid + "\n")


def pytest_runtest_logreport(report):
    _log_skip(report)


def pytest_collectreport(report):
    _log_skip(report)
