"""Fused statistics (sum pi^2, top-k), multi-target log-probs and final-logit soft-capping, against brute force.

The oracle is written here from scratch, in float64: the full ``log_softmax`` of the logits
(soft-capped as Hugging Face's Gemma 2 does, ``c * tanh(z / c)``, then divided by the temperature;
a ``-inf`` logit stays ``-inf``), ``torch.topk`` of it, ``(softmax ** 2).sum(-1)``, and autograd of
that unfused computation for every gradient. Each fused path (chunked logits, Triton under the
interpreter, fused-linear, vocabulary-parallel on 2 gloo processes, ``torch.compile``) is compared
with it; blocks are small so that every path runs over several row chunks and vocabulary blocks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from loss_backends import HAS_TRITON  # noqa: I001  (tests/ is on the path: the other test modules' helpers)

import rspo_kernels as rk
from rspo_kernels.loss.reference import rspo_loss_reference
from rspo_kernels.loss.token_stats import linear_token_stats, token_stats

NEG_INF = float("-inf")
TOL = dict(rtol=1e-10, atol=1e-10)
BLOCKS = dict(chunk_rows=2, vocab_block=5)


def capped(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's ``final_logit_softcapping`` (``logits / c``, ``tanh``, ``* c``), ``-inf`` kept as a mask."""
    if cap is None:
        return z
    return torch.where(z == NEG_INF, z, torch.tanh(z / cap) * cap)


def brute(z: torch.Tensor, temperature: float, cap: float | None) -> torch.Tensor:
    """The full ``(..., V)`` log-softmax of ``cap(z) / T``: the oracle of everything below."""
    return torch.log_softmax(capped(z, cap) / temperature, dim=-1)


def entropy_of(lsm: torch.Tensor) -> torch.Tensor:
    p = lsm.exp()
    return -(p * torch.where(p > 0, lsm, torch.zeros((), dtype=lsm.dtype))).sum(-1)


def logits_case(shape=(2, 3), V=13, seed=0, with_inf=True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, V, generator=g, dtype=torch.float64) * 4.0
    if with_inf:
        flat = z.view(-1, V)
        flat[0, 3] = NEG_INF  # a masked vocabulary entry
        flat[1, ::2] = NEG_INF  # a row half masked
    return z


