"""The one call the trainer patches make: log-probs (and entropies) of labels under a head module."""

from __future__ import annotations

import torch

import rspo_kernels as rk

__all__ = ["head_logprobs"]


def head_logprobs(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, temperature: float, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rk.token_logprobs_linear`` on the ``lm_head`` module, so that its wrapper gathers it.

    Returns
    -------
    log_probs, entropy : torch.Tensor
        ``labels.shape``; ``entropy`` is None unless asked for.
    """
    labels = labels.long()
    out = rk.token_logprobs_linear(hidden, head, labels, temperature=temperature, return_entropy=entropy)
    if entropy:
        assert isinstance(out, tuple)
        return out
    assert isinstance(out, torch.Tensor)
    return out, None
