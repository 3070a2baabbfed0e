"""The public loss API: dispatch, validation messages, the options object and the RSPOLoss module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_loss_reference import assert_matches, loss_kwargs, make_case

import rspo_kernels as rk
import rspo_kernels.loss as L
from rspo_kernels._dispatch import BACKEND_ENV, implementation
from rspo_kernels.loss.reference import rspo_loss_reference


def test_cpu_dispatch_and_reference_override(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert implementation("token_logprobs", "cpu")[0] == "torch"
    assert implementation("token_logprobs", "cuda", torch.float64)[0] != "triton"  # Triton takes <= 32-bit floats
    case = make_case()
    kw = loss_kwargs(case)
    x = case["logits"].clone().requires_grad_()
    loss = rk.rspo_loss(x, case["target_ids"], case["weights"], case["mask"], **kw)
    loss.backward()
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert implementation("token_logprobs", "cpu")[0] == "reference"
    y = case["logits"].clone().requires_grad_()
    loss_r = rk.rspo_loss(y * 1.0, case["target_ids"], case["weights"], case["mask"], inplace_backward=True, **kw)
    loss_r.backward()
    assert_matches(loss, loss_r, torch.float32)
    assert_matches(x.grad, y.grad, torch.float32)


_BASE = dict(logits=torch.zeros(2, 3, 4), target_ids=torch.zeros(2, 3, dtype=torch.long), weights=torch.ones(2))
_PACKED = dict(logits=torch.zeros(5, 4), target_ids=torch.zeros(5, dtype=torch.long), weights=torch.ones(5))


@pytest.mark.parametrize(
    "change, err, match",
    [
        (dict(logits=torch.zeros(2, 3, 4, 5)), ValueError, r"logits must be \(B, T, D\) padded or \(N, D\) packed"),
        (dict(logits=torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError, "logits must be float16"),
        (dict(target_ids=torch.zeros(2, 3)), TypeError, "target_ids must be an integer tensor.*long"),
        (dict(target_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"target_ids must have shape \(2, 3\)"),
        (dict(target_ids=torch.full((2, 3), 4)), ValueError, r"target_ids must lie in \[0, V=4\)"),
        (
            dict(weights=torch.zeros(3)),
            ValueError,
            r"weights must have shape \(2,\) per response or \(2, 3\) per token",
        ),
        (dict(weights=torch.zeros(2, dtype=torch.long)), TypeError, "weights must be a floating tensor"),
        (dict(mask=torch.ones(3, 2)), ValueError, r"mask must have shape \(2, 3\)"),
        (dict(old_logprobs=torch.zeros(2, 2)), ValueError, r"old_logprobs must have shape \(2, 3\)"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature="1"), TypeError, r"temperature must be a real number, got '1' \(str\)"),
        (dict(epsilon_low=1.0), ValueError, r"epsilon_low must lie in \[0, 1\)"),
        (dict(epsilon_high=-0.1), ValueError, "epsilon_high must be a finite number >= 0"),
        (dict(clip_ratio_c=1.0), ValueError, r"clip_ratio_c must be > 1 \(verl uses 3.0\)"),
        (dict(beta=0.1), ValueError, "beta=0.1 > 0 needs ref_logprobs"),
        (dict(loss_agg_mode="seq-mean"), ValueError, "loss_agg_mode='seq-mean' is not one of"),
        (dict(max_response_length=0), ValueError, "max_response_length must be >= 1"),
        (dict(max_response_length=2.5), TypeError, "max_response_length must be an int"),
        (dict(cu_seqlens=torch.tensor([0, 6])), ValueError, "cu_seqlens describes packed"),
    ],
)
def test_rspo_loss_errors(change, err, match):
    with pytest.raises(err, match=match):
        rk.rspo_loss(**{**_BASE, **change})


@pytest.mark.parametrize(
    "change, err, match",
    [
        (dict(cu_seqlens=torch.tensor([0, 2, 4])), ValueError, r"end at N=5"),
        (dict(cu_seqlens=torch.tensor([0, 3, 2, 5])), ValueError, "offsets decrease after sequence 1"),
        (dict(cu_seqlens=torch.tensor([0.0, 5.0])), TypeError, "cu_seqlens must be a 1-D integer tensor"),
        (dict(cu_seqlens=torch.tensor([5])), ValueError, r"S \+ 1 >= 2 offsets"),
        (dict(loss_agg_mode="seq-mean-token-mean"), ValueError, "packed .* inputs need cu_seqlens"),
        (
            dict(loss_agg_mode="seq-mean-token-sum-norm", cu_seqlens=torch.tensor([0, 2, 5])),
            ValueError,
            "pass max_response_length",
        ),
        (dict(weights=torch.ones(2)), ValueError, r"\(5,\) per token \(pass cu_seqlens"),
        (dict(weights=torch.ones(3), cu_seqlens=torch.tensor([0, 2, 5])), ValueError, r"or \(2,\) per sequence"),
    ],
)
def test_packed_layout_errors(change, err, match):
    with pytest.raises(err, match=match):
        rk.rspo_loss(**{**_PACKED, **change})


def test_numpy_scalars_are_accepted():
    a = rk.rspo_loss(
        **_BASE, epsilon_low=np.float32(0.2), max_response_length=np.int64(3), loss_agg_mode="seq-mean-token-sum-norm"
    )
    b = rk.rspo_loss(**_BASE, epsilon_low=0.2, max_response_length=3, loss_agg_mode="seq-mean-token-sum-norm")
    assert torch.equal(a, b)
    crit = rk.RSPOLoss(k=np.int64(2), max_response_length=np.int32(4))
    assert crit.k == 2 and crit.options.max_response_length == 4


def test_padding_ids_allowed_under_mask_and_token_logprobs_errors():
    ids = torch.tensor([[0, -100]])
    rk.rspo_loss(torch.zeros(1, 2, 3), ids, torch.ones(1), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, V=3\).*-100"):
        rk.token_logprobs(torch.zeros(1, 2, 3), ids)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        rk.token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=-1.0)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        rk.token_logprobs([[0.0]], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_seqlens describes packed"):
        rk.token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), cu_seqlens=torch.tensor([0, 2]))


def test_options_object_is_frozen_and_validated_at_construction():
    opts = L.LossOptions(epsilon_low=np.float64(0.1), epsilon_high=None, clip_ratio_c=3)
    assert opts.eps_high == 0.1 and isinstance(opts.clip_ratio_c, float)
    with pytest.raises(Exception, match="cannot assign"):
        opts.beta = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError, match="beta must be a real number"):
        L.LossOptions(beta=True)
    assert set(L.LossOptions.field_names()) >= {"temperature", "clip_ratio_c", "loss_agg_mode"}


# --------------------------------------------------------------------------- RSPOLoss
def test_rspo_loss_module_matches_functional(monkeypatch):
    from rspo_kernels.weights import api

    seen = {}
    real = api.pass_at_k_weights

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    case = make_case(B=8, T=4, V=13, with_ref=False)
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1])
    crit = rk.RSPOLoss(
        "pass@k", k=2, loss_agg_mode="seq-mean-token-mean", temperature=case["temperature"], clip_ratio_c=3.0
    )
    monkeypatch.setattr(api, "pass_at_k_weights", spy)
    loss = crit(
        case["logits"], case["target_ids"], rewards, group_size=4, mask=case["mask"], old_logprobs=case["old_logprobs"]
    )
    assert seen["validate"] is False
    w = real(rewards, 2, group_size=4)
    expected = rspo_loss_reference(
        case["logits"],
        case["target_ids"],
        w,
        case["mask"],
        old_logprobs=case["old_logprobs"],
        temperature=case["temperature"],
        loss_agg_mode="seq-mean-token-mean",
        clip_ratio_c=3.0,
    )
    assert_matches(loss, expected, torch.float32)


def test_rspo_loss_module_max_at_k_2d_rewards_group_ids_and_packed():
    case = make_case(B=6, T=3, V=9, with_old=False, with_ref=False, masked=False)
    rewards = torch.tensor([[0.1, 0.5, 0.9], [3.0, 1.0, 2.0]])
    crit = rk.RSPOLoss("max@k", k=2, temperature=case["temperature"])
    loss_2d = crit(case["logits"], case["target_ids"], rewards)
    loss_ids = crit(case["logits"], case["target_ids"], rewards.reshape(-1), group_ids=[0, 0, 0, 1, 1, 1])
    cu = torch.arange(0, 19, 3)
    loss_packed = crit(
        case["logits"].reshape(18, 9), case["target_ids"].reshape(18), rewards.reshape(-1), group_size=3, cu_seqlens=cu
    )
    w = rk.max_at_k_weights(rewards, 2).reshape(-1)
    expected = rspo_loss_reference(
        case["logits"], case["target_ids"], w, temperature=case["temperature"], loss_agg_mode="seq-mean-token-sum"
    )  # the module's default aggregation (issue 26)
    for got in (loss_2d, loss_ids, loss_packed):
        assert_matches(got, expected, torch.float32)
    assert "objective='max@k', k=2" in repr(crit)


def test_rspo_loss_module_errors_at_construction():
    with pytest.raises(ValueError, match="objective must be 'pass@k' or 'max@k'"):
        rk.RSPOLoss("best@k")
    with pytest.raises(TypeError, match=r"unknown rspo_loss arguments \['clip'\]"):
        rk.RSPOLoss(clip=0.2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        rk.RSPOLoss(k=0)
    with pytest.raises(TypeError, match="k must be an int, got 2.0"):
        rk.RSPOLoss(k=2.0)
    with pytest.raises(ValueError, match="estimator='bogus' is not one of"):
        rk.RSPOLoss(estimator="bogus")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        rk.RSPOLoss(temperature=-1)
    with pytest.raises(ValueError, match="rewards has 3 entries but there are 2 responses"):
        rk.RSPOLoss(k=1)(torch.zeros(2, 1, 3), torch.zeros(2, 1, dtype=torch.long), torch.zeros(3), group_size=3)
    with pytest.raises(ValueError, match="packed .* logits need cu_seqlens"):
        rk.RSPOLoss(k=1)(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2), group_size=2)


def test_rspo_loss_module_weights_dtype_follows_rewards():
    crit = rk.RSPOLoss(k=2)
    assert crit.weights(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)).dtype == torch.float64
    assert crit.weights(torch.tensor([[1.0, 0.0, 0.0]])).dtype == torch.float32


def test_docstring_examples():
    import doctest

    import rspo_kernels.loss.api
    import rspo_kernels.loss.options

    for module in (rspo_kernels.loss.api, rspo_kernels.loss.options):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__
