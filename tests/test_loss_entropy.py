"""The differentiable entropy and the entropy bonus (``entropy_coeff``) on every backend.

The oracle is float64 autograd through the full logits, written here independently of the library's
entropy code: ``H = -(softmax(x) * log_softmax(x)).sum(-1)`` with ``x = logits / T``, aggregated by
:func:`agg_loss_reference` (itself checked against verl's ``agg_loss``), subtracted from the policy
loss of the specification with ``entropy_coeff=0``, as verl's ``ppo_loss`` does.
"""

from __future__ import annotations

import pytest
import torch
from loss_backends import on_device
from test_loss_reference import assert_matches, loss_kwargs, make_case, pack_case

import rspo_kernels as rk
from rspo_kernels.loss.options import LOSS_AGG_MODES, LossOptions
from rspo_kernels.loss.reference import agg_loss_reference, rspo_loss_reference, token_logprobs_reference

COEFF = 0.37


def _entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    return -(logp_all.exp() * logp_all).sum(-1)


def oracle_loss(logits, target_ids, weights, mask, *, mode, max_len=None, **kw):
    """``pg_loss - COEFF * agg(entropy)`` in float64 through the full ``(B, T, V)`` logits."""
    pg = rspo_loss_reference(logits, target_ids, weights, mask, loss_agg_mode=mode, max_response_length=max_len, **kw)
    ent = _entropy(logits, kw.get("temperature", 1.0))
    m = torch.ones(ent.shape, dtype=ent.dtype) if mask is None else mask.to(ent.dtype)
    return pg - COEFF * agg_loss_reference(ent, m, mode, max_len)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_logits_loss_with_entropy_bonus_matches_float64_autograd(mode, packed):
    case = make_case(B=4, T=6, V=29, dtype=torch.float64, seed=7)
    padded, packed_kw = pack_case(case, [4, 1, 6, 3])
    kw = loss_kwargs(case, clip_ratio_c=3.0)
    for k in ("old_logprobs", "ref_logprobs"):
        kw.pop(k)
    x = padded["logits"].clone().requires_grad_()
    want = oracle_loss(
        x,
        padded["target_ids"],
        padded["weights"],
        padded["mask"],
        mode=mode,
        max_len=6,
        old_logprobs=padded["old_logprobs"],
        ref_logprobs=padded["ref_logprobs"],
        **kw,
    )
    (g_want,) = torch.autograd.grad(want, x)
    src = dict(packed_kw) if packed else dict(padded)
    y = src.pop("logits").clone().requires_grad_()
    loss, stats = rk.rspo_loss(
        y, **src, loss_agg_mode=mode, max_response_length=6, entropy_coeff=COEFF, return_stats=True, **kw
    )
    (g,) = torch.autograd.grad(loss, y)
    assert_matches(loss, want, torch.float64)
    assert_matches(g, g_want[padded["mask"]] if packed else g_want, torch.float64)
    assert not stats["entropy_mean"].requires_grad
    # The bonus changes the gradient (the test would pass vacuously otherwise).
    loss0 = rk.rspo_loss(y, **src, loss_agg_mode=mode, max_response_length=6, **kw)
    (g0,) = torch.autograd.grad(loss0, y)
    assert float((g0 - g).abs().max()) > 1e-3


