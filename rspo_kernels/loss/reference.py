"""The RSPO policy loss in plain, unfused torch: the specification every fast path is tested against.

Nothing here is clever. The ``(tokens x vocab)`` log-softmax is materialised, autograd
differentiates it, the per-token objective follows verl's ``compute_policy_loss`` and the
aggregation follows verl's ``agg_loss`` line by line (``dp_size = 1``). The fused backends
(:mod:`rspo_kernels.loss.chunked`, :mod:`rspo_kernels.ops.token_logprobs`) replace only the
log-softmax and gather. The per-token algebra of every policy loss and KL estimator is written
once, in :mod:`rspo_kernels.loss.policy`; this specification calls it on the unfused log-probs and
aggregates with its own line-by-line copy of verl's ``agg_loss`` (:func:`agg_loss_reference`).

Notation (docs/math.md § The loss the weights feed), per token with weight ``A``::

    logp      = log_softmax(logits / temperature)[target]
    r         = exp(clamp(logp - old_logp, -20, 20))            (old_logp = logp.detach() when absent)
    clipped   = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    loss_tok  = min(-A c, clipped) if A < 0 and dual-clip c is set, else clipped
              + beta * (exp(d) - d - 1),  d = clamp(ref - logp, -20, 20)   (k3 KL)

Defined behaviour on awkward inputs, the same for every backend:

- masked tokens (mask 0) contribute exactly 0 to the loss and 0 to the gradient, whatever their
  logits (NaN, inf), ids (-100), weights or log-probs hold;
- a ``-inf`` logit is a token of probability 0 (vocabulary masking): entropies stay finite;
- a target id outside ``[0, V)`` at a live token gives ``logp = NaN`` (the public API raises
  first for CPU tensors; on a GPU a NaN loss is the signal, never a silently clamped id).
"""

from __future__ import annotations

from typing import Any

import torch

from rspo_kernels.loss.layout import GlobalBatch, compute_dtype, pg_aggregation, token_batch
from rspo_kernels.loss.options import LOSS_AGG_MODES, LossOptions
from rspo_kernels.loss.policy import kl_terms, policy_terms, summarize_stats
from rspo_kernels.loss.softcap import scaled_logits

__all__ = [
    "LOSS_AGG_MODES",
    "agg_loss_reference",
    "token_logprobs_reference",
    "fused_token_logprobs_reference",
    "rspo_loss_reference",
    "summarize_stats",
]


def _nonzero_or_one(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.ones_like(x))


def _entropy_from_log_softmax(logp_all: torch.Tensor) -> torch.Tensor:
    # p log p -> 0 as p -> 0: a -inf logit adds nothing. The where() comes before the product so
    # that autograd never forms 0 * -inf either (its gradient stays finite, and exact).
    p = logp_all.exp()
    safe = torch.where(p > 0, logp_all, torch.zeros_like(logp_all))
    return -(p * safe).sum(dim=-1)


