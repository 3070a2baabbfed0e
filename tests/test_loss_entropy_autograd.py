"""The entropy bonus (``entropy_coeff != 0``) driven the way torch users drive autograd.

With an entropy bonus the fused backward takes a second incoming gradient (``dL/dH``) and adds
``-g_H p (x - E_p[x])`` to every logit; these tests repeat the autograd contract of
``test_loss_autograd.py`` (logits, chunked torch and Triton) and ``test_loss_linear.py`` (hidden
states) on that path. Expected gradients come from the float64 specification.
"""

from __future__ import annotations

import pytest
import torch
from loss_backends import DEVICE, ulps_for
from test_loss_autograd import _case, _leaf
from test_loss_linear import BLOCKS, assert_grad_close, make_case, run_reference
from test_loss_reference import assert_matches, loss_kwargs

import rspo_kernels as rk
from rspo_kernels.loss.reference import rspo_loss_reference

COEFF = 0.05


def _loss(x, case, **kw):
    kw = loss_kwargs(case, entropy_coeff=COEFF, **kw)
    return rk.rspo_loss(x, case["target_ids"], case["weights"], case["mask"], **kw)


def _reference_grad(case, scale=1.0):
    x = case["logits"].double().requires_grad_()
    kw = loss_kwargs(case, entropy_coeff=COEFF)
    loss = rspo_loss_reference(x, case["target_ids"], case["weights"], case["mask"], **kw)
    (g,) = torch.autograd.grad(scale * loss, x)
    return g


# ------------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_logits_loss_scaling(backend, dtype):
    case = _case(dtype)
    x = _leaf(case)
    (_loss(x, case) * 65536.0).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert_matches(x.grad, _reference_grad(case, 65536.0), dtype, ulps=ulps_for(backend, dtype))


def test_logits_retain_graph_twice_and_grad_output(backend):
    case = _case()
    x = _leaf(case)
    loss = _loss(x, case)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward(torch.tensor(3.0, device=DEVICE))
    assert_matches(once, _reference_grad(case), torch.float32)
    assert_matches(x.grad, 4 * once, torch.float32)


def test_logits_create_graph_raises(backend):
    case = _case()
    x = _leaf(case)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(_loss(x, case), x, create_graph=True)


def test_logits_no_grad_builds_no_graph(backend):
    case = _case()
    x = _leaf(case)
    with torch.no_grad():
        loss = _loss(x, case)
    assert not loss.requires_grad and loss.grad_fn is None


@pytest.mark.parametrize("second_first", [False, True])
def test_logits_second_consumer(backend, second_first):
    case = _case()
    base = _leaf(case)
    logits = base * 1.0
    extra = lambda: 1e-3 * (logits.float() ** 2).sum()  # noqa: E731
    loss = extra() + _loss(logits, case) if second_first else _loss(logits, case) + extra()
    loss.backward()
    assert_matches(base.grad, _reference_grad(case) + 2e-3 * case["logits"].double(), torch.float32)


def test_logits_nan_and_inf_in_masked_rows(backend):
    case = _case()
    logits = case["logits"].clone()
    logits[1] = float("nan")  # row 1 is fully masked in make_case
    logits[0, 1:][~case["mask"][0, 1:]] = float("inf")
    x = logits.requires_grad_()
    loss = _loss(x, case)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert torch.all(x.grad[1] == 0) and torch.all(x.grad[~case["mask"]] == 0)
    assert_matches(x.grad[case["mask"]], _reference_grad(case)[case["mask"]], torch.float32)


# ----------------------------------------------------------------------------- hidden states
def _want(case):
    """The float64 reference's gradients, on a copy (``run_reference`` marks float64 inputs in place)."""
    return run_reference(
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()}, entropy_coeff=COEFF
    )[1]


def _linear(case, **kw):
    h, w, b = (case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    loss = rk.rspo_linear_loss(
        h,
        w,
        case["ids"],
        case["weights"],
        case["mask"],
        bias=b,
        old_logprobs=case["old"],
        ref_logprobs=case["ref"],
        entropy_coeff=COEFF,
        **BLOCKS,
        **kw,
    )
    return loss, (h, w, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_linear_loss_scaling(dtype):
    case = make_case(dtype=dtype)
    case["weights"] = case["weights"] * 1e-3  # scaled gradients fit fp16's range, as a GradScaler ensures
    loss, leaves = _linear(case)
    (loss * 65536.0).backward()
    want = _want(case)
    for name, t, r in zip(("hidden", "weight", "bias"), leaves, want, strict=True):
        assert torch.isfinite(t.grad).all(), name
        assert_grad_close(t.grad, r * 65536.0, dtype, f"scaled d{name}")


def test_linear_retain_graph_twice_create_graph_and_no_grad():
    case = make_case(dtype=torch.float64)
    loss, leaves = _linear(case)
    loss.backward(retain_graph=True)
    once = [t.grad.clone() for t in leaves]
    want = _want(case)
    for g, r in zip(once, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    loss.backward(retain_graph=True)
    for t, g in zip(leaves, once, strict=True):
        torch.testing.assert_close(t.grad, 2 * g, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, leaves[0], create_graph=True)
    with torch.no_grad():
        quiet, _ = _linear(case)
    assert quiet.grad_fn is None
    torch.testing.assert_close(quiet, loss.detach(), rtol=1e-12, atol=0)


def test_linear_second_consumer_and_nan_in_masked_rows():
    case = make_case(dtype=torch.float64)
    want = _want(case)
    dirty = dict(case, hidden=case["hidden"].masked_fill(~case["mask"].unsqueeze(-1), float("nan")))
    loss, (h, w, b) = _linear(dirty)
    loss.backward()
    assert torch.all(h.grad[~case["mask"]] == 0)
    for got, r in zip((h.grad, w.grad, b.grad), want, strict=True):
        torch.testing.assert_close(got, r, rtol=1e-10, atol=1e-12)
    head = torch.randn(case["hidden"].shape[-1], dtype=torch.float64)
    for loss_first in (True, False):
        h2 = case["hidden"].clone().requires_grad_()
        other = lambda h2=h2: (h2 @ head).pow(2).sum()  # noqa: E731
        value = None if loss_first else other()
        fused = rk.rspo_linear_loss(
            h2,
            case["weight"],
            case["ids"],
            case["weights"],
            case["mask"],
            bias=case["bias"],
            old_logprobs=case["old"],
            ref_logprobs=case["ref"],
            entropy_coeff=COEFF,
            **BLOCKS,
        )
        (fused + (other() if loss_first else value)).backward()
        expected = want[0] + 2 * (case["hidden"] @ head).unsqueeze(-1) * head
        torch.testing.assert_close(h2.grad, expected, rtol=1e-10, atol=1e-12)