def _linear_case(seed=0, B=4, T=6, H=5, V=23):
    g = torch.Generator().manual_seed(seed)
    base = make_case(B=B, T=T, V=V, dtype=torch.float64, seed=seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    return base, hidden, weight, bias


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_linear_loss_with_entropy_bonus_matches_float64_autograd(mode, packed):
    base, hidden, weight, bias = _linear_case(seed=3)
    lengths = [4, 1, 6, 3]
    padded, _ = pack_case(base, lengths)
    mask = padded["mask"]
    kw = dict(temperature=0.7, epsilon_low=0.2, epsilon_high=0.28, clip_ratio_c=3.0, beta=0.05)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    want = oracle_loss(
        h @ w.T + b,
        padded["target_ids"],
        padded["weights"],
        mask,
        mode=mode,
        max_len=6,
        old_logprobs=padded["old_logprobs"],
        ref_logprobs=padded["ref_logprobs"],
        **kw,
    )
    want_g = torch.autograd.grad(want, (h, w, b))
    h2, w2, b2 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    tok = (lambda t: t[mask]) if packed else (lambda t: t)  # noqa: E731
    loss = rk.rspo_linear_loss(
        tok(h2),
        w2,
        tok(padded["target_ids"]),
        padded["weights"],
        None if packed else mask,
        bias=b2,
        old_logprobs=tok(padded["old_logprobs"]),
        ref_logprobs=tok(padded["ref_logprobs"]),
        cu_seqlens=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]) if packed else None,
        loss_agg_mode=mode,
        max_response_length=6,
        entropy_coeff=COEFF,
        chunk_rows=5,
        vocab_block=7,
        **kw,
    )
    got_g = torch.autograd.grad(loss, (h2, w2, b2))
    assert_matches(loss, want, torch.float64)
    for name, got, exp in zip(("hidden", "weight", "bias"), got_g, want_g, strict=True):
        assert_matches(got, exp, torch.float64, name)


@pytest.mark.parametrize("path", ["logits", "linear"])
def test_both_outputs_differentiable_with_masks_temperature_and_inf_logits(path):
    """Random upstream gradients on log-probs and entropies: every logit's gradient to 1e-10."""
    torch.manual_seed(0)
    B, T, H, V = 3, 4, 6, 19
    ids = torch.randint(0, V, (B, T))
    gl, ge = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    if path == "logits":
        x = torch.randn(B, T, V, dtype=torch.float64)
        x[0, 1, 3:11] = float("-inf")  # vocabulary masking: p = 0 there, the gradient stays finite
        ids[0, 1] = 0
        leaves = (x.clone().requires_grad_(),)
        lp, ent = rk.token_logprobs(leaves[0], ids, temperature=0.6, return_entropy=True)
        ref_leaves = (x.clone().requires_grad_(),)
        logits = ref_leaves[0]
    else:
        bias = torch.randn(V, dtype=torch.float64)
        bias[5:9] = float("-inf")
        ids[ids == 6] = 0
        tensors = (torch.randn(B, T, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64), bias)
        leaves = tuple(t.clone().requires_grad_() for t in tensors[:2])
        lp, ent = rk.token_logprobs_linear(
            *leaves, ids, bias=bias, temperature=0.6, return_entropy=True, chunk_rows=5, vocab_block=4
        )
        ref_leaves = tuple(t.clone().requires_grad_() for t in tensors[:2])
        logits = ref_leaves[0] @ ref_leaves[1].T + bias
    assert lp.requires_grad and ent.requires_grad
    lp_r, ent_r = token_logprobs_reference(logits, ids, temperature=0.6, return_entropy=True)
    assert_matches(ent, ent_r, torch.float64)
    for upstream in ((gl, ge), (None, ge), (gl, None)):
        terms = [(o * u).sum() for o, u in zip((lp, ent), upstream, strict=True) if u is not None]
        terms_r = [(o * u).sum() for o, u in zip((lp_r, ent_r), upstream, strict=True) if u is not None]
        got = torch.autograd.grad(sum(terms), leaves, retain_graph=True)
        want = torch.autograd.grad(sum(terms_r), ref_leaves, retain_graph=True)
        for a, b in zip(got, want, strict=True):
            assert torch.isfinite(a).all()
            assert_matches(a, b, torch.float64)


