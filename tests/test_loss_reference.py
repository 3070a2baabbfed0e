"""The unfused loss specification, checked against hand-derived values and float64 autograd.

Also home of the shared helpers the fast-path tests use: :func:`make_case` builds inputs that
exercise clipping, KL, masks with fully masked rows and temperature, and :func:`assert_matches`
compares with tolerances derived from the dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

from rspo_kernels.loss_reference import (
    LOSS_AGG_MODES,
    agg_loss_reference,
    rspo_loss_reference,
    token_logprobs_reference,
)

# Unit roundoff of each dtype the results are *stored* in; errors of a sum scale with its largest
# term, so the absolute floor is the same fraction of the largest reference entry.
_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def assert_matches(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "", *, ulps: float = 1.0
) -> None:
    """``actual`` agrees with ``expected`` to ``ulps`` unit roundoffs of ``dtype``."""
    rtol = ulps * _RTOL[dtype]
    expected = expected.detach().to(torch.float64)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.detach().to(torch.float64), expected, rtol=rtol, atol=rtol * max(scale, 1e-30), msg=msg or None
    )


def make_case(
    B: int = 4,
    T: int = 5,
    V: int = 37,
    *,
    dtype: torch.dtype = torch.float32,
    per_token: bool = False,
    with_old: bool = True,
    with_ref: bool = True,
    masked: bool = True,
    temperature: float = 0.8,
    seed: int = 0,
) -> dict:
    """Inputs for ``rspo_loss``: old log-probs off by up to ~0.6 nats, so clipping is active."""
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    weights = torch.randn(B, T, generator=g) if per_token else torch.randn(B, generator=g)
    mask = None
    if masked:
        mask = torch.rand(B, T, generator=g) > 0.3
        mask[0, 0] = True
        mask[1 % B] = False  # an all-masked row
        ids = torch.where(mask, ids, torch.full_like(ids, -100))  # padding ids must be harmless
    true_logp = torch.log_softmax(logits.double() / temperature, -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    old = (true_logp + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(cdt) if with_old else None
    ref = (true_logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(cdt) if with_ref else None
    if dtype != torch.float64:
        weights = weights.float()
    else:
        weights = weights.double()
    return dict(
        logits=logits,
        target_ids=ids,
        weights=weights,
        mask=mask,
        old_logprobs=old,
        ref_logprobs=ref,
        temperature=temperature,
    )


def loss_kwargs(case: dict, **kw) -> dict:
    base = dict(
        old_logprobs=case["old_logprobs"],
        ref_logprobs=case["ref_logprobs"],
        beta=0.05 if case["ref_logprobs"] is not None else 0.0,
        temperature=case["temperature"],
        epsilon_low=0.2,
        epsilon_high=0.28,
    )
    base.update(kw)
    return base


# --------------------------------------------------------------------------- aggregation
_LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
_MASK = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])


@pytest.mark.parametrize(
    "mode, max_len, expected",
    [
        ("token-mean", None, (1 + 2 + 7) / 3),
        ("token-sum", None, 1 + 2 + 7),
        ("seq-mean-token-sum", None, (3 + 7) / 2),  # the empty row is not a sequence
        ("seq-mean-token-mean", None, (1.5 + 7) / 2),
        ("seq-mean-token-sum-norm", None, (3 + 7) / 2 / 3),
        ("seq-mean-token-sum-norm", 10, (3 + 7) / 2 / 10),
    ],
)
def test_agg_loss_hand_values(mode, max_len, expected):
    got = agg_loss_reference(_LOSS_MAT, _MASK, mode, max_len)
    assert got.item() == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_loss_all_masked_is_zero_not_nan(mode):
    got = agg_loss_reference(torch.full((2, 3), float("nan")), torch.zeros(2, 3), mode)
    assert got.item() == 0.0


def test_agg_loss_rejects_unknown_mode():
    with pytest.raises(ValueError, match="loss_agg_mode='seq-mean'"):
        agg_loss_reference(_LOSS_MAT, _MASK, "seq-mean")


# --------------------------------------------------------------------------- log-probs
def test_token_logprobs_matches_definition():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 3.0, -1.0]]], dtype=torch.float64)
    ids = torch.tensor([[2, 0]])
    logp, ent = token_logprobs_reference(logits, ids, temperature=2.0, return_entropy=True)
    for t, (row, i) in enumerate(zip(logits[0].tolist(), ids[0].tolist(), strict=True)):
        z = [x / 2.0 for x in row]
        lse = math.log(sum(math.exp(x) for x in z))
        p = [math.exp(x - lse) for x in z]
        assert logp[0, t].item() == pytest.approx(z[i] - lse, rel=1e-12)
        assert ent[0, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-12)


# --------------------------------------------------------------------------- the clipped loss
def test_on_policy_gradient_is_weighted_logprob_gradient():
    case = make_case(dtype=torch.float64, with_old=False, with_ref=False)
    x = case["logits"].clone().requires_grad_()
    loss = rspo_loss_reference(x, case["target_ids"], case["weights"], case["mask"], temperature=0.8)
    (g,) = torch.autograd.grad(loss, x)
    y = case["logits"].clone().requires_grad_()
    m = case["mask"].double()
    logp = token_logprobs_reference(y, case["target_ids"].clamp(min=0), temperature=0.8)
    plain = -(case["weights"][:, None] * logp * m).sum() / m.sum()
    (g_plain,) = torch.autograd.grad(plain, y)
    assert_matches(g, g_plain, torch.float64)
    assert loss.item() == pytest.approx(-(case["weights"][:, None] * m).sum().item() / m.sum().item(), rel=1e-12)


def test_clipped_tokens_have_zero_gradient_and_hand_value():
    # One token, V = 2, logits 0: logp = log(1/2). old_logp makes ratio = 1.5 > 1 + 0.2.
    logits = torch.zeros(1, 1, 2, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0]])
    old = torch.tensor([[math.log(0.5) - math.log(1.5)]], dtype=torch.float64)
    loss, stats = rspo_loss_reference(
        logits, ids, torch.tensor([2.0], dtype=torch.float64), old_logprobs=old, return_stats=True
    )
    assert loss.item() == pytest.approx(-1.2 * 2.0, rel=1e-12)
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.count_nonzero(g) == 0
    assert stats["clip_fraction"].item() == 1.0
    assert stats["approx_kl"].item() == pytest.approx(-math.log(1.5), rel=1e-12)
    # Negative weight: ratio 1.5 is not clipped from below, the gradient is -r A (onehot - p).
    loss = rspo_loss_reference(logits, ids, torch.tensor([-2.0], dtype=torch.float64), old_logprobs=old)
    (g,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(g[0, 0], torch.tensor([1.5, -1.5], dtype=torch.float64))


def test_k3_kl_term_hand_value():
    logits = torch.zeros(1, 1, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25) + 0.5]], dtype=torch.float64)
    loss, stats = rspo_loss_reference(
        logits,
        torch.tensor([[3]]),
        torch.tensor([0.0], dtype=torch.float64),
        ref_logprobs=ref,
        beta=0.1,
        return_stats=True,
    )
    kl = math.exp(0.5) - 0.5 - 1.0
    assert loss.item() == pytest.approx(0.1 * kl, rel=1e-12)
    assert stats["ref_kl"].item() == pytest.approx(kl, rel=1e-12)
    (g,) = torch.autograd.grad(loss, logits)
    dlogp = 0.1 * (1 - math.exp(0.5))
    expected = torch.tensor([-0.25, -0.25, -0.25, 0.75], dtype=torch.float64) * dlogp
    torch.testing.assert_close(g[0, 0], expected)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_reference_gradcheck(mode):
    case = make_case(B=3, T=3, V=5, dtype=torch.float64)
    x = case["logits"].clone().requires_grad_()
    fn = lambda z: rspo_loss_reference(  # noqa: E731
        z, case["target_ids"], case["weights"], case["mask"], loss_agg_mode=mode, **loss_kwargs(case)
    )
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_stats_keys_and_masking():
    case = make_case()
    _, stats = rspo_loss_reference(
        case["logits"], case["target_ids"], case["weights"], case["mask"], return_stats=True, **loss_kwargs(case)
    )
    assert set(stats) == {"logprob_mean", "entropy_mean", "clip_fraction", "approx_kl", "ref_kl"}
    assert all(v.dim() == 0 and not v.requires_grad and v.dtype == torch.float32 for v in stats.values())
    assert 0.0 < stats["clip_fraction"].item() < 1.0  # the case exercises both branches