def finite_ids(lsm: torch.Tensor, K: int, seed: int) -> torch.Tensor:
    """Random ids of finite log-prob, ``(..., K)`` (duplicates allowed)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.isfinite(lsm).double().reshape(-1, lsm.shape[-1])
    return torch.multinomial(w, K, replacement=True, generator=g).view(*lsm.shape[:-1], K)


# ---- statistics and multi-target ids from logits ------------------------------------------------


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logits_stats_match_brute_force(packed, cap, temperature):
    z = logits_case((7,) if packed else (2, 3))
    lsm = brute(z, temperature, cap)
    ids = finite_ids(lsm, 1, seed=1)[..., 0]
    st = rk.token_logprobs(
        z, ids, temperature=temperature, logit_softcap=cap, return_entropy=True, return_sum_pi_squared=True, topk=4
    )
    assert isinstance(st, rk.TokenStats)
    torch.testing.assert_close(st.logprobs, lsm.gather(-1, ids[..., None])[..., 0], **TOL)
    torch.testing.assert_close(st.entropy, entropy_of(lsm), **TOL)
    torch.testing.assert_close(st.sum_pi_squared, (lsm.exp() ** 2).sum(-1), **TOL)
    top = torch.topk(lsm, 4, dim=-1)
    torch.testing.assert_close(st.topk_logprobs, top.values, **TOL)
    assert torch.equal(st.topk_ids, top.indices)
    assert st.topk_ids.dtype == torch.long
    # Only what was asked for.
    only = rk.token_logprobs(z, ids, temperature=temperature, logit_softcap=cap, topk=2)
    assert only.entropy is None and only.sum_pi_squared is None
    torch.testing.assert_close(only.topk_logprobs, top.values[..., :2], **TOL)
    only = rk.token_logprobs(z, ids, temperature=temperature, logit_softcap=cap, return_sum_pi_squared=True)
    assert only.topk_logprobs is None and only.topk_ids is None and only.entropy is None


def test_stats_over_several_row_chunks_and_detached():
    """The row-chunked pass (3 rows a chunk) gives what one chunk gives; the statistics carry no graph."""
    z = logits_case((3, 4), V=9, seed=3).requires_grad_()
    lsm = brute(z.detach(), 0.9, 2.0)
    ids = finite_ids(lsm, 2, seed=4).reshape(-1, 2)
    live = torch.ones(12, dtype=torch.bool)
    st = token_stats(z, ids, live, temperature=0.9, with_entropy=False, sum_pi2=True, topk=9, softcap=2.0, chunk_rows=3)
    flat = lsm.reshape(-1, 9)
    torch.testing.assert_close(st.sum_pi_squared, (flat.exp() ** 2).sum(-1), **TOL)
    torch.testing.assert_close(st.topk_logprobs, torch.topk(flat, 9).values, **TOL)
    torch.testing.assert_close(st.logprobs, flat.gather(-1, ids), **TOL)
    assert st.logprobs.requires_grad
    assert not st.sum_pi_squared.requires_grad and not st.topk_logprobs.requires_grad


@pytest.mark.parametrize("cap", [None, 2.5])
def test_multi_target_logits_values_and_gradients(cap):
    z = logits_case((2, 3), V=11, seed=5)
    lsm = brute(z, 0.8, cap)
    ids = finite_ids(lsm, 4, seed=6)
    ids[0, 0, 1] = ids[0, 0, 0]  # a repeated id: its gradients add up
    g = torch.Generator().manual_seed(7)
    up = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    up_h = torch.randn(2, 3, generator=g, dtype=torch.float64)
    x = z.clone().requires_grad_()
    lp, ent = rk.token_logprobs(x, ids, temperature=0.8, logit_softcap=cap, return_entropy=True)
    assert lp.shape == (2, 3, 4)
    (got,) = torch.autograd.grad((lp * up).sum() + (ent * up_h).sum(), x)
    y = z.clone().requires_grad_()
    lsm_y = brute(y, 0.8, cap)
    want_lp, want_ent = lsm_y.gather(-1, ids), entropy_of(lsm_y)
    (want,) = torch.autograd.grad((want_lp * up).sum() + (want_ent * up_h).sum(), y)
    torch.testing.assert_close(lp, want_lp, **TOL)
    torch.testing.assert_close(ent, want_ent, **TOL)
    torch.testing.assert_close(got, want, **TOL)
    # The closed form of the brief: dz = (sum_k g_k onehot(id_k) - p sum_k g_k) / T (no cap, no entropy).
    if cap is None:
        x = z.clone().requires_grad_()
        (got,) = torch.autograd.grad((rk.token_logprobs(x, ids, temperature=0.8) * up).sum(), x)
        p = lsm.exp()
        closed = torch.zeros_like(z).scatter_add_(-1, ids, up) - p * up.sum(-1, keepdim=True)
        torch.testing.assert_close(got, closed / 0.8, **TOL)


def test_multi_target_with_topk_ids_is_the_differentiable_topk():
    z = logits_case((5,), V=10, seed=8, with_inf=False).requires_grad_()
    st = rk.token_logprobs(z, torch.zeros(5, dtype=torch.long), topk=3)
    lp = rk.token_logprobs(z, st.topk_ids)
    torch.testing.assert_close(lp, st.topk_logprobs, **TOL)
    (g,) = torch.autograd.grad(lp.sum(), z)
    y = z.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(torch.log_softmax(y, -1).gather(-1, st.topk_ids).sum(), y)
    torch.testing.assert_close(g, want, **TOL)


def test_sum_pi_squared_matches_verl():
    """verl's own ``calculate_sum_pi_squared_from_logits`` on the temperature-scaled logits (its actor's order)."""
    verl_F = pytest.importorskip("verl.utils.torch_functional")
    z = logits_case((3, 4), V=40, seed=32, with_inf=False)
    st = rk.token_logprobs(z, torch.zeros(3, 4, dtype=torch.long), temperature=0.6, return_sum_pi_squared=True)
    torch.testing.assert_close(st.sum_pi_squared, verl_F.calculate_sum_pi_squared_from_logits(z / 0.6), **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    z = logits_case((2, 3), V=30, seed=33).to(dtype)
    lsm = brute(z.double(), 0.8, 4.0)  # the same rounded values, in float64
    ids = finite_ids(lsm, 2, seed=34)
    st = rk.token_logprobs(z, ids, temperature=0.8, logit_softcap=4.0, return_sum_pi_squared=True, topk=3)
    assert st.logprobs.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.logprobs.double(), lsm.gather(-1, ids), **tol)
    torch.testing.assert_close(st.sum_pi_squared.double(), (lsm.exp() ** 2).sum(-1), **tol)
    torch.testing.assert_close(st.topk_logprobs.double(), torch.topk(lsm, 3).values, **tol)
    hidden, W, b, mask = linear_case(seed=35)
    h, w, bb = hidden.to(dtype), W.to(dtype), b.to(dtype)
    lsm = brute(h.double() @ w.double().T + bb.double(), 0.8, 4.0)
    lids = ids[..., :1] % W.shape[0]
    st = rk.token_logprobs_linear(h, w, lids, bias=bb, temperature=0.8, logit_softcap=4.0, topk=3, **BLOCKS)
    torch.testing.assert_close(st.logprobs.double(), lsm.gather(-1, lids), **tol)
    torch.testing.assert_close(st.topk_logprobs.double(), torch.topk(lsm, 3).values, **tol)


def test_softcap_matches_hugging_face_gemma2():
    """A tiny ``Gemma2ForCausalLM`` (``final_logit_softcapping``) is the oracle of the cap and its order."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma2Config(
        vocab_size=37,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=0.5,  # small, so that the cap bites on these random logits
    )
    torch.manual_seed(36)
    model = transformers.Gemma2ForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 37, (2, 6))
    targets = torch.randint(0, 37, (2, 6))
    with torch.no_grad():
        logits = model(ids).logits  # capped by the model
        hidden = model.model(ids).last_hidden_state
    want = torch.log_softmax(logits / 0.7, -1)  # the sampler divides the capped logits by T
    st = rk.token_logprobs_linear(
        hidden, model.lm_head, targets, temperature=0.7, logit_softcap=cfg.final_logit_softcapping, topk=5
    )
    torch.testing.assert_close(st.logprobs, want.gather(-1, targets[..., None])[..., 0], **TOL)
    torch.testing.assert_close(st.topk_logprobs, torch.topk(want, 5).values, **TOL)
    raw = model.lm_head(hidden).detach()
    lp = rk.token_logprobs(raw, targets, temperature=0.7, logit_softcap=cfg.final_logit_softcapping)
    torch.testing.assert_close(lp, want.gather(-1, targets[..., None])[..., 0], **TOL)


