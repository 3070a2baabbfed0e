"""Shared fixture of the loss tests: run a test once per fused backend.

``torch`` is the chunked CPU path; ``triton`` runs the Triton kernels (under ``TRITON_INTERPRET=1``
on a machine without CUDA, which ``conftest.py`` sets before anything imports Triton). The backend
is forced through ``RSPO_KERNELS_BACKEND``, so the tests go through the public API exactly as a
user's call does.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rspo_kernels._dispatch import BACKEND_ENV

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed (pip install '.[triton]')")
    monkeypatch.setenv(BACKEND_ENV, request.param)
    return request.param


def on_device(case: dict) -> dict:
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def ulps_for(backend: str, dtype: torch.dtype) -> float:
    """Triton's interpreter rounds float32 to 16-bit floats by truncation: two unit roundoffs."""
    return 2.0 if backend == "triton" and not HAS_CUDA and dtype in (torch.float16, torch.bfloat16) else 1.0
