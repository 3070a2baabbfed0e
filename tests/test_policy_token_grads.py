"""The design contract between the policy-loss registry and the fused backwards.

A token-local loss splits into a sum over any partition of the tokens, and :func:`token_grads`
on each chunk gives autograd's gradient of the whole loss: what a backend that forms gradients
block by block during its forward relies on.
"""

import pytest
import torch

from rspo_kernels.loss.layout import token_batch
from rspo_kernels.loss.options import LOSS_AGG_MODES, POLICY_LOSSES, LossOptions
from rspo_kernels.loss.policy import is_token_local, policy_loss, token_grads

# The token-local losses (is_token_local), with settings that make their special branches matter.
LOCAL = ("vanilla", "dppo_tv", "dppo_kl", "sapo", "gpg", "dro", "cispo", "cispo_trl", "two_sided_clip")
LOSS_OPTIONS = {"sapo": {"tau_pos": 1.3, "tau_neg": 2.1}, "dro": {"dro_beta": 0.3}, "two_sided_clip": {"delta": 1.6}}
EPS_HIGH = 0.28


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_chunked_token_grads_equal_autograd_of_the_whole_loss(mode):
    torch.manual_seed(0)
    B, T, V = 3, 5, 7
    opts = LossOptions(entropy_coeff=0.1, beta=0.04, loss_agg_mode=mode, clip_ratio_c=3.0)
    assert is_token_local(opts)
    f64 = torch.float64
    mask = torch.rand(B, T) > 0.3
    batch = token_batch(
        torch.randn(B, T, V, dtype=f64),
        torch.randint(0, V, (B, T)),
        torch.randn(B, dtype=f64),
        mask,
        torch.randn(B, T, dtype=f64) * 0.3 - 2,
        torch.randn(B, T, dtype=f64) * 0.3 - 2,
        None,
        opts,
    )
    logp = (torch.randn(B * T, dtype=f64) * 0.3 - 2).requires_grad_()
    ent = torch.rand(B * T, dtype=f64).requires_grad_()
    whole = policy_loss(batch, logp, ent, opts, False)
    g_ref, gh_ref = torch.autograd.grad(whole, [logp, ent])
    total, gs, ghs = 0.0, [], []
    for r in (slice(0, 4), slice(4, 11), slice(11, B * T)):
        loss, g, gh = token_grads(batch.take(r), logp[r], ent[r], opts)
        total = total + loss
        gs.append(g)
        ghs.append(gh)
    torch.testing.assert_close(total, whole.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.cat(gs), g_ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(torch.cat(ghs), gh_ref, rtol=0, atol=1e-15)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("name", LOCAL)
def test_token_grads_over_chunks_equal_autograd_for_every_local_loss(name, mode):
    torch.manual_seed(0)
    f64 = torch.float64
    opts = LossOptions(
        entropy_coeff=0.1,
        beta=0.04,
        loss_agg_mode=mode,
        clip_ratio_c=3.0,
        policy_loss=name,
        policy_loss_options=LOSS_OPTIONS.get(name),
        kl_penalty="low_var_kl+",
        epsilon_high=EPS_HIGH,
    )
    assert is_token_local(opts)
    mask = torch.rand(3, 5) > 0.3
    batch = token_batch(
        torch.randn(3, 5, 7, dtype=f64),
        torch.randint(0, 7, (3, 5)),
        torch.randn(3, 5, dtype=f64),
        mask,
        torch.randn(3, 5, dtype=f64) * 0.3 - 2,
        torch.randn(3, 5, dtype=f64) * 0.3 - 2,
        None,
        opts,
        rollout_is_weights=torch.rand(3, 5, dtype=f64) + 0.5,
    )
    logp = (torch.randn(15, dtype=f64) * 0.3 - 2).requires_grad_()
    ent = torch.rand(15, dtype=f64).requires_grad_()
    whole = policy_loss(batch, logp, ent, opts, False)
    g_ref, gh_ref = torch.autograd.grad(whole, [logp, ent])
    total, gs, ghs = 0.0, [], []
    for r in (slice(0, 4), slice(4, 11), slice(11, 15)):
        loss, g, gh = token_grads(batch.take(r), logp[r], ent[r], opts)
        total = total + loss
        gs.append(g)
        ghs.append(gh)
    torch.testing.assert_close(total, whole.detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.cat(gs), g_ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.cat(ghs), gh_ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", sorted(set(POLICY_LOSSES) - set(LOCAL)))
def test_non_local_losses_are_refused_by_token_grads(name):
    opts = LossOptions(policy_loss=name)
    assert not is_token_local(opts)
    with pytest.raises(ValueError, match="token-local"):
        token_grads(None, torch.zeros(1), None, opts)  # type: ignore[arg-type]
