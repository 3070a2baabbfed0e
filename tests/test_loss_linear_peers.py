"""The fused-linear loss against its peers: Liger-Kernel's fused linear GRPO loss and cut-cross-entropy.

Both are test oracles from the optional ``peers`` extra (``pip install -e ".[peers]"``); each test
skips cleanly when its peer is absent.

Liger-Kernel 0.8.5, ``LigerFusedLinearGRPOLoss`` (``liger_kernel.chunked_loss``), compared with
:func:`rspo_kernels.rspo_linear_loss` on what both support: token-level importance sampling, no
dual-clip (Liger's ``delta`` caps the ratio itself; verl's ``clip_ratio_c`` is another rule), the
k3 KL to given reference log-probs, and log-ratios inside ``[-20, 20]`` (Liger does not clamp the
log-ratio; we clamp it as verl does). Its ``loss_type`` maps onto our ``loss_agg_mode``:

==================  ===========================================  ==================================
Liger ``loss_type``  its aggregation (mask ``m``, ``B`` rows)       ours
==================  ===========================================  ==================================
``"bnpo"``           ``sum(m l) / sum(m)``                         ``"token-mean"``
``"dapo"``           ``sum(m l) / sum(m)`` (one process, no        ``"token-mean"``
                     ``num_items_in_batch``)
``"grpo"``           ``sum_b [sum_t m l / max(n_b, 1)] / B``       ``"seq-mean-token-mean"``
``"dr_grpo"``        ``sum(m l) / (B * max_completion_length)``    ``"seq-mean-token-sum-norm"`` with
                                                                   ``max_response_length =
                                                                   max_completion_length``
==================  ===========================================  ==================================

``token-sum`` and ``seq-mean-token-sum`` have no Liger counterpart (nor do Liger's ``luspo``,
``cispo``, ``sapo``, ``vespo``). Fully masked rows: Liger counts them in ``B`` for ``grpo`` and
``dr_grpo``, while verl's ``agg_loss`` (and we) average over the ``G`` sequences with at least one
token; so with fully masked rows Liger's loss and gradients are ours times ``G / B``
(:func:`test_fully_masked_rows_liger_divides_by_all_rows`). ``bnpo``/``dapo`` are unaffected. Liger
also runs its matmuls on masked rows (only the loss is masked), so NaN hidden states there reach
its gradients; ours never reads those rows. Its clip metric (lower-clipped with ``A < 0`` or
upper-clipped with ``A > 0``) is our ``clip_fraction``; its KL metric is our ``ref_kl``.

cut-cross-entropy 25.1, ``linear_cross_entropy(e, c, targets, impl="torch_compile",
reduction="none")`` is ``-log_softmax(e @ c.T)[target]`` per token (no bias, no temperature): it
checks :func:`rspo_kernels.token_logprobs_linear` and its gradients.
"""

from __future__ import annotations

import pytest
import torch

import rspo_kernels as rk
from rspo_kernels.loss.reference import token_logprobs_reference

B, T, H, V = 4, 6, 8, 37
LIGER_MODES = [
    ("bnpo", "token-mean"),
    ("dapo", "token-mean"),
    ("grpo", "seq-mean-token-mean"),
    ("dr_grpo", "seq-mean-token-sum-norm"),
]


def _case(seed=0, fully_masked_row=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.6
    bias = torch.randn(V, generator=g) * 0.3
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    if fully_masked_row:
        mask[2] = False
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        true = token_logprobs_reference(hidden @ weight.T + bias, ids, temperature=0.7)
    old = true + 0.5 * torch.randn(B, T, generator=g)  # ratios on both sides of the clip range
    ref = true + 0.3 * torch.randn(B, T, generator=g)
    return dict(hidden=hidden, weight=weight, bias=bias, ids=ids, mask=mask, adv=adv, old=old, ref=ref)


def _leaves(c):
    return [c[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]


def _ours(c, mode):
    h, w, b = _leaves(c)
    loss, stats = rk.rspo_linear_loss(
        h,
        w,
        c["ids"],
        c["adv"],
        c["mask"],
        bias=b,
        old_logprobs=c["old"],
        ref_logprobs=c["ref"],
        beta=0.05,
        temperature=0.7,
        epsilon_low=0.2,
        epsilon_high=0.28,
        loss_agg_mode=mode,
        max_response_length=T,
        return_stats=True,
        chunk_rows=5,
        vocab_block=10,
    )
    loss.backward()
    return loss, stats, (h.grad, w.grad, b.grad)


def _liger(c, loss_type):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    crit = liger.LigerFusedLinearGRPOLoss(
        beta=0.05,
        compiled=False,
        use_ref_model=True,
        chunk_size=2,
        epsilon_low=0.2,
        epsilon_high=0.28,
        loss_type=loss_type,
        max_completion_length=T,
        temperature=0.7,
    )
    h, w, b = _leaves(c)
    loss, metrics = crit(
        h, w, c["ids"], c["mask"].long(), c["adv"], bias=b, ref_per_token_logps=c["ref"], old_per_token_logps=c["old"]
    )
    loss.backward()
    return loss, metrics, (h.grad, w.grad, b.grad)


@pytest.mark.parametrize("loss_type,mode", LIGER_MODES)
def test_matches_liger_fused_linear_grpo(loss_type, mode):
    c = _case()
    loss, stats, grads = _ours(c, mode)
    loss_l, (kl_l, clip_l), grads_l = _liger(c, loss_type)
    torch.testing.assert_close(loss, loss_l)
    torch.testing.assert_close(stats["ref_kl"], kl_l)
    torch.testing.assert_close(stats["clip_fraction"], clip_l)
    assert 0 < float(clip_l) < 1  # clipping happens on both sides of the range
    for name, g, g_l in zip(("hidden", "weight", "bias"), grads, grads_l, strict=False):
        torch.testing.assert_close(g, g_l, msg=name)


@pytest.mark.parametrize(
    "loss_type,mode", [("grpo", "seq-mean-token-mean"), ("dr_grpo", "seq-mean-token-sum-norm"), ("bnpo", "token-mean")]
)
def test_fully_masked_rows_liger_divides_by_all_rows(loss_type, mode):
    c = _case(seed=1, fully_masked_row=True)
    loss, _, grads = _ours(c, mode)
    loss_l, _, grads_l = _liger(c, loss_type)
    factor = 1.0 if loss_type == "bnpo" else (B - 1) / B  # G = 3 non-empty rows of B = 4
    torch.testing.assert_close(loss * factor, loss_l)
    for g, g_l in zip(grads, grads_l, strict=False):
        torch.testing.assert_close(g * factor, g_l)


# torch.compile's tracer reads .grad of the non-leaf tensors it wraps, which warns.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit._script")  # inductor's own imports
def test_token_logprobs_linear_matches_cut_cross_entropy():
    cce = pytest.importorskip("cut_cross_entropy")
    c = _case(seed=2)
    h, w, _ = _leaves(c)
    grad_out = torch.randn(B, T, generator=torch.Generator().manual_seed(3))
    lp = rk.token_logprobs_linear(h, w, c["ids"], chunk_rows=5, vocab_block=10)
    (lp * grad_out).sum().backward()
    h2, w2, _ = _leaves(c)
    ce = cce.linear_cross_entropy(h2, w2, c["ids"], impl="torch_compile", reduction="none")
    (-ce * grad_out).sum().backward()
    torch.testing.assert_close(lp, -ce.detach())
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