# ---- soft-capping on every backend of the single-target op and in the losses ---------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softcap_single_target_every_backend(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take half and float32 logits (float64 goes to the torch path)")
    z = logits_case((2, 3), V=150, seed=9) * 3.0  # beyond the cap: tanh saturates
    lsm = brute(z, 0.7, 5.0)
    ids = finite_ids(lsm, 1, seed=10)[..., 0]
    g = torch.Generator().manual_seed(11)
    up, up_h = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    x = z.to(dtype).requires_grad_()
    lp, ent = rk.token_logprobs(x, ids, temperature=0.7, logit_softcap=5.0, return_entropy=True)
    (got,) = torch.autograd.grad((lp * up.to(lp.dtype)).sum() + (ent * up_h.to(ent.dtype)).sum(), x)
    y = z.clone().requires_grad_()
    lsm_y = brute(y, 0.7, 5.0)
    want_lp, want_ent = lsm_y.gather(-1, ids[..., None])[..., 0], entropy_of(lsm_y)
    (want,) = torch.autograd.grad((want_lp * up).sum() + (want_ent * up_h).sum(), y)
    tol = TOL if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lp.double(), want_lp, **tol)
    torch.testing.assert_close(ent.double(), want_ent, **tol)
    torch.testing.assert_close(got.double(), want, **tol)


def test_softcap_inplace_backward(backend):
    """The gradient written over the logits equals the out-of-place one (the cap's factor is read first)."""
    z, ids, mask, weights, old, ref = _loss_case(seed=31)
    z, old, ref = z.float() * 2.0, old.float(), ref.float()
    kw = dict(old_logprobs=old, ref_logprobs=ref, weights_per="token", logit_softcap=5.0, **LOSS_KW)
    grads = []
    for inplace in (False, True):
        x = z.clone().requires_grad_()
        loss = rk.rspo_loss(x * 1.0, ids, weights.float(), mask, inplace_backward=inplace, **kw)
        grads.append(torch.autograd.grad(loss, x)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)
    y = z.double().requires_grad_()
    kw_ref = {k: v for k, v in kw.items() if k != "logit_softcap"}
    kw_ref.update(old_logprobs=old.double(), ref_logprobs=ref.double())
    want = rspo_loss_reference(capped(y, 5.0), ids, weights, mask, **kw_ref)
    (g_want,) = torch.autograd.grad(want, y)
    torch.testing.assert_close(grads[1].double(), g_want, rtol=2e-5, atol=2e-6)


def test_softcap_reference_backend(monkeypatch):
    monkeypatch.setenv("RSPO_KERNELS_BACKEND", "reference")
    z = logits_case((4,), V=9, seed=12, with_inf=False).requires_grad_()
    ids = torch.tensor([0, 3, 8, 2])
    lp = rk.token_logprobs(z, ids, logit_softcap=1.5, temperature=1.3)
    want = brute(z, 1.3, 1.5).gather(-1, ids[:, None])[:, 0]
    torch.testing.assert_close(lp, want, **TOL)
    (g,) = torch.autograd.grad(lp.sum(), z)
    (g_want,) = torch.autograd.grad(want.sum(), z)
    torch.testing.assert_close(g, g_want, **TOL)


