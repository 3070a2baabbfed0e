"""From per-token log-probs to the aggregated policy loss: the O(tokens) part every fast path shares.

A fused backend (chunked torch, Triton, or the linear variant) turns its rows into ``(N,)``
log-probs through an autograd-aware op; everything after that is ordinary differentiable torch on
``(N,)`` vectors, so grad_output scaling, ``retain_graph``, ``no_grad`` and loss scaling are
autograd's own behaviour, and the per-token algebra is the specification's
(:func:`rspo_kernels.loss.reference.token_objective`).
"""

from __future__ import annotations

import torch

from rspo_kernels.loss.layout import TokenBatch
from rspo_kernels.loss.options import LossOptions
from rspo_kernels.loss.reference import summarize_stats, token_objective

__all__ = ["is_token_local", "policy_loss", "token_grads"]


def policy_loss(
    batch: TokenBatch,
    logp: torch.Tensor,
    entropy: torch.Tensor | None,
    options: LossOptions,
    return_stats: bool,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_tok c_tok * loss_tok(logp)`` and, when asked, the logged statistics.

    Parameters
    ----------
    batch : TokenBatch
        The normalised inputs (:func:`rspo_kernels.loss.layout.token_batch`).
    logp : torch.Tensor
        ``(N,)`` differentiable log-probs, 0 where ``batch.live`` is False.
    entropy : torch.Tensor or None
        ``(N,)`` entropies, differentiable (needed for the stats and for ``entropy_coeff``).
    options : LossOptions
        Hyper-parameters.
    return_stats : bool
        Also return the detached statistics dict.

    Returns
    -------
    torch.Tensor or tuple
        The 0-d loss in ``logp.dtype``, and the statistics when asked.
    """
    loss_tok, parts = token_objective(logp, batch.old, batch.ref, batch.adv, batch.live, options)
    loss = (batch.coef * loss_tok).sum()
    if options.entropy_coeff != 0.0:
        if entropy is None:
            raise ValueError("entropy_coeff != 0 needs the entropies: compute them with with_entropy=True")
        # verl's ppo_loss: minus entropy_coeff times the entropy aggregated like the loss (the same c).
        loss = loss - options.entropy_coeff * (batch.coef * entropy).sum()
    if not return_stats:
        return loss
    return loss, summarize_stats(batch.mask, logp, None if entropy is None else entropy.detach(), parts)


def is_token_local(options: LossOptions) -> bool:
    """Whether the loss is ``sum_tok f_tok(logp_tok, entropy_tok)``: each token's term reads only its own values.

    Then ``dL/dlogp_tok`` and ``dL/dentropy_tok`` of one token are known as soon as that token's
    log-prob and entropy are, and a backend may form the logits' gradient block by block during
    its forward (:func:`token_grads`). Sequence-level ratios (GSPO, GMPO) and batch-level token
    selection (Clip-Cov, KL-Cov) are not local: their backends take the two-pass route (log-probs
    first, then autograd through :func:`policy_loss`).
    """
    del options  # every loss registered so far (PPO clip, dual-clip, k3 KL, entropy) is local
    return True


def token_grads(
    batch: TokenBatch, logp: torch.Tensor, entropy: torch.Tensor | None, options: LossOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(loss, dL/dlogp, dL/dentropy)`` of a token-local loss on ``batch`` (a chunk of tokens, or all).

    ``logp`` and ``entropy`` are detached ``(n,)`` values; the derivatives are ``(n,)`` in their
    dtype (``dL/dentropy`` None without an entropy term). Summed over a partition of the tokens,
    the losses give :func:`policy_loss`'s value and the derivatives its gradient. This is where the
    per-token gradient ``g`` and the entropy's ``g_H`` of the fused backwards come from; every
    backend calls it (or autograd through :func:`policy_loss`), none re-derives the algebra.
    """
    if not is_token_local(options):
        raise ValueError("token_grads needs a token-local loss (see is_token_local)")
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(True)
        ent = None
        if entropy is not None and options.entropy_coeff != 0.0:
            ent = entropy.detach().requires_grad_(True)
        loss = policy_loss(batch, lp, ent, options, False)
        assert isinstance(loss, torch.Tensor)
        inputs = [lp] if ent is None else [lp, ent]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    g = torch.zeros_like(lp) if grads[0] is None else grads[0]
    g_h = None if ent is None else (torch.zeros_like(ent) if grads[1] is None else grads[1])
    return loss.detach(), g.detach(), None if g_h is None else g_h.detach()
