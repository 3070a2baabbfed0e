"""The unfused loss specification, checked against hand-derived values and float64 autograd.

Also home of the shared helpers the fast-path tests use: :func:`make_case` builds inputs that
exercise clipping, KL, masks with fully masked rows and temperature, and :func:`assert_matches`
compares with tolerances derived from the dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

from rspo_kernels.loss.reference import (
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


# --------------------------------------------------------------------------- loss v2: dual-clip, clamp, packed
def _one_token(weight: float, old_shift: float, **kw):
    """V = 2, logits 0 (logp = log 1/2), ratio exp(old_shift): loss, dL/dlogits and stats."""
    logits = torch.zeros(1, 1, 2, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[math.log(0.5) - old_shift]], dtype=torch.float64)
    loss, stats = rspo_loss_reference(
        logits,
        torch.tensor([[0]]),
        torch.tensor([weight], dtype=torch.float64),
        old_logprobs=old,
        return_stats=True,
        **kw,
    )
    (g,) = torch.autograd.grad(loss, logits)
    return loss.item(), g[0, 0], stats


def test_dual_clip_hand_values():
    # A = -2, ratio 5: clipped loss max(-A r, -A clip(r)) = max(10, 2.4) = 10, gradient -A r (onehot - p).
    loss, g, stats = _one_token(-2.0, math.log(5.0))
    assert loss == pytest.approx(10.0, rel=1e-12)
    torch.testing.assert_close(g, torch.tensor([5.0, -5.0], dtype=torch.float64))
    assert "dual_clip_fraction" not in stats
    # Dual-clip c = 3 caps it at -A c = 6, a constant: zero gradient (verl's compute_policy_loss).
    loss, g, stats = _one_token(-2.0, math.log(5.0), clip_ratio_c=3.0)
    assert loss == pytest.approx(6.0, rel=1e-12)
    assert torch.count_nonzero(g) == 0
    assert stats["dual_clip_fraction"].item() == 1.0 and stats["clip_fraction"].item() == 0.0
    # Positive weights are never dual-clipped.
    loss, g, stats = _one_token(2.0, math.log(5.0), clip_ratio_c=3.0)
    assert loss == pytest.approx(-2.0 * 1.2, rel=1e-12)
    assert stats["dual_clip_fraction"].item() == 0.0


def test_log_ratio_is_clamped_to_20_as_verl():
    # An old log-prob of -inf (or 100 nats below logp): ratio exp(20), never inf; weight 0 stays 0.
    for shift in (float("inf"), 100.0):
        loss, g, stats = _one_token(0.0, shift)
        assert loss == 0.0 and torch.count_nonzero(g) == 0
        assert stats["approx_kl"].item() == pytest.approx(-20.0)
    loss, g, _ = _one_token(1.0, 100.0)  # clipped at 1 + eps: constant
    assert loss == pytest.approx(-1.2) and torch.count_nonzero(g) == 0
    # Inside the clamp the gradient is autograd's through torch.clamp: zero outside [-20, 20].
    loss, g, _ = _one_token(-1.0, 30.0)
    assert loss == pytest.approx(math.exp(20.0), rel=1e-12) and torch.count_nonzero(g) == 0


def test_entropy_is_finite_with_minus_inf_logits():
    logits = torch.tensor([[[0.0, float("-inf"), 0.0]]], dtype=torch.float64)
    logp, ent = token_logprobs_reference(logits, torch.tensor([[0]]), return_entropy=True)
    assert logp.item() == pytest.approx(math.log(0.5)) and ent.item() == pytest.approx(math.log(2.0))


def test_out_of_range_id_gives_nan_log_prob():
    logp = token_logprobs_reference(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([3]))
    assert torch.isnan(logp).all()


def pack_case(case: dict, lengths: list[int]) -> tuple[dict, dict]:
    """A padded case of ``B = len(lengths)`` rows with those lengths, and the same tokens packed.

    Returns ``(padded, packed)`` keyword dicts for ``rspo_loss`` (``cu_seqlens`` in the packed one).
    """
    B, T = len(lengths), max(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    ids = torch.where(mask, case["target_ids"][:B, :T].clamp(min=0), torch.full((B, T), -100))
    padded = dict(
        logits=case["logits"][:B, :T],
        target_ids=ids,
        weights=case["weights"][:B],
        mask=mask,
        old_logprobs=None if case["old_logprobs"] is None else case["old_logprobs"][:B, :T],
        ref_logprobs=None if case["ref_logprobs"] is None else case["ref_logprobs"][:B, :T],
    )
    packed = {k: (v[mask] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v) for k, v in padded.items()}
    packed["weights"] = case["weights"][:B]  # one per sequence
    packed["mask"] = None
    packed["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return padded, packed


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_packed_layout_equals_padded(mode):
    case = make_case(B=4, T=6, V=11, dtype=torch.float64, seed=3)
    padded, packed = pack_case(case, [3, 1, 6, 2])
    kw = dict(loss_agg_mode=mode, max_response_length=6, temperature=0.8, beta=0.05, clip_ratio_c=3.0)
    x = padded.pop("logits").clone().requires_grad_()
    loss_p, st_p = rspo_loss_reference(x, **padded, return_stats=True, **kw)
    (g_p,) = torch.autograd.grad(loss_p, x)
    y = packed.pop("logits").clone().requires_grad_()
    loss_k, st_k = rspo_loss_reference(y, **packed, return_stats=True, **kw)
    (g_k,) = torch.autograd.grad(loss_k, y)
    assert_matches(loss_k, loss_p, torch.float64)
    assert_matches(g_k, g_p[padded["mask"]], torch.float64)
    for k in st_p:
        assert_matches(st_k[k], st_p[k], torch.float64, k)
