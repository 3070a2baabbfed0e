"""Every fused backend (chunked torch, Triton) against the unfused specification, through the public API."""

from __future__ import annotations

import pytest
import torch
from loss_backends import DEVICE, on_device, ulps_for
from test_loss_reference import assert_matches, loss_kwargs, make_case, pack_case

import rspo_kernels as rk
from rspo_kernels.loss.reference import LOSS_AGG_MODES, rspo_loss_reference, token_logprobs_reference

VARIANTS = {
    "on-policy": dict(with_old=False, with_ref=False),
    "old+ref+dual-clip": dict(with_old=True, with_ref=True, dual=True),
    "per-token": dict(with_old=True, with_ref=False, per_token=True),
}


def _loss_and_grad(fn, case, **kw):
    x = case["logits"].clone().requires_grad_()
    loss, stats = fn(x, case["target_ids"], case["weights"], case["mask"], return_stats=True, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss, g, stats


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(backend, mode, variant):
    opts = dict(VARIANTS[variant])
    dual = opts.pop("dual", False)
    case = on_device(make_case(B=3, T=5, V=200, seed=1, **opts))
    kw = loss_kwargs(case, loss_agg_mode=mode, clip_ratio_c=3.0 if dual else None)
    loss_r, g_r, st_r = _loss_and_grad(rspo_loss_reference, case, **kw)
    loss, g, st = _loss_and_grad(rk.rspo_loss, case, **kw)
    assert_matches(loss, loss_r, torch.float32, f"loss {mode}")
    assert_matches(g, g_r, torch.float32, f"grad {mode}")
    assert set(st) == set(st_r)
    for k in st_r:
        assert_matches(st[k], st_r[k], torch.float32, k)
    assert torch.all(g[1] == 0) and torch.isfinite(g).all()  # the all-masked row


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_packed_layout_matches_reference(backend, mode):
    case = make_case(B=4, T=7, V=130, seed=4)
    padded, packed = pack_case(case, [3, 1, 7, 2])
    packed = on_device(packed)
    kw = dict(loss_agg_mode=mode, max_response_length=7, temperature=0.8, beta=0.05, clip_ratio_c=3.0)
    y = packed.pop("logits").clone().requires_grad_()
    loss_r, st_r = rspo_loss_reference(y, **packed, return_stats=True, **kw)
    (g_r,) = torch.autograd.grad(loss_r, y)
    loss, st = rk.rspo_loss(y, **packed, return_stats=True, **kw)
    (g,) = torch.autograd.grad(loss, y)
    assert_matches(loss, loss_r, torch.float32)
    assert_matches(g, g_r, torch.float32)
    for k in st_r:
        assert_matches(st[k], st_r[k], torch.float32, k)
    # Per-token weights in the packed layout are the same loss.
    per_token = packed["weights"].repeat_interleave(torch.tensor([3, 1, 7, 2], device=DEVICE))
    loss_t = rk.rspo_loss(y, **dict(packed, weights=per_token), **kw)
    assert_matches(loss_t, loss_r, torch.float32)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_padded_and_packed(backend, temperature):
    case = on_device(make_case(B=2, T=9, V=300, masked=False))  # V not a power of two: tail block
    logits = case["logits"].clone()
    logits[0, 0, :150] = float("-inf")  # a masked-out vocabulary region spanning whole blocks
    lr, er = token_logprobs_reference(logits, case["target_ids"], temperature=temperature, return_entropy=True)
    lt, et = rk.token_logprobs(logits, case["target_ids"], temperature=temperature, return_entropy=True)
    assert lt.dtype == torch.float32 and not lt.requires_grad
    assert torch.isfinite(et).all()
    assert_matches(lt, lr, torch.float32)
    assert_matches(et, er, torch.float32)
    packed = rk.token_logprobs(logits.reshape(18, 300), case["target_ids"].reshape(18), temperature=temperature)
    assert_matches(packed, lr.reshape(18), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_strided_view(backend, dtype):
    """``logits[:, :-1]`` of half logits is read in place; values within the dtype's accuracy."""
    case = on_device(make_case(B=4, T=16, V=256, dtype=dtype, seed=2))
    kw = loss_kwargs(case, clip_ratio_c=3.0)
    x64 = case["logits"].double().requires_grad_()
    loss_r = rspo_loss_reference(x64, case["target_ids"], case["weights"], case["mask"], **kw)
    (g_r,) = torch.autograd.grad(loss_r, x64)
    padded = torch.cat([case["logits"], case["logits"][:, :1]], dim=1).requires_grad_()
    loss = rk.rspo_loss(padded[:, :-1], case["target_ids"], case["weights"], case["mask"], **kw)
    loss.backward()
    assert loss.dtype == torch.float32
    assert_matches(loss, loss_r, torch.float32)
    assert padded.grad.dtype == dtype and torch.all(padded.grad[:, -1] == 0)
    assert_matches(padded.grad[:, :-1], g_r, dtype, ulps=ulps_for(backend, dtype))


def test_unsliced_logits_with_padded_mask_equal_the_sliced_view(backend):
    """The documented way to avoid the slice's (B, T + 1, V) zero buffer gives the same loss and gradient."""
    case = on_device(make_case(B=2, T=6, V=64, with_ref=False, seed=6))
    full = torch.cat([case["logits"], case["logits"][:, :1]], dim=1)
    a = full.clone().requires_grad_()
    loss_a = rk.rspo_loss(a[:, :-1], case["target_ids"], case["weights"], case["mask"], **loss_kwargs(case))
    loss_a.backward()
    pad = lambda x, v: torch.cat([x, torch.full_like(x[:, :1], v)], dim=1)  # noqa: E731
    b = full.clone().requires_grad_()
    loss_b = rk.rspo_loss(
        b,
        pad(case["target_ids"], -100),
        case["weights"],
        pad(case["mask"], False),
        **loss_kwargs(case, old_logprobs=pad(case["old_logprobs"], 0.0)),
    )
    loss_b.backward()
    assert_matches(loss_b, loss_a, torch.float32)
    assert_matches(b.grad, a.grad, torch.float32)


def test_gradcheck_float64():
    """The chunked path in float64 (the Triton kernels take 16/32-bit floats only)."""
    case = make_case(B=2, T=3, V=7, dtype=torch.float64)
    x = case["logits"].clone().requires_grad_()
    for mode in LOSS_AGG_MODES:
        fn = lambda z, mode=mode: rk.rspo_loss(  # noqa: E731
            z,
            case["target_ids"],
            case["weights"],
            case["mask"],
            loss_agg_mode=mode,
            **loss_kwargs(case, clip_ratio_c=3.0),
        )
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)