def test_softcap_triton_kernel_saturates_without_overflow():
    """``tanh`` from ``exp(-2 |y|)`` in the kernel: huge logits give ``+-c`` and finite gradients."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from rspo_kernels.ops.token_logprobs import fused_token_logprobs

    z = torch.tensor([[[1e30, -1e30, 0.0, 3.0, NEG_INF, 88.0, -88.0, 1e-3]]], dtype=torch.float32)
    ids, live = torch.tensor([3]), torch.tensor([True])
    x = z.clone().requires_grad_()
    lp, ent = fused_token_logprobs(x, ids, live, temperature=1.0, with_entropy=True, softcap=4.0)
    (g,) = torch.autograd.grad(lp.sum() + ent.sum(), x)
    y = z.double().requires_grad_()
    lsm = brute(y, 1.0, 4.0)
    want = lsm[0, 0, 3]
    (g_want,) = torch.autograd.grad(want + entropy_of(lsm).sum(), y)
    torch.testing.assert_close(lp.double()[0], want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g_want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(g).all()


def _loss_case(seed=13, packed=False):
    g = torch.Generator().manual_seed(seed)
    shape = (7,) if packed else (2, 4)
    z = torch.randn(*shape, 17, generator=g, dtype=torch.float64) * 6.0
    ids = torch.randint(0, 17, shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.25
    weights = torch.randn(shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        lp = brute(z, 0.9, 8.0).gather(-1, ids[..., None])[..., 0]
    old = lp + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    ref = lp + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)
    return z, ids, mask, weights, old, ref


LOSS_KW = dict(temperature=0.9, epsilon_high=0.28, clip_ratio_c=3.0, beta=0.05, entropy_coeff=0.01)


@pytest.mark.parametrize("packed", [False, True])
def test_softcap_in_rspo_loss(packed):
    z, ids, mask, weights, old, ref = _loss_case(packed=packed)
    kw = dict(old_logprobs=old, ref_logprobs=ref, return_stats=True, weights_per="token", **LOSS_KW)
    x = z.clone().requires_grad_()
    loss, stats = rk.rspo_loss(x, ids, weights, mask, logit_softcap=8.0, **kw)
    (got,) = torch.autograd.grad(loss, x)
    y = z.clone().requires_grad_()
    want, want_stats = rspo_loss_reference(capped(y, 8.0), ids, weights, mask, **kw)
    (g_want,) = torch.autograd.grad(want, y)
    torch.testing.assert_close(loss, want, **TOL)
    torch.testing.assert_close(got, g_want, **TOL)
    for k, v in want_stats.items():
        torch.testing.assert_close(stats[k], v, **TOL, msg=k)
    # The reference's own logit_softcap is the same specification.
    spec = rspo_loss_reference(y, ids, weights, mask, logit_softcap=8.0, **kw)[0]
    torch.testing.assert_close(spec, want, **TOL)
    # And the module: on-policy, so the loss is -mean(A) whatever the cap; the gradient is not.
    crit = rk.RSPOLoss("pass@k", k=2, logit_softcap=8.0, temperature=0.9)
    rewards = torch.tensor([1.0, 0.0])
    kwp = {} if not packed else dict(cu_seqlens=torch.tensor([0, 3, 7]))
    w = crit.weights(rewards, group_size=2).double()
    grads = []
    for fn in (
        lambda x: crit(x, ids, rewards, group_size=2, mask=mask, **kwp),
        lambda x: rk.rspo_loss(x, ids, w, mask, temperature=0.9, logit_softcap=8.0, weights_per="sequence", **kwp),
        lambda x: rk.rspo_loss(x, ids, w, mask, temperature=0.9, weights_per="sequence", **kwp),
    ):
        x = z.clone().requires_grad_()
        grads.append(torch.autograd.grad(fn(x), x)[0])
    torch.testing.assert_close(grads[0], grads[1], **TOL)
    assert not torch.allclose(grads[0], grads[2])  # the cap (8 < |logits|) changes the gradient: the test can fail


# ---- the fused-linear path ----------------------------------------------------------------------


def linear_case(shape=(2, 3), H=6, V=14, seed=14):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 2.0
    b = torch.randn(V, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) > 0.3
    mask.view(-1)[0] = True
    return hidden, W, b, mask


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_linear_stats_multi_target_and_softcap(packed, cap):
    hidden, W, b, mask = linear_case((7,) if packed else (2, 4))
    hidden[~mask] = float("nan")  # masked rows are never read
    K = 3
    g = torch.Generator().manual_seed(15)
    ids = torch.randint(0, W.shape[0], (*mask.shape, K), generator=g)
    ids[~mask] = -100  # masked tokens may hold any id
    up = torch.randn(*mask.shape, K, generator=g, dtype=torch.float64)
    up_h = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (hidden, W, b)]
    st = rk.token_logprobs_linear(
        leaves[0],
        leaves[1],
        ids,
        bias=leaves[2],
        mask=mask,
        temperature=0.8,
        logit_softcap=cap,
        return_entropy=True,
        return_sum_pi_squared=True,
        topk=4,
        **BLOCKS,
    )
    got = torch.autograd.grad((st.logprobs * up).sum() + (st.entropy * up_h).sum(), leaves)
    ref = [t.clone().requires_grad_() for t in (torch.nan_to_num(hidden), W, b)]
    lsm = brute(ref[0] @ ref[1].T + ref[2], 0.8, cap)
    m, m3 = mask, mask[..., None]
    want_lp = torch.where(m3, lsm.gather(-1, ids.clamp(min=0)), 0.0)
    want_ent = torch.where(m, entropy_of(lsm), 0.0)
    want = torch.autograd.grad((want_lp * up).sum() + (want_ent * up_h).sum(), ref)
    torch.testing.assert_close(st.logprobs, want_lp, **TOL)
    torch.testing.assert_close(st.entropy, want_ent, **TOL)
    torch.testing.assert_close(st.sum_pi_squared, torch.where(m, (lsm.exp() ** 2).sum(-1), 0.0).detach(), **TOL)
    top = torch.topk(lsm.detach(), 4, dim=-1)
    torch.testing.assert_close(st.topk_logprobs, torch.where(m3, top.values, 0.0), **TOL)
    assert torch.equal(st.topk_ids[m], top.indices[m])
    assert (st.topk_ids[~m] == 0).all() and (st.topk_logprobs[~m] == 0).all()
    for name, a, w_ in zip(("hidden", "weight", "bias"), got, want, strict=True):
        torch.testing.assert_close(a, w_, **TOL, msg=name)
    assert (got[0][~mask] == 0).all()


@pytest.mark.parametrize("cap", [None, 4.0])
def test_linear_single_target_softcap_and_head_module(cap):
    hidden, W, b, mask = linear_case(seed=16)
    ids = torch.randint(0, W.shape[0], mask.shape, generator=torch.Generator().manual_seed(17))
    leaves = [t.clone().requires_grad_() for t in (hidden, W, b)]
    lp, ent = rk.token_logprobs_linear(
        leaves[0], leaves[1], ids, bias=leaves[2], temperature=1.2, logit_softcap=cap, return_entropy=True, **BLOCKS
    )
    got = torch.autograd.grad(lp.sum() + 0.5 * ent.sum(), leaves)
    ref = [t.clone().requires_grad_() for t in (hidden, W, b)]
    lsm = brute(ref[0] @ ref[1].T + ref[2], 1.2, cap)
    want_lp = lsm.gather(-1, ids[..., None])[..., 0]
    want = torch.autograd.grad(want_lp.sum() + 0.5 * entropy_of(lsm).sum(), ref)
    torch.testing.assert_close(lp, want_lp, **TOL)
    for a, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(a, w_, **TOL)
    # The head as a module: the statistics run as its forward.
    head = torch.nn.Linear(W.shape[1], W.shape[0], dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(W)
        head.bias.copy_(b)
    st = rk.token_logprobs_linear(hidden, head, ids, temperature=1.2, logit_softcap=cap, topk=2, **BLOCKS)
    torch.testing.assert_close(st.logprobs, want_lp.detach(), **TOL)
    torch.testing.assert_close(st.topk_logprobs, torch.topk(lsm.detach(), 2).values, **TOL)
    assert st.entropy is None and st.sum_pi_squared is None


@pytest.mark.parametrize("packed", [False, True])
def test_softcap_in_rspo_linear_loss(packed):
    hidden, W, b, mask = linear_case((7,) if packed else (2, 4), V=17, seed=18)
    W = W * 3.0  # logits well beyond the cap
    g = torch.Generator().manual_seed(19)
    ids = torch.randint(0, 17, mask.shape, generator=g)
    weights = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        lp = brute(hidden @ W.T + b, 0.9, 8.0).gather(-1, ids[..., None])[..., 0]
    old = lp + 0.3 * torch.randn(mask.shape, generator=g, dtype=torch.float64)
    kw = dict(old_logprobs=old, ref_logprobs=lp.clone(), return_stats=True, weights_per="token", **LOSS_KW)
    leaves = [t.clone().requires_grad_() for t in (hidden, W, b)]
    loss, stats = rk.rspo_linear_loss(
        leaves[0], leaves[1], ids, weights, mask, bias=leaves[2], logit_softcap=8.0, **BLOCKS, **kw
    )
    got = torch.autograd.grad(loss, leaves)
    ref = [t.clone().requires_grad_() for t in (hidden, W, b)]
    want, want_stats = rspo_loss_reference(capped(ref[0] @ ref[1].T + ref[2], 8.0), ids, weights, mask, **kw)
    g_want = torch.autograd.grad(want, ref)
    torch.testing.assert_close(loss, want, **TOL)
    for name, a, w_ in zip(("hidden", "weight", "bias"), got, g_want, strict=True):
        torch.testing.assert_close(a, w_, **TOL, msg=name)
    for k, v in want_stats.items():
        torch.testing.assert_close(stats[k], v, **TOL, msg=k)
    crit = rk.RSPOLinearLoss("pass@k", k=2, logit_softcap=8.0, temperature=0.9, **BLOCKS)
    rewards = torch.tensor([1.0, 0.0])
    kwp = {} if not packed else dict(cu_seqlens=torch.tensor([0, 3, 7]))
    got_m = crit(hidden, W, ids, rewards, bias=b, group_size=2, mask=mask, **kwp)
    w = crit.weights(rewards, group_size=2).double()
    want_m = rk.rspo_linear_loss(
        hidden, W, ids, w, mask, bias=b, temperature=0.9, logit_softcap=8.0, weights_per="sequence", **kwp
    )
    torch.testing.assert_close(got_m, want_m, **TOL)


def test_linear_reference_backend_stats(monkeypatch):
    """``RSPO_KERNELS_BACKEND=reference`` builds the logits unfused and runs the same statistics."""
    hidden, W, b, mask = linear_case(seed=20)
    ids = torch.randint(0, W.shape[0], (*mask.shape, 2), generator=torch.Generator().manual_seed(21))
    want = rk.token_logprobs_linear(hidden, W, ids, bias=b, mask=mask, logit_softcap=2.0, return_sum_pi_squared=True)
    monkeypatch.setenv("RSPO_KERNELS_BACKEND", "reference")
    got = rk.token_logprobs_linear(hidden, W, ids, bias=b, mask=mask, logit_softcap=2.0, return_sum_pi_squared=True)
    torch.testing.assert_close(got.logprobs, want.logprobs, **TOL)
    torch.testing.assert_close(got.sum_pi_squared, want.sum_pi_squared, **TOL)


def test_linear_stats_internal_blocks_agree():
    """One block or many: the running log-sum-exp, sum pi^2 and top-k merge exactly."""
    hidden, W, b, _ = linear_case((9,), V=23, seed=22)
    ids = torch.randint(0, 23, (9, 3), generator=torch.Generator().manual_seed(23))
    live = torch.ones(9, dtype=torch.bool)
    kw = dict(temperature=0.6, with_entropy=True, sum_pi2=True, topk=5, softcap=2.0)
    h3 = hidden[None]
    one = linear_token_stats(h3, W, b, ids, live, chunk_rows=64, vocab_block=64, **kw)
    many = linear_token_stats(h3, W, b, ids, live, chunk_rows=2, vocab_block=3, **kw)
    for a, c in zip(one, many, strict=True):
        torch.testing.assert_close(a, c, **TOL)


# ---- torch.compile ------------------------------------------------------------------------------


def _compile(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_torch_compile_logits_and_linear():
    z = logits_case((2, 3), V=12, seed=24, with_inf=False)
    ids = torch.randint(0, 12, (2, 3, 2), generator=torch.Generator().manual_seed(25))

    def logits_fn(x):
        st = rk.token_logprobs(x, ids, logit_softcap=3.0, return_sum_pi_squared=True, topk=3, return_entropy=True)
        return st.logprobs, st.entropy, st.sum_pi_squared, st.topk_logprobs

    def single_fn(x):
        return rk.token_logprobs(x, ids[..., 0], logit_softcap=3.0)

    hidden, W, b, mask = linear_case(seed=26)
    hidden[~mask] = float("nan")
    lids = torch.randint(0, W.shape[0], (*mask.shape, 2), generator=torch.Generator().manual_seed(27))

    def linear_fn(h, w):
        st = rk.token_logprobs_linear(
            h, w, lids, bias=b, mask=mask, logit_softcap=3.0, return_sum_pi_squared=True, topk=2, **BLOCKS
        )
        return st.logprobs, st.sum_pi_squared, st.topk_logprobs

    with warnings.catch_warnings():
        # Dynamo's tracing of autograd.Function instantiates it (a torch-internal deprecation).
        warnings.simplefilter("ignore", DeprecationWarning)
        for fn in (logits_fn, single_fn):
            x, y = z.clone().requires_grad_(), z.clone().requires_grad_()
            got, want = _compile(fn)(x), fn(y)
            got, want = (
                (got,) if isinstance(got, torch.Tensor) else got,
                (want,) if isinstance(want, torch.Tensor) else want,
            )
            for a, c in zip(got, want, strict=True):
                torch.testing.assert_close(a, c, **TOL)
            (ga,) = torch.autograd.grad(got[0].sum() + (got[1].sum() if len(got) > 1 else 0), x)
            (gb,) = torch.autograd.grad(want[0].sum() + (want[1].sum() if len(want) > 1 else 0), y)
            torch.testing.assert_close(ga, gb, **TOL)
        la = [t.clone().requires_grad_() for t in (hidden, W)]
        lb = [t.clone().requires_grad_() for t in (hidden, W)]
        got, want = _compile(linear_fn)(*la), linear_fn(*lb)
        for a, c in zip(got, want, strict=True):
            torch.testing.assert_close(a, c, **TOL)
        ga = torch.autograd.grad(got[0].sum(), la)
        gb = torch.autograd.grad(want[0].sum(), lb)
    for a, c in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, c, **TOL)
    assert (ga[0][~mask] == 0).all()


# ---- errors -------------------------------------------------------------------------------------


def test_argument_errors():
    z, ids = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    h, W = torch.randn(2, 3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"topk must lie in \[1, V=5\]"):
        rk.token_logprobs(z, ids, topk=6)
    with pytest.raises(ValueError, match="topk must lie"):
        rk.token_logprobs_linear(h, W, ids, topk=0)
    with pytest.raises(TypeError, match="topk must be an int"):
        rk.token_logprobs(z, ids, topk=2.0)
    with pytest.raises(ValueError, match="logit_softcap must be a finite float > 0"):
        rk.token_logprobs(z, ids, logit_softcap=0.0)
    with pytest.raises(TypeError, match="logit_softcap must be a positive float"):
        rk.rspo_loss(z, ids, torch.ones(2), logit_softcap="30")
    with pytest.raises(ValueError, match="logit_softcap must be a finite float > 0"):
        rk.rspo_linear_loss(h, W, ids, torch.ones(2), logit_softcap=float("inf"))
    with pytest.raises(ValueError, match="logit_softcap"):
        rk.RSPOLoss("pass@k", k=2, logit_softcap=-1.0)
    with pytest.raises(TypeError, match="return_sum_pi_squared must be True or False"):
        rk.token_logprobs(z, ids, return_sum_pi_squared=1)
    with pytest.raises(ValueError, match="K >= 1"):
        rk.token_logprobs(z, torch.zeros(2, 3, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="target_ids must have shape"):
        rk.token_logprobs(z, torch.zeros(2, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, V=5\)"):
        rk.token_logprobs(z, torch.full((2, 3, 2), 5))


# ---- tensor parallelism on 2 gloo processes -----------------------------------------------------

V_REAL, TP = 21, 2


def _tp_inputs():
    g = torch.Generator().manual_seed(30)
    v_local = -(-V_REAL // TP) + 1  # 12 per rank: the last rank holds 3 padded rows
    v_pad = v_local * TP
    hidden = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    W = torch.randn(v_pad, 5, generator=g, dtype=torch.float64) * 2.0
    W[V_REAL:] = 40.0  # garbage padding: it would dominate every statistic if not masked
    b = torch.randn(v_pad, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 3, generator=g) > 0.3
    mask[0, 0] = True
    ids = torch.randint(0, V_REAL, (2, 3, 3), generator=g)
    up = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    weights = torch.randn(2, 3, generator=g, dtype=torch.float64)
    return v_local, hidden, W, b, mask, ids, up, weights


def _tp_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    group = dist.group.WORLD
    v_local, hidden, W, b, mask, ids, up, weights = _tp_inputs()
    rows = slice(rank * v_local, (rank + 1) * v_local)
    tp = dict(tp_group=group, vocab_start=rank * v_local, vocab_size=V_REAL)
    stat_kw = dict(temperature=0.8, logit_softcap=3.0, return_entropy=True, return_sum_pi_squared=True, topk=4)
    for cap in (None, 3.0):
        stat_kw["logit_softcap"] = cap
        ref = [t.clone().requires_grad_() for t in (hidden, W[:V_REAL], b[:V_REAL])]
        z_full = ref[0] @ ref[1].T + ref[2]
        lsm = brute(z_full, 0.8, cap)
        want_lp, want_ent = lsm.gather(-1, ids), entropy_of(lsm)
        # Logits path: this rank's slice of the padded logits.
        full = hidden @ W.T + b
        z = full[..., rows].clone().requires_grad_()
        st = rk.token_logprobs(z, ids, **tp, **stat_kw)
        torch.testing.assert_close(st.logprobs, want_lp, **TOL)
        torch.testing.assert_close(st.entropy, want_ent, **TOL)
        torch.testing.assert_close(st.sum_pi_squared, (lsm.exp() ** 2).sum(-1), **TOL)
        top = torch.topk(lsm.detach(), 4)
        torch.testing.assert_close(st.topk_logprobs, top.values, **TOL)
        assert torch.equal(st.topk_ids, top.indices)
        (gz,) = torch.autograd.grad((st.logprobs * up).sum() + st.entropy.sum(), z)
        zr = z_full.detach().requires_grad_()
        lsm_r = brute(zr, 0.8, cap)
        (gz_r,) = torch.autograd.grad((lsm_r.gather(-1, ids) * up).sum() + entropy_of(lsm_r).sum(), zr)
        gz_pad = torch.zeros(*gz_r.shape[:-1], v_local * world, dtype=torch.float64)
        gz_pad[..., :V_REAL] = gz_r
        torch.testing.assert_close(gz, gz_pad[..., rows], **TOL)
        # Fused-linear path with a mask.
        leaves = [hidden.clone().requires_grad_(), W[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()]
        st = rk.token_logprobs_linear(leaves[0], leaves[1], ids, bias=leaves[2], mask=mask, **BLOCKS, **tp, **stat_kw)
        m3 = mask[..., None]
        torch.testing.assert_close(st.logprobs, torch.where(m3, want_lp, 0.0), **TOL)
        torch.testing.assert_close(st.sum_pi_squared, torch.where(mask, (lsm.exp() ** 2).sum(-1), 0.0), **TOL)
        torch.testing.assert_close(st.topk_logprobs, torch.where(m3, top.values, 0.0), **TOL)
        assert torch.equal(st.topk_ids[mask], top.indices[mask])
        got = torch.autograd.grad((st.logprobs * up).sum() + st.entropy.sum(), leaves)
        want = torch.autograd.grad((torch.where(m3, want_lp, 0.0) * up).sum() + want_ent[mask].sum(), ref)
        torch.testing.assert_close(got[0], want[0], **TOL)
        for a, w_ in zip(got[1:], want[1:], strict=True):
            pad = torch.zeros((v_local * world, *w_.shape[1:]), dtype=torch.float64)
            pad[:V_REAL] = w_
            torch.testing.assert_close(a, pad[rows], **TOL)
    # The losses with soft-capping, vocabulary-parallel.
    kw = dict(temperature=0.8, logit_softcap=3.0, weights_per="token", entropy_coeff=0.01)
    ids1 = ids[..., 0]
    ref = [t.clone().requires_grad_() for t in (hidden, W[:V_REAL], b[:V_REAL])]
    kw_ref = {k: v for k, v in kw.items() if k != "logit_softcap"}
    want = rspo_loss_reference(capped(ref[0] @ ref[1].T + ref[2], 3.0), ids1, weights, mask, **kw_ref)
    g_want = torch.autograd.grad(want, ref)
    leaves = [hidden.clone().requires_grad_(), W[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()]
    loss = rk.rspo_linear_loss(leaves[0], leaves[1], ids1, weights, mask, bias=leaves[2], **BLOCKS, **tp, **kw)
    got = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(loss, want, **TOL)
    torch.testing.assert_close(got[0], g_want[0], **TOL)
    for a, w_ in zip(got[1:], g_want[1:], strict=True):
        pad = torch.zeros((v_local * world, *w_.shape[1:]), dtype=torch.float64)
        pad[:V_REAL] = w_
        torch.testing.assert_close(a, pad[rows], **TOL)
    z = (hidden @ W.T + b)[..., rows].clone().requires_grad_()
    loss_z = rk.rspo_loss(z, ids1, weights, mask, **tp, **kw)
    torch.testing.assert_close(loss_z, want, **TOL)
    zr = (hidden @ W[:V_REAL].T + b[:V_REAL]).requires_grad_()
    (gz_r,) = torch.autograd.grad(rspo_loss_reference(capped(zr, 3.0), ids1, weights, mask, **kw_ref), zr)
    (gz,) = torch.autograd.grad(loss_z, z)
    gz_pad = torch.zeros(*gz_r.shape[:-1], v_local * world, dtype=torch.float64)
    gz_pad[..., :V_REAL] = gz_r
    torch.testing.assert_close(gz, gz_pad[..., rows], **TOL)


def test_tensor_parallel_two_gloo_processes():
    import dist_workers

    dist_workers.spawn(_tp_worker, TP, timeout=240.0)
