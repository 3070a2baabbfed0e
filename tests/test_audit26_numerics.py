"""Issue 26, items 4-8: silent wrong results and NaN in the fused losses.

Every oracle is float64 autograd through the full, unfused logits (``torch.log_softmax`` of
``hidden @ W.T + b``), written here independently of the library's blocked code.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import rspo_kernels as rk
from rspo_kernels.loss.reference import rspo_loss_reference

F64 = torch.float64


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


# item 7: torch.compile with the entropy bonus -------------------------------------------------------
def _compile_case(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    B, T, H, V = 4, 5, 6, 11
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    W = torch.randn(V, H, generator=g, dtype=F64)
    bias = torch.randn(V, generator=g, dtype=F64)
    ids = torch.randint(0, V, (B, T), generator=g)
    # Two responses of weight 0 (an all-fail group): live tokens with zero policy gradient.
    weights = torch.tensor([1.5, 0.0, -0.5, 0.0], dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    logits = torch.nn.functional.linear(hidden, W, bias)
    true = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    old = true + 0.8 * torch.randn(B, T, generator=g, dtype=F64)  # many clipped tokens
    return hidden, W, bias, ids, weights, mask, old


def _compiled(fn, backend):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


@pytest.mark.parametrize(
    "backend, form", [("aot_eager", "weight"), ("aot_eager", "module"), ("inductor", "weight")]
)
def test_compiled_linear_loss_entropy_gradient_at_zero_policy_gradient_tokens(backend, form):
    hidden, W, bias, ids, weights, mask, old = _compile_case()
    kw = dict(old_logprobs=old, epsilon_low=0.1, epsilon_high=0.1, entropy_coeff=0.37, chunk_rows=3, vocab_block=4)

    def head():
        if form == "weight":
            w, b = W.clone().requires_grad_(), bias.clone().requires_grad_()
            return (w, b), dict(lm_head=w, bias=b)
        lin = torch.nn.Linear(W.shape[1], W.shape[0], dtype=F64)
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(bias)
        return (lin.weight, lin.bias), dict(lm_head=lin)

    def step(h, lm_head, b):
        return rk.rspo_linear_loss(h, lm_head, ids, weights, mask, bias=b, **kw)

    # Oracle: float64 autograd through the full logits.
    h_ref = hidden.clone().requires_grad_()
    w_ref, b_ref = W.clone().requires_grad_(), bias.clone().requires_grad_()
    logits = torch.nn.functional.linear(h_ref, w_ref, b_ref)
    ent = _entropy(logits)
    m = mask.to(F64)
    pg = rspo_loss_reference(logits, ids, weights, mask, old_logprobs=old, epsilon_low=0.1, epsilon_high=0.1)
    want = pg - 0.37 * (ent * m).sum() / m.sum()
    want.backward()

    h = hidden.clone().requires_grad_()
    params, head_kw = head()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fn = _compiled(step, backend)
        loss = fn(h, head_kw["lm_head"], head_kw.get("bias"))
        loss.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(h.grad, h_ref.grad)
    torch.testing.assert_close(params[0].grad, w_ref.grad)
    torch.testing.assert_close(params[1].grad, b_ref.grad)


def test_compiled_token_logprobs_linear_entropy_gradient():
    hidden, W, bias, ids, weights, mask, old = _compile_case(seed=4)
    coef = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    coef[0] = 0.0  # zero log-prob gradient, nonzero entropy gradient

    def fn(h):
        lp, ent = rk.token_logprobs_linear(h, W, ids, bias=bias, mask=mask, return_entropy=True, vocab_block=4)
        return (coef * lp).sum() + ent.sum()

    h_ref = hidden.clone().requires_grad_()
    logits = torch.nn.functional.linear(h_ref, W, bias)
    lp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    ((coef * lp * mask).sum() + (_entropy(logits) * mask).sum()).backward()
    h = hidden.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _compiled(fn, "aot_eager")(h).backward()
    torch.testing.assert_close(h.grad, h_ref.grad)
