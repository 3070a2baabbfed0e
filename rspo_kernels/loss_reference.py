"""The RSPO policy loss in plain, unfused torch: the specification every fast path is tested against.

Nothing here is clever. The (tokens x vocab) log-softmax is materialised, autograd differentiates
it, and the aggregation follows verl's ``agg_loss`` line by line (``dp_size = 1``). The fused
Triton kernels (:mod:`rspo_kernels.ops.rspo_loss`) and the chunked CPU path
(:mod:`rspo_kernels._chunked_loss`) must agree with these functions.

Notation (docs/math.md § The loss the weights feed), per token ``(b, t)``::

    logp      = log_softmax(logits / temperature)[target]
    ratio     = exp(logp - old_logp)              (old_logp = logp.detach() when absent)
    loss_tok  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
              + beta * (exp(ref - logp) - (ref - logp) - 1)          (k3 estimator)

with ``A`` the response's weight (or the token's, for per-token weights).
"""

from __future__ import annotations

import torch

__all__ = [
    "LOSS_AGG_MODES",
    "agg_loss_reference",
    "token_logprobs_reference",
    "rspo_loss_reference",
]

LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 accumulation for half types, float64 kept for gradcheck.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nonzero_or_one(x: torch.Tensor) -> torch.Tensor:
    # An empty denominator only ever multiplies an all-zero numerator: 0 / 1 = 0, never NaN.
    return torch.where(x > 0, x, torch.ones_like(x))


def agg_loss_reference(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    loss_agg_mode: str,
    max_response_length: int | None = None,
) -> torch.Tensor:
    """Aggregate a per-token loss into a scalar exactly as verl's ``agg_loss`` (``dp_size = 1``).

    Parameters
    ----------
    loss_mat : torch.Tensor
        ``(B, T)`` per-token losses.
    mask : torch.Tensor
        ``(B, T)`` 1 for response tokens, 0 for padding (bool, integer or float).
    loss_agg_mode : str
        One of :data:`LOSS_AGG_MODES`.
    max_response_length : int, optional
        The divisor of ``seq-mean-token-sum-norm``; ``T`` when not given.

    Returns
    -------
    torch.Tensor
        Scalar in ``loss_mat.dtype``.

    Notes
    -----
    With ``m`` the mask, ``S_b = sum_t m l`` and ``n_b = sum_t m``; ``G`` counts sequences with
    ``n_b > 0`` (verl excludes fully masked sequences from every sequence mean):

    - token-mean: ``sum_b S_b / sum_b n_b``
    - token-sum: ``sum_b S_b``
    - seq-mean-token-sum: ``sum_b S_b / G``
    - seq-mean-token-mean: ``sum_{b: n_b > 0} (S_b / n_b) / G``
    - seq-mean-token-sum-norm: ``sum_b S_b / G / max_response_length`` (Dr. GRPO)

    An empty denominator gives 0 instead of NaN.
    """
    m = mask.to(loss_mat.dtype)
    masked = torch.where(m != 0, loss_mat * m, torch.zeros_like(loss_mat))
    seq_sum = masked.sum(dim=-1)
    seq_count = m.sum(dim=-1)
    n_seqs = _nonzero_or_one((seq_count > 0).to(loss_mat.dtype).sum())
    if loss_agg_mode == "token-mean":
        return seq_sum.sum() / _nonzero_or_one(seq_count.sum())
    if loss_agg_mode == "token-sum":
        return seq_sum.sum()
    if loss_agg_mode == "seq-mean-token-sum":
        return seq_sum.sum() / n_seqs
    if loss_agg_mode == "seq-mean-token-mean":
        return (seq_sum / _nonzero_or_one(seq_count)).sum() / n_seqs
    if loss_agg_mode == "seq-mean-token-sum-norm":
        horizon = loss_mat.shape[-1] if max_response_length is None else max_response_length
        return seq_sum.sum() / n_seqs / horizon
    raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not one of {LOSS_AGG_MODES}")


