"""The loss used as torch users drive autograd: one test per defect of the issue "Loss v2".

Each test runs once per fused backend (chunked torch; Triton, interpreted without CUDA) through
the public :func:`rspo_kernels.rspo_loss`. Expected gradients come from the unfused float64
specification, never from the backend under test.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from loss_backends import DEVICE, HAS_CUDA, on_device, ulps_for
from test_loss_reference import assert_matches, loss_kwargs, make_case

import rspo_kernels as rk
from rspo_kernels.loss.reference import rspo_loss_reference


def _case(dtype=torch.float32, **kw):
    return on_device(make_case(B=3, T=6, V=160, dtype=dtype, seed=7, **kw))


def _reference_grad(case, scale=1.0, **kw):
    """d(scale * loss)/dlogits in float64 from the specification."""
    x = case["logits"].double().requires_grad_()
    loss = rspo_loss_reference(x, case["target_ids"], case["weights"], case["mask"], **loss_kwargs(case, **kw))
    (g,) = torch.autograd.grad(scale * loss, x)
    return g


def _leaf(case):
    return case["logits"].clone().requires_grad_()


def _loss(x, case, **kw):
    return rk.rspo_loss(x, case["target_ids"], case["weights"], case["mask"], **loss_kwargs(case, **kw))


# 1 + 8: GradScaler-style loss scaling ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_loss_scaling_gives_scaled_gradient_in_every_dtype(backend, dtype):
    case = _case(dtype)
    x = _leaf(case)
    (_loss(x, case) * 65536.0).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert_matches(x.grad, _reference_grad(case, 65536.0), dtype, ulps=ulps_for(backend, dtype))


def test_fp16_loss_scaling_keeps_the_small_entries(backend):
    """The gradient is rounded to fp16 once, after scaling: no entry the scaled fp64 gradient keeps
    above fp16's smallest normal is flushed (the old forward-time fp16 gradient lost most of them)."""
    case = on_device(make_case(B=4, T=16, V=512, dtype=torch.float16, seed=8, with_ref=False))
    x = _leaf(case)
    (_loss(x, case) * 32768.0).backward()
    exact = _reference_grad(case, 32768.0)
    tiny = torch.finfo(torch.float16).tiny
    keep = exact.abs() > tiny
    rel = ((x.grad.double() - exact).abs() / exact.abs())[keep]
    assert keep.sum() > 0.9 * exact.count_nonzero()
    assert rel.max() <= 2 * ulps_for(backend, torch.float16) * 2.0**-11, float(rel.max())


# 3 + 9: retain_graph and grad_output != 1 ------------------------------------------------------
def test_retain_graph_backward_twice_doubles_the_gradient(backend):
    case = _case()
    x = _leaf(case)
    loss = _loss(x, case)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()
    assert_matches(once, _reference_grad(case), torch.float32)
    assert_matches(x.grad, 2 * once, torch.float32)


@pytest.mark.parametrize("scale", [3.0, -0.5])
def test_gradient_scales_with_grad_output_on_every_backward(backend, scale):
    case = _case()
    x = _leaf(case)
    loss = _loss(x, case)
    g1 = torch.autograd.grad(loss, x, torch.tensor(scale, device=DEVICE), retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, x, torch.tensor(scale, device=DEVICE))[0]
    expected = _reference_grad(case, scale)
    assert_matches(g1, expected, torch.float32)
    assert_matches(g2, expected, torch.float32)
    y = _leaf(case)
    (scale * _loss(y, case)).backward()
    assert_matches(y.grad, expected, torch.float32)


# 4 + 11: no_grad --------------------------------------------------------------------------------
def _largest_allocation(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events()] + [0])


@pytest.mark.skipif(HAS_CUDA, reason="measures CPU allocations")
def test_no_grad_does_no_gradient_work(backend, monkeypatch):
    import rspo_kernels.loss.chunked

    monkeypatch.setattr(rspo_kernels.loss.chunked, "DEFAULT_CHUNK_BYTES", 64 << 10)  # chunks << logits
    case = on_device(make_case(B=4, T=32, V=1024, seed=9))
    x = _leaf(case)
    logits_bytes = x.numel() * x.element_size()
    with torch.no_grad():
        peak = _largest_allocation(lambda: _loss(x, case))
    assert peak < logits_bytes / 4, f"a {peak}-byte buffer under no_grad (logits: {logits_bytes})"
    assert x.grad is None


def test_inplace_backward_under_no_grad_leaves_logits_untouched(backend):
    case = _case()
    base = _leaf(case)
    logits = base * 1.0  # a non-leaf, as an lm_head output
    before = logits.detach().clone()
    with torch.no_grad():
        _loss(logits, case, inplace_backward=True)
    assert torch.equal(logits.detach(), before)


# 2: inplace_backward with a second consumer of the logits ----------------------------------------
@pytest.mark.parametrize("second_first", [False, True])
def test_inplace_backward_with_a_second_consumer_is_right_or_raises(backend, second_first):
    case = _case()
    base = _leaf(case)
    logits = base * 1.0
    extra = lambda: 1e-3 * (logits.float() ** 2).sum()  # noqa: E731  (saves the logits for its backward)
    if second_first:
        other = extra()
        loss = _loss(logits, case, inplace_backward=True) + other
    else:
        loss = _loss(logits, case, inplace_backward=True)
        loss = loss + extra()
    expected = _reference_grad(case) + 2e-3 * case["logits"].double()
    try:
        loss.backward()
    except RuntimeError as err:
        assert "inplace" in str(err)
        return
    assert_matches(base.grad, expected, torch.float32)


