"""The fused-linear loss under DDP, FSDP2 and DeepSpeed ZeRO-3, and the head given as a module.

Multi-process checks run on gloo in float64 on fresh spawned processes (one spawn per family of
scenarios, see tests/dist_workers.py) against the single-process gradient of the same global
batch. Single-process checks of the head-module path and of forward_redirect come first.
"""

from __future__ import annotations

import dist_workers as dw
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def test_ddp_gradients_and_replicas_match_single_process():
    dw.spawn(dw.ddp_worker, 2, timeout=120)


def test_fsdp2_gradients_match_single_process():
    dw.spawn(dw.fsdp2_worker, 2, timeout=120)


@pytest.mark.slow  # DeepSpeed takes ~10 s of CPU to import in each process
def test_zero3_gathers_in_forward_and_backward_and_reduces():
    pytest.importorskip("deepspeed")
    dw.spawn(dw.zero3_worker, 2, timeout=240, init=False)
