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

__all__ = ["policy_loss"]


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