@pytest.mark.parametrize("second_first", [False, True])
def test_a_second_consumer_of_the_logits_gets_its_gradient_added(backend, second_first):
    """Without inplace_backward a second consumer is always right, in either order."""
    case = _case()
    base = _leaf(case)
    logits = base * 1.0
    extra = lambda: 1e-3 * (logits.float() ** 2).sum()  # noqa: E731
    loss = extra() + _loss(logits, case) if second_first else _loss(logits, case) + extra()
    loss.backward()
    assert_matches(base.grad, _reference_grad(case) + 2e-3 * case["logits"].double(), torch.float32)


def test_inplace_backward_saves_the_buffer_and_refuses_a_second_backward(backend):
    case = _case()
    base = _leaf(case)
    logits = base * 1.0
    loss = _loss(logits, case, inplace_backward=True)
    loss.backward(retain_graph=True)
    assert_matches(base.grad, _reference_grad(case), torch.float32)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()


def test_inplace_backward_refuses_a_leaf(backend):
    case = _case()
    with pytest.raises(ValueError, match="leaf tensor logits"):
        _loss(_leaf(case), case, inplace_backward=True)


# 10: create_graph --------------------------------------------------------------------------------
def test_create_graph_raises_instead_of_dropping_the_second_derivative(backend):
    case = _case()
    x = _leaf(case)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(_loss(x, case), x, create_graph=True)


# 6 + 12: non-finite inputs ---------------------------------------------------------------------
def test_nan_and_inf_logits_in_masked_rows_give_zero_gradient(backend):
    case = _case()
    logits = case["logits"].clone()
    logits[1] = float("nan")  # row 1 is fully masked in make_case
    logits[0, 1:][~case["mask"][0, 1:]] = float("inf")  # masked tokens of row 0
    x = logits.requires_grad_()
    loss, stats = _loss(x, case, return_stats=True)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    assert torch.all(x.grad[1] == 0) and torch.all(x.grad[~case["mask"]] == 0)
    assert_matches(
        loss,
        rspo_loss_reference(case["logits"], case["target_ids"], case["weights"], case["mask"], **loss_kwargs(case)),
        torch.float32,
    )


@pytest.mark.parametrize("old_value", [float("-inf"), "far"])
def test_overflowing_ratio_with_weight_zero_is_finite(backend, old_value):
    case = _case(with_ref=False)
    weights = case["weights"].clone()
    weights[0] = 0.0  # RSPO's usual lowest responses
    old = case["old_logprobs"].clone()
    old[0] = float("-inf") if old_value != "far" else old[0] - 100.0  # logp - old > 88: exp overflows fp32
    case = dict(case, weights=weights, old_logprobs=old)
    x = _leaf(case)
    loss = _loss(x, case)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert_matches(x.grad, _reference_grad(case), torch.float32)


def test_minus_inf_logits_keep_entropy_and_loss_finite(backend):
    case = _case()
    logits = case["logits"].clone()
    logits[..., 100:] = float("-inf")  # e.g. a vocabulary mask
    ids = case["target_ids"] % 100
    x = logits.requires_grad_()
    loss, stats = rk.rspo_loss(x, ids, case["weights"], case["mask"], return_stats=True, **loss_kwargs(case))
    loss.backward()
    assert torch.isfinite(stats["entropy_mean"]) and torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert torch.all(x.grad[..., 100:] == 0)


def test_out_of_range_ids_are_nan_in_every_backend_and_an_error_on_cpu(backend):
    from rspo_kernels._dispatch import implementation

    logits = torch.randn(1, 3, 40, device=DEVICE)
    ids = torch.tensor([0, 40, -1], device=DEVICE)
    _, fn = implementation("token_logprobs", DEVICE, logits.dtype)
    logp, _ = fn(logits, ids, torch.ones(3, dtype=torch.bool, device=DEVICE), temperature=1.0, with_entropy=False)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all()
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"target_ids must lie in \[0, V=40\)"):
            rk.rspo_loss(logits, ids[None], torch.ones(1))


# 13: torch.func and torch.compile --------------------------------------------------------------
def test_torch_func_grad_matches_autograd(backend):
    case = _case(with_ref=False)
    fn = lambda z: _loss(z, case)  # noqa: E731
    g = torch.func.grad(fn)(case["logits"])
    assert_matches(g, _reference_grad(case), torch.float32)


def test_torch_compile_fullgraph():
    """The chunked CPU path traces into one graph (no host sync, no graph break in validation)."""
    case = make_case(B=2, T=4, V=32, seed=10, with_ref=False)
    kw = loss_kwargs(case)

    def step(z):
        return rk.rspo_loss(z, case["target_ids"], case["weights"], case["mask"], **kw)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    x = _leaf(case)
    with warnings.catch_warnings():
        # Dynamo's own tracing of autograd.Function instantiates it (a torch-internal deprecation).
        warnings.simplefilter("ignore", DeprecationWarning)
        loss = compiled(x)
    loss.backward()
    assert_matches(loss, step(case["logits"]), torch.float32)
    assert_matches(x.grad, _reference_grad(case), torch.float32)
    assert not math.isnan(loss.item())