def test_gradcheck_entropy_outputs_and_bonus():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(lambda z: rk.token_logprobs(z, ids, temperature=0.8, return_entropy=True), (x,))
    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    fn = lambda hh, ww, bb: rk.token_logprobs_linear(  # noqa: E731
        hh, ww, ids, bias=bb, temperature=0.8, return_entropy=True, chunk_rows=2, vocab_block=3
    )
    assert torch.autograd.gradcheck(fn, (h, w, b))
    case = make_case(B=2, T=3, V=7, dtype=torch.float64, seed=2)
    for mode in ("token-mean", "seq-mean-token-mean"):
        loss = lambda z, mode=mode: rk.rspo_loss(  # noqa: E731
            z,
            case["target_ids"],
            case["weights"],
            case["mask"],
            loss_agg_mode=mode,
            entropy_coeff=0.5,
            **loss_kwargs(case, clip_ratio_c=3.0),
        )
        assert torch.autograd.gradcheck(loss, (case["logits"].clone().requires_grad_(),))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_fused_backends_entropy_bonus_float32(backend, mode):
    """Chunked torch and Triton (interpreter on CPU) in float32 against the float64 oracle."""
    case = make_case(B=3, T=5, V=150, seed=4)
    kw = loss_kwargs(case, clip_ratio_c=3.0)
    x64 = case["logits"].double().requires_grad_()
    want = oracle_loss(x64, case["target_ids"], case["weights"], case["mask"], mode=mode, **kw)
    (g_want,) = torch.autograd.grad(want, x64)
    dev = on_device(dict(case))
    y = dev["logits"].clone().requires_grad_()
    loss = rk.rspo_loss(
        y,
        dev["target_ids"],
        dev["weights"],
        dev["mask"],
        loss_agg_mode=mode,
        entropy_coeff=COEFF,
        **loss_kwargs(dev, clip_ratio_c=3.0),
    )
    (g,) = torch.autograd.grad(loss, y)
    assert_matches(loss, want, torch.float32)
    assert_matches(g, g_want, torch.float32)


def test_fused_backends_entropy_gradient_with_inf_logits(backend):
    torch.manual_seed(3)
    x = torch.randn(2, 5, 300)
    x[0, 0, :150] = float("-inf")  # whole vocabulary blocks of probability 0
    ids = torch.randint(150, 300, (2, 5))
    gl, ge = torch.randn(2, 5), torch.randn(2, 5)
    dev = on_device(dict(x=x, ids=ids, gl=gl, ge=ge))
    y = dev["x"].clone().requires_grad_()
    lp, ent = rk.token_logprobs(y, dev["ids"], temperature=0.9, return_entropy=True)
    (g,) = torch.autograd.grad((lp * dev["gl"] + ent * dev["ge"]).sum(), y)
    y64 = x.double().requires_grad_()
    lp_r, ent_r = token_logprobs_reference(y64, ids, temperature=0.9, return_entropy=True)
    (g_r,) = torch.autograd.grad((lp_r * gl + ent_r * ge).sum(), y64)
    assert torch.isfinite(g).all() and torch.all(g[0, 0, :150] == 0)
    assert_matches(g, g_r, torch.float32)


def test_entropy_coeff_options_and_modules():
    with pytest.raises(ValueError, match="entropy_coeff"):
        LossOptions(entropy_coeff=float("nan"))
    with pytest.raises(TypeError, match="entropy_coeff"):
        LossOptions(entropy_coeff="0.01")
    case = make_case(B=4, T=3, V=11, dtype=torch.float64, seed=5, with_old=False, with_ref=False)
    crit = rk.RSPOLoss("pass@k", k=2, entropy_coeff=COEFF, temperature=case["temperature"])
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    x = case["logits"].clone().requires_grad_()
    got = crit(x, case["target_ids"], rewards, group_size=4, mask=case["mask"])
    w = crit.weights(rewards, group_size=4)
    want = oracle_loss(
        case["logits"], case["target_ids"], w, case["mask"], mode="seq-mean-token-sum", temperature=case["temperature"]
    )  # the module's default aggregation (issue 26)
    assert_matches(got, want, torch.float64)
    assert "entropy_coeff=0.37" in repr(crit)
