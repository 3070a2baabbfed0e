"""torch.compile with every loss option on at once, against float64 eager autograd of the unfused loss.

Entropy bonus, clipping and dual-clip (stale old log-probs), the k3 KL to reference log-probs,
responses of weight 0, a mask, a packed layout with ``cu_seqlens``, a temperature, logits far from
zero (a constant offset of 1e3 through the bias) and a vocabulary block that is entirely ``-inf``:
through the logits path (:func:`rspo_kernels.rspo_loss`) and the hidden-states path
(:func:`rspo_kernels.rspo_linear_loss`, weight and module forms).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import rspo_kernels as rk
from rspo_kernels.loss.reference import rspo_loss_reference

F64 = torch.float64
OPTS = dict(
    temperature=0.8,
    epsilon_low=0.1,
    epsilon_high=0.15,
    clip_ratio_c=3.0,
    beta=0.05,
    entropy_coeff=0.3,
    loss_agg_mode="seq-mean-token-mean",
)


def _case():
    g = torch.Generator().manual_seed(11)
    N, H, V, vb = 14, 6, 12, 4
    cu = torch.tensor([0, 5, 9, 14])
    hidden = torch.randn(N, H, generator=g, dtype=F64)
    W = torch.randn(V, H, generator=g, dtype=F64)
    bias = torch.randn(V, generator=g, dtype=F64) + 1e3  # logits far from zero
    bias[-vb:] = float("-inf")  # the last vocabulary block: every entry -inf (masked padding rows)
    ids = torch.randint(0, V - vb, (N,), generator=g)
    weights = torch.tensor([1.25, 0.0, -0.75], dtype=F64)  # one response of weight 0
    mask = torch.rand(N, generator=g) > 0.2
    mask[cu[:-1]] = True
    hidden[~mask] = float("nan")  # masked rows may hold anything
    logits = torch.nn.functional.linear(torch.nan_to_num(hidden), W, bias)
    true = torch.log_softmax(logits / OPTS["temperature"], -1).gather(-1, ids[:, None])[:, 0]
    old = true + 0.7 * torch.randn(N, generator=g, dtype=F64)  # many clipped and dual-clipped tokens
    ref = true + 0.3 * torch.randn(N, generator=g, dtype=F64)
    return hidden, W, bias, ids, weights, mask, old, ref, cu, vb


def _reference(logits, ids, weights, mask, old, ref, cu):
    return rspo_loss_reference(logits, ids, weights, mask, old_logprobs=old, ref_logprobs=ref, cu_seqlens=cu, **OPTS)


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_compiled_logits_loss_with_every_option():
    hidden, W, bias, ids, weights, mask, old, ref, cu, _ = _case()
    logits = torch.nn.functional.linear(torch.nan_to_num(hidden), W, bias)
    logits[~mask] = float("nan")
    x_ref = logits.clone().requires_grad_()
    want = _reference(torch.where(mask[:, None], x_ref, 0.0), ids, weights, mask, old, ref, cu)
    (g_want,) = torch.autograd.grad(want, x_ref)

    def step(x):
        return rk.rspo_loss(x, ids, weights, mask, old_logprobs=old, ref_logprobs=ref, cu_seqlens=cu, **OPTS)

    x = logits.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loss = _compiled(step)(x)
        loss.backward()
    assert torch.isfinite(want) and torch.isfinite(g_want).all()
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x.grad, g_want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("form", ["weight", "module"])
def test_compiled_linear_loss_with_every_option(form):
    hidden, W, bias, ids, weights, mask, old, ref, cu, vb = _case()
    h_ref = hidden.clone().requires_grad_()
    w_ref, b_ref = W.clone().requires_grad_(), bias.clone().requires_grad_()
    live_h = torch.where(mask[:, None], h_ref, 0.0)
    want = _reference(torch.nn.functional.linear(live_h, w_ref, b_ref), ids, weights, mask, old, ref, cu)
    want.backward()

    if form == "weight":
        w, b = W.clone().requires_grad_(), bias.clone().requires_grad_()
        params, head, head_bias = (w, b), w, b
    else:
        lin = torch.nn.Linear(W.shape[1], W.shape[0], dtype=F64)
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(bias)
        params, head, head_bias = (lin.weight, lin.bias), lin, None

    def step(h):
        return rk.rspo_linear_loss(
            h,
            head,
            ids,
            weights,
            mask,
            bias=head_bias,
            old_logprobs=old,
            ref_logprobs=ref,
            cu_seqlens=cu,
            chunk_rows=4,
            vocab_block=vb,
            **OPTS,
        )

    h = hidden.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loss = _compiled(step)(h)
        loss.backward()
    assert torch.isfinite(want)
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(params[0].grad, w_ref.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(params[1].grad, b_ref.grad, rtol=1e-9, atol=1e-9)
