"""The one call the trainer patches make: log-probs (and entropies) of labels under a head module."""

from __future__ import annotations

from typing import NamedTuple

import torch

import rspo_kernels as rk

__all__ = ["HeadStats", "head_logprobs", "head_stats"]


class HeadStats(NamedTuple):
    """What :func:`head_stats` returns; a field is None when it was not asked for."""

    log_probs: torch.Tensor
    entropy: torch.Tensor | None
    sum_pi_squared: torch.Tensor | None


def head_stats(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    temperature: float,
    *,
    entropy: bool,
    sum_pi_squared: bool = False,
    logit_softcap: float | None = None,
) -> HeadStats:
    """``rk.token_logprobs_linear`` on the ``lm_head`` module, so that its wrapper gathers it.

    Parameters
    ----------
    hidden : torch.Tensor
        ``(..., H)`` last hidden states.
    head : torch.nn.Module
        The ``lm_head`` (an ``nn.Linear`` of weight ``(V, H)``), called as a module so that an
        FSDP-sharded head is gathered by its own hooks.
    labels : torch.Tensor
        ``(...)`` target ids.
    temperature : float
        The logits are divided by it (after the soft-cap).
    entropy, sum_pi_squared : bool
        Also return the entropy (differentiable) / ``sum_v softmax(z / T)_v^2`` (detached, for
        verl's optimal-token baseline) of each token's distribution.
    logit_softcap : float, optional
        Gemma's ``final_logit_softcapping`` ``c``: the logits are ``c * tanh(z / c)`` before the
        temperature, as in the model's own forward.

    Returns
    -------
    HeadStats
        ``labels.shape`` tensors; ``entropy`` / ``sum_pi_squared`` None unless asked for.
    """
    labels = labels.long()
    out = rk.token_logprobs_linear(
        hidden,
        head,
        labels,
        temperature=temperature,
        return_entropy=entropy,
        return_sum_pi_squared=sum_pi_squared,
        logit_softcap=logit_softcap,
    )
    if isinstance(out, rk.TokenStats):
        return HeadStats(out.logprobs, out.entropy, out.sum_pi_squared)
    if entropy:
        assert isinstance(out, tuple)
        return HeadStats(out[0], out[1], None)
    assert isinstance(out, torch.Tensor)
    return HeadStats(out, None, None)


def head_logprobs(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, temperature: float, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`head_stats` without the soft-cap or the sum of squared probabilities.

    Returns
    -------
    log_probs, entropy : torch.Tensor
        ``labels.shape``; ``entropy`` is None unless asked for.
    """
    stats = head_stats(hidden, head, labels, temperature, entropy=entropy)
    return stats.log_probs, stats.entropy