def token_logprobs_reference(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(logits / temperature)`` at ``target_ids`` (and the entropy), unfused.

    Parameters
    ----------
    logits : torch.Tensor
        ``(..., V)`` any float dtype.
    target_ids : torch.Tensor
        ``logits.shape[:-1]`` integer ids in ``[0, V)``.
    temperature : float
        Divides the logits before the softmax.
    return_entropy : bool
        Also return the entropy of ``softmax(logits / temperature)``.

    Returns
    -------
    torch.Tensor or tuple of torch.Tensor
        ``logits.shape[:-1]`` float32 (float64 for float64 logits) log-probabilities, and the
        entropies when asked. Differentiable (this is the specification).
    """
    x = logits.to(_compute_dtype(logits.dtype)) / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    logp = logp_all.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logp, entropy


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    x = torch.where(m != 0, x * m, torch.zeros_like(x))
    return x.sum() / _nonzero_or_one(m.sum())


def rspo_loss_reference(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    loss_agg_mode: str = "token-mean",
    max_response_length: int | None = None,
    inplace_backward: bool = False,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped, weighted policy-gradient loss of docs/math.md, unfused.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, T, V)`` any float dtype.
    target_ids : torch.Tensor
        ``(B, T)`` integer ids of the sampled tokens.
    weights : torch.Tensor
        ``(B,)`` per response or ``(B, T)`` per token (the RSPO weights, used as advantages).
        Treated as a constant.
    mask : torch.Tensor, optional
        ``(B, T)`` response mask; all ones when absent.
    old_logprobs, ref_logprobs : torch.Tensor, optional
        ``(B, T)`` log-probabilities of the behaviour and reference policies (constants).
    temperature, epsilon_low, epsilon_high, beta, loss_agg_mode, max_response_length
        As in :func:`rspo_kernels.rspo_loss`.
    inplace_backward : bool
        Ignored (accepted so that every backend has one signature).
    return_stats : bool
        Also return the detached statistics dict.

    Returns
    -------
    torch.Tensor or tuple
        The scalar loss (float32, float64 for float64 logits), and the stats when asked.
    """
    del inplace_backward
    B, T = target_ids.shape
    cdt = _compute_dtype(logits.dtype)
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    m = torch.ones(B, T, dtype=cdt, device=logits.device) if mask is None else mask.to(cdt)
    # Masked positions may hold any id (padding, -100): read a valid one, the mask zeroes it.
    safe_ids = torch.where(m != 0, target_ids.long(), torch.zeros_like(target_ids, dtype=torch.long))
    out = token_logprobs_reference(logits, safe_ids, temperature=temperature, return_entropy=return_stats)
    logp, entropy = out if return_stats else (out, None)
    adv = weights.detach().to(cdt)
    adv = adv.unsqueeze(-1).expand(B, T) if adv.dim() == 1 else adv
    old = logp.detach() if old_logprobs is None else old_logprobs.detach().to(cdt)
    ratio = torch.exp(logp - old)
    surrogate = ratio * adv
    clipped_surrogate = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + eps_high) * adv
    loss_mat = -torch.minimum(surrogate, clipped_surrogate)
    kl = None
    if ref_logprobs is not None:
        delta = ref_logprobs.detach().to(cdt) - logp
        kl = torch.exp(delta) - delta - 1.0
        if beta != 0.0:
            loss_mat = loss_mat + beta * kl
    loss = agg_loss_reference(loss_mat, m, loss_agg_mode, max_response_length)
    if not return_stats:
        return loss
    with torch.no_grad():
        stats = {
            "logprob_mean": _masked_mean(logp, m),
            "entropy_mean": _masked_mean(entropy, m),
            # verl's pg_clipfrac: the clipped branch is the larger loss.
            "clip_fraction": _masked_mean((clipped_surrogate < surrogate).to(cdt), m),
            # verl's ppo_kl: mean of old - new log-probs (0 on-policy).
            "approx_kl": _masked_mean(old - logp, m),
        }
        if kl is not None:
            stats["ref_kl"] = _masked_mean(kl, m)
        stats = {k: v.detach() for k, v in stats.items()}
    return loss, stats
