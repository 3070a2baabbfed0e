"""Parity with verl's ``compute_policy_loss_vanilla`` + ``agg_loss`` (runs only where verl is installed).

verl's vanilla loss always applies dual-clip for negative advantages (``clip_ratio_c = 3``) and
clamps the log-ratio to [-20, 20]; ours does the same with ``clip_ratio_c=3.0``. The "far" inputs
push ratios beyond 3 (dual-clip active) and some log-ratios beyond 20 (clamp active).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from test_loss_reference import assert_matches, make_case

import rspo_kernels as L
from rspo_kernels.loss.reference import LOSS_AGG_MODES, agg_loss_reference, token_logprobs_reference

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
omegaconf = pytest.importorskip("omegaconf")

EPS_LOW, EPS_HIGH = 0.2, 0.28


def _verl_agg(loss_mat, mask, mode):
    try:
        return core_algos.agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode=mode)
    except (ValueError, NotImplementedError):
        pytest.skip(f"this verl version has no loss_agg_mode {mode!r}")


def _verl_policy_loss(old, logp, adv, mask, mode):
    fn = core_algos.compute_policy_loss_vanilla
    params = inspect.signature(fn).parameters
    if "config" in params:
        config = omegaconf.OmegaConf.create(
            {
                "clip_ratio": EPS_LOW,
                "clip_ratio_low": EPS_LOW,
                "clip_ratio_high": EPS_HIGH,
                "clip_ratio_c": 3.0,
                "global_batch_info": {},  # dp_size = 1: local denominators
            }
        )
        out = fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=mode, config=config)
    else:
        out = fn(
            old_log_prob=old,
            log_prob=logp,
            advantages=adv,
            response_mask=mask,
            cliprange=EPS_LOW,
            cliprange_low=EPS_LOW,
            cliprange_high=EPS_HIGH,
            clip_ratio_c=3.0,
            loss_agg_mode=mode,
        )
    if isinstance(out[1], dict):  # newer verl: (loss, metrics)
        metrics = out[1]
        return out[0], metrics.get("actor/pg_clipfrac"), metrics.get("actor/ppo_kl")
    return out[0], out[1], out[2]


def _skip_if_old_norm(mask):
    # verl before its Dr. GRPO fix divided the *sum* over sequences by the horizon.
    ones = torch.ones_like(mask)
    old_definition = mask.sum() / mask.shape[-1]
    if torch.isclose(_verl_agg(ones, mask, "seq-mean-token-sum-norm"), old_definition):
        pytest.skip("this verl version's seq-mean-token-sum-norm predates its seq-mean (Dr. GRPO) fix")


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_loss_parity(mode):
    case = make_case(B=5, T=6, V=3)
    loss_mat = torch.randn(5, 6, dtype=torch.float64)
    mask = case["mask"].double()
    expected = _verl_agg(loss_mat, mask, mode)
    if mode == "seq-mean-token-sum-norm":
        _skip_if_old_norm(mask)
    # verl divides by (count + 1e-8) in seq-mean-token-mean: a relative change of up to 1e-8 / 1,
    # so float32 accuracy (not float64) is the right yardstick.
    assert_matches(agg_loss_reference(loss_mat, mask, mode), expected, torch.float32)


@pytest.mark.parametrize("spread", ["near", "far"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_policy_loss_and_gradient_parity(mode, spread):
    case = make_case(B=4, T=6, V=23, with_ref=False, seed=5)
    if spread == "far":
        g = torch.Generator().manual_seed(11)
        shift = torch.where(torch.rand(4, 6, generator=g) < 0.2, 25.0, 3.0 * torch.rand(4, 6, generator=g))
        case["old_logprobs"] = case["old_logprobs"] - shift  # ratios up to e^3 > 3, some log-ratios > 20
        case["weights"] = -case["weights"].abs()  # negative advantages: dual-clip territory
    T_ = case["temperature"]
    mask = case["mask"].float()
    x = case["logits"].clone().requires_grad_()
    logp = token_logprobs_reference(x, case["target_ids"].clamp(min=0), temperature=T_)
    adv = case["weights"][:, None].expand(4, 6)
    loss_v, clipfrac_v, kl_v = _verl_policy_loss(case["old_logprobs"], logp, adv, mask, mode)
    if mode == "seq-mean-token-sum-norm":
        _skip_if_old_norm(mask)
    (g_v,) = torch.autograd.grad(loss_v, x)

    y = case["logits"].clone().requires_grad_()
    loss, stats = L.rspo_loss(
        y,
        case["target_ids"],
        case["weights"],
        case["mask"],
        old_logprobs=case["old_logprobs"],
        temperature=T_,
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        clip_ratio_c=3.0,
        loss_agg_mode=mode,
        return_stats=True,
    )
    (g,) = torch.autograd.grad(loss, y)
    if spread == "far":
        assert stats["dual_clip_fraction"] > 0  # the case exercises dual-clip
    assert_matches(loss, loss_v, torch.float32)
    assert_matches(g, g_v, torch.float32)
    if clipfrac_v is not None:
        assert_matches(stats["clip_fraction"], torch.as_tensor(clipfrac_v, dtype=torch.float32), torch.float32)
    if kl_v is not None:
        assert_matches(stats["approx_kl"], torch.as_tensor(kl_v, dtype=torch.float32), torch.float32)


@pytest.mark.parametrize("path", ["logits", "linear"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_entropy_bonus_parity(mode, path):
    """verl's ``ppo_loss``: ``pg_loss - entropy_coeff * agg_loss(entropy_from_logits(logits / T), mask, mode)``."""
    torch_functional = pytest.importorskip("verl.utils.torch_functional")
    coeff = 0.01
    case = make_case(B=4, T=6, V=23, with_ref=False, seed=8)
    T_ = case["temperature"]
    mask = case["mask"].float()
    if mode == "seq-mean-token-sum-norm":
        _skip_if_old_norm(mask)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 6, 16, generator=g)
    weight = torch.randn(23, 16, generator=g) * 0.5

    def verl_loss(logits):
        logp = token_logprobs_reference(logits, case["target_ids"].clamp(min=0), temperature=T_)
        adv = case["weights"][:, None].expand(4, 6)
        pg_v, _, _ = _verl_policy_loss(case["old_logprobs"], logp, adv, mask, mode)
        # verl's actor divides the logits by the temperature before entropy_from_logits.
        entropy_v = torch_functional.entropy_from_logits(logits / T_)
        return pg_v - coeff * _verl_agg(entropy_v, mask, mode)

    kw = dict(
        old_logprobs=case["old_logprobs"],
        temperature=T_,
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        clip_ratio_c=3.0,
        loss_agg_mode=mode,
        entropy_coeff=coeff,
    )
    if path == "logits":
        x = case["logits"].clone().requires_grad_()
        loss_v = verl_loss(x)
        (g_v,) = torch.autograd.grad(loss_v, x)
        y = case["logits"].clone().requires_grad_()
        loss = L.rspo_loss(y, case["target_ids"], case["weights"], case["mask"], **kw)
        (g_got,) = torch.autograd.grad(loss, y)
    else:
        w = weight.clone().requires_grad_()
        loss_v = verl_loss(hidden @ w.T)
        (g_v,) = torch.autograd.grad(loss_v, w)
        w2 = weight.clone().requires_grad_()
        loss = L.rspo_linear_loss(hidden, w2, case["target_ids"], case["weights"], case["mask"], **kw)
        (g_got,) = torch.autograd.grad(loss, w2)
    assert_matches(loss, loss_v, torch.float32)
    assert_matches(g_got, g_v, torch.float32)