def token_logprobs_reference(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    logit_softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(logits / temperature)`` at ``target_ids`` (and the entropy), unfused.

    Parameters
    ----------
    logits : torch.Tensor
        ``(..., V)`` any float dtype.
    target_ids : torch.Tensor
        ``logits.shape[:-1]`` integer ids; ids outside ``[0, V)`` give NaN.
    temperature : float
        Divides the logits before the softmax.
    return_entropy : bool
        Also return the entropy of ``softmax(logits / temperature)``.
    logit_softcap : float, optional
        Gemma's final-logit soft-capping ``z -> c * tanh(z / c)``, applied before the temperature
        (:mod:`rspo_kernels.loss.softcap`; ``-inf`` stays ``-inf``).

    Returns
    -------
    torch.Tensor or tuple of torch.Tensor
        ``logits.shape[:-1]`` float32 (float64 for float64 logits) log-probabilities, and the
        entropies when asked. Both differentiable (this is the specification).
    """
    V = logits.shape[-1]
    x, _ = scaled_logits(logits, temperature, logit_softcap, compute_dtype(logits.dtype))
    logp_all = torch.log_softmax(x, dim=-1)
    ids = target_ids.long()
    valid = (ids >= 0) & (ids < V)
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.full_like(logp, float("nan")))
    if not return_entropy:
        return logp
    return logp, _entropy_from_log_softmax(logp_all)


def fused_token_logprobs_reference(
    logits: torch.Tensor,
    ids: torch.Tensor,
    live: torch.Tensor,
    *,
    temperature: float,
    with_entropy: bool,
    inplace_backward: bool = False,
    chunk_rows: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The contract of the fused log-prob backends, unfused (the ``reference`` backend).

    ``logits`` ``(B, T, V)``; ``ids`` and ``live`` ``(N,)``. Returns flat ``(N,)`` log-probs and
    entropies (or None), both differentiable; both are 0 at tokens that are not ``live``, and no
    gradient reaches those rows. ``softcap`` is the final-logit soft-capping constant (None: none).
    ``inplace_backward`` and ``chunk_rows`` are ignored.
    """
    del inplace_backward, chunk_rows
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)
    live2 = live.unsqueeze(-1)
    # Dead rows may hold NaN: replace them before the softmax so no NaN reaches the gradient.
    rows = torch.where(live2, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    safe_ids = torch.where(live, ids, torch.zeros_like(ids))
    entropy: torch.Tensor | None = None
    if with_entropy:
        logp, entropy = token_logprobs_reference(
            rows, safe_ids, temperature=temperature, return_entropy=True, logit_softcap=softcap
        )
    else:
        logp = token_logprobs_reference(rows, safe_ids, temperature=temperature, logit_softcap=softcap)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(live, logp, zero)
    return logp, None if entropy is None else torch.where(live, entropy, zero)


def agg_loss_reference(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    loss_agg_mode: str,
    max_response_length: int | None = None,
    *,
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
) -> torch.Tensor:
    """Aggregate a per-token loss into a scalar exactly as verl's ``agg_loss`` (with ``global_batch_info``).

    Parameters
    ----------
    loss_mat : torch.Tensor
        ``(B, T)`` per-token losses.
    mask : torch.Tensor
        ``(B, T)`` 1 for response tokens, 0 for padding (bool, integer or float).
    loss_agg_mode : str
        One of :data:`LOSS_AGG_MODES`.
    max_response_length : int, optional
        The divisor of ``seq-mean-token-sum-norm``; ``T`` when not given (verl's ``loss_scale_factor``).
    dp_size, batch_num_tokens, global_batch_size
        verl's ``global_batch_info``: the global token count replaces ``sum_b n_b`` (token-mean),
        the global sequence count replaces ``G`` (seq-mean-*), and the result is multiplied by
        ``dp_size``. The internal modes ``"sequence-mean"`` (GMPO, ``sum_b (S_b / n_b) / B``) and
        ``"sequence-token-sum"`` (LUSPO, ``sum_b S_b / B``), over all ``B`` rows, ignore them.

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
    if global_batch_size is not None:
        n_seqs = torch.as_tensor(global_batch_size, dtype=loss_mat.dtype, device=loss_mat.device)
    if loss_agg_mode == "token-mean":
        tokens = _nonzero_or_one(seq_count.sum())
        if batch_num_tokens is not None:
            tokens = torch.as_tensor(batch_num_tokens, dtype=loss_mat.dtype, device=loss_mat.device)
        return seq_sum.sum() / tokens * dp_size
    if loss_agg_mode == "token-sum":
        return seq_sum.sum() * dp_size
    if loss_agg_mode == "seq-mean-token-sum":
        return seq_sum.sum() / n_seqs * dp_size
    if loss_agg_mode == "seq-mean-token-mean":
        return (seq_sum / _nonzero_or_one(seq_count)).sum() / n_seqs * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        horizon = loss_mat.shape[-1] if max_response_length is None else max_response_length
        return seq_sum.sum() / n_seqs * dp_size / horizon
    if loss_agg_mode == "sequence-mean":
        return (seq_sum / _nonzero_or_one(seq_count)).sum() / max(loss_mat.shape[0], 1)
    if loss_agg_mode == "sequence-token-sum":
        return seq_sum.sum() / max(loss_mat.shape[0], 1)
    raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not one of {LOSS_AGG_MODES}")


def _unpack(x: torch.Tensor | None, cu: list[int], fill: float = 0.0) -> torch.Tensor | None:
    """Packed ``(N, ...)`` -> padded ``(S, max_len, ...)`` (the reference's way to reuse agg_loss)."""
    if x is None:
        return None
    S, L = len(cu) - 1, max([cu[i + 1] - cu[i] for i in range(len(cu) - 1)] + [1])
    out = torch.full((S, L, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    for s in range(S):
        out[s, : cu[s + 1] - cu[s]] = x[cu[s] : cu[s + 1]]
    return out


def rspo_loss_reference(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_stats: bool = False,
    inplace_backward: bool = False,
    weights_per: str | None = None,
    logit_softcap: float | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    generator: torch.Generator | None = None,
    **options: object,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted policy loss, unfused; same arguments as :func:`rspo_kernels.rspo_loss`.

    Packed ``(N, V)`` inputs are unpacked into a padded batch along ``cu_seqlens`` (a copy: this
    is the specification, not a fast path), so both layouts share one aggregation. With
    ``cu_seqlens``, ``S`` weights are one per sequence, also when ``S == N``, unless
    ``weights_per="token"``. ``logit_softcap`` caps the logits before the temperature.
    ``inplace_backward`` is ignored.
    """
    del inplace_backward
    opts = LossOptions(**options)  # type: ignore[arg-type]
    extra: dict[str, Any] = dict(
        dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size, generator=generator
    )
    if logits.dim() == 2:  # packed
        N = logits.shape[0]
        cu = [0, N] if cu_seqlens is None else [int(v) for v in cu_seqlens.tolist()]
        per_sequence = weights_per == "sequence" or (
            weights_per is None and cu_seqlens is not None and weights.numel() == len(cu) - 1
        )
        if per_sequence:
            lengths = torch.tensor([cu[i + 1] - cu[i] for i in range(len(cu) - 1)], device=weights.device)
            weights = weights.repeat_interleave(lengths)
        m = torch.ones(N, dtype=torch.bool, device=logits.device) if mask is None else mask
        horizon = opts.max_response_length if opts.max_response_length is not None else 1
        kw = {k: getattr(opts, k) for k in LossOptions.field_names()} | {"max_response_length": horizon}
        return rspo_loss_reference(
            _unpack(logits, cu),  # type: ignore[arg-type]
            _unpack(target_ids, cu),  # type: ignore[arg-type]
            _unpack(weights, cu),  # type: ignore[arg-type]
            _unpack(m, cu),
            old_logprobs=_unpack(old_logprobs, cu),
            ref_logprobs=_unpack(ref_logprobs, cu),
            rollout_is_weights=_unpack(rollout_is_weights, cu),
            return_stats=return_stats,
            logit_softcap=logit_softcap,
            **extra,
            **kw,
        )
    B, T, V = logits.shape
    cdt = compute_dtype(logits.dtype)
    m = torch.ones(B, T, dtype=cdt, device=logits.device) if mask is None else mask.to(cdt)
    live = m != 0
    logp, entropy = fused_token_logprobs_reference(
        logits,
        target_ids.reshape(-1).long(),
        live.reshape(-1),
        temperature=opts.temperature,
        with_entropy=return_stats or opts.entropy_coeff != 0.0,
        softcap=logit_softcap,
    )
    adv = weights.detach().to(cdt)
    adv = adv.unsqueeze(-1).expand(B, T) if adv.dim() == 1 else adv
    # The per-token algebra is the registry's (the batch's coefficients are not used here: the
    # aggregation below is this module's own copy of verl's agg_loss).
    batch = token_batch(
        logits,
        target_ids,
        adv,
        m,
        old_logprobs,
        ref_logprobs,
        None,
        opts,
        "token",
        rollout_is_weights=rollout_is_weights,
        generator=generator,
    )
    loss_tok, parts = policy_terms(logp, batch, opts)
    agg = {"dp_size": dp_size, "batch_num_tokens": batch_num_tokens, "global_batch_size": global_batch_size}
    GlobalBatch.checked(dp_size, batch_num_tokens, global_batch_size, (opts.loss_agg_mode, pg_aggregation(opts)))
    loss = agg_loss_reference(loss_tok.view(B, T), m, pg_aggregation(opts), opts.max_response_length, **agg)
    kl = kl_terms(logp, batch, opts)
    if kl is not None:
        parts["kl"] = kl.detach()
        if opts.beta != 0.0:
            # verl's actor: policy_loss += kl_loss_coef * agg_loss(kl_penalty(logp, ref), mask, loss_agg_mode).
            loss = loss + opts.beta * agg_loss_reference(
                kl.view(B, T), m, opts.loss_agg_mode, opts.max_response_length, **agg
            )
    if opts.entropy_coeff != 0.0:
        assert entropy is not None
        # verl's ppo_loss: policy_loss -= entropy_coeff * agg_loss(entropy, mask, loss_agg_mode).
        ent = agg_loss_reference(entropy.view(B, T), m, opts.loss_agg_mode, opts.max_response_length, **agg)
        loss = loss - opts.entropy_coeff * ent
    if not return_stats:
        return loss
    return loss, summarize_stats(m.reshape(-1), logp, None if entropy is None else entropy.detach(), parts)
