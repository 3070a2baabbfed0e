"""The RSPO policy loss in plain, unfused torch: the specification every fast path is tested against.

Nothing here is clever. The ``(tokens x vocab)`` log-softmax is materialised, autograd
differentiates it, the per-token objective follows verl's ``compute_policy_loss`` and the
aggregation follows verl's ``agg_loss`` line by line (``dp_size = 1``). The fused backends
(:mod:`rspo_kernels.loss.chunked`, :mod:`rspo_kernels.ops.token_logprobs`) replace only the
log-softmax and gather; they call :func:`token_objective` from here for the O(tokens) rest, so the
per-token algebra is written once.

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

import torch

from rspo_kernels.loss.layout import compute_dtype
from rspo_kernels.loss.options import LOG_RATIO_CLAMP, LOSS_AGG_MODES, LossOptions
from rspo_kernels.loss.softcap import scaled_logits

__all__ = [
    "LOSS_AGG_MODES",
    "agg_loss_reference",
    "token_logprobs_reference",
    "fused_token_logprobs_reference",
    "token_objective",
    "rspo_loss_reference",
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


def token_objective(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    adv: torch.Tensor,
    live: torch.Tensor,
    options: LossOptions,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss of verl's ``compute_policy_loss`` (dual-clip, log-ratio clamp) plus k3 KL.

    Parameters
    ----------
    logp : torch.Tensor
        ``(N,)`` log-probabilities of the current policy (differentiable).
    old_logp, ref_logp : torch.Tensor or None
        ``(N,)`` behaviour and reference log-probs (constants); ``old_logp=None`` is on-policy.
    adv : torch.Tensor
        ``(N,)`` token weights (the RSPO weights as advantages).
    live : torch.Tensor
        ``(N,)`` bool; other tokens get loss 0 and gradient 0 whatever their inputs hold.
    options : LossOptions
        Clip ranges, dual-clip constant and ``beta``.

    Returns
    -------
    loss_tok : torch.Tensor
        ``(N,)`` differentiable in ``logp``.
    parts : dict of torch.Tensor
        Detached ``(N,)`` pieces the statistics need: ``clipped`` (verl's ``pg_clipfrac``
        indicator), ``dual_clipped`` (``pg_clipfrac_lower``), ``neg_log_ratio`` (verl's
        ``ppo_kl`` terms, ``old - logp`` clamped) and, with ``ref_logp``, ``kl``.
    """
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    lp_const = logp.detach()
    # Dead tokens get inputs that make every term finite, so 0 * (local derivative) stays 0.
    old = lp_const if old_logp is None else torch.where(live, old_logp, lp_const)
    a = torch.where(live, adv, zero)
    log_ratio = torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg1 = -a * ratio
    pg2 = -a * torch.clamp(ratio, 1.0 - options.epsilon_low, 1.0 + options.eps_high)
    loss = torch.maximum(pg1, pg2)
    parts = {"clipped": (pg2 > pg1) & live, "neg_log_ratio": torch.where(live, -log_ratio, zero).detach()}
    if options.clip_ratio_c is not None:
        pg3 = -a * options.clip_ratio_c
        parts["dual_clipped"] = (loss > pg3) & (a < 0) & live
        loss = torch.where(a < 0, torch.minimum(pg3, loss), loss)
    if ref_logp is not None:
        ref = torch.where(live, ref_logp, lp_const)
        delta = torch.clamp(ref - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.exp(delta) - delta - 1.0
        parts["kl"] = torch.where(live, kl, zero).detach()
        if options.beta != 0.0:
            loss = loss + options.beta * kl
    return torch.where(live, loss, zero), parts


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


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    x = torch.where(m != 0, x.to(m.dtype) * m, torch.zeros_like(m))
    return x.sum() / _nonzero_or_one(m.sum())


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
    **options: object,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped, weighted policy-gradient loss, unfused; same arguments as :func:`rspo_kernels.rspo_loss`.

    Packed ``(N, V)`` inputs are unpacked into a padded batch along ``cu_seqlens`` (a copy: this
    is the specification, not a fast path), so both layouts share one aggregation. With
    ``cu_seqlens``, ``S`` weights are one per sequence, also when ``S == N``, unless
    ``weights_per="token"``. ``logit_softcap`` caps the logits before the temperature.
    ``inplace_backward`` is ignored.
    """
    del inplace_backward
    opts = LossOptions(**options)  # type: ignore[arg-type]
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
            return_stats=return_stats,
            logit_softcap=logit_softcap,
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
    flat = lambda x: None if x is None else x.detach().to(cdt).reshape(-1)  # noqa: E731
    loss_tok, parts = token_objective(
        logp, flat(old_logprobs), flat(ref_logprobs), adv.reshape(-1), live.reshape(-1), opts
    )
    loss = agg_loss_reference(loss_tok.view(B, T), m, opts.loss_agg_mode, opts.max_response_length)
    if opts.entropy_coeff != 0.0:
        assert entropy is not None
        # verl's ppo_loss: policy_loss -= entropy_coeff * agg_loss(entropy, mask, loss_agg_mode).
        ent = agg_loss_reference(entropy.view(B, T), m, opts.loss_agg_mode, opts.max_response_length)
        loss = loss - opts.entropy_coeff * ent
    if not return_stats:
        return loss
    return loss, summarize_stats(m.reshape(-1), logp, None if entropy is None else entropy.detach(), parts)


def summarize_stats(
    mask: torch.Tensor, logp: torch.Tensor, entropy: torch.Tensor | None, parts: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Masked token means of what trainers log; detached 0-d tensors (0 where nothing is live).

    Keys: ``logprob_mean``, ``entropy_mean``, ``clip_fraction`` (verl's ``pg_clipfrac``),
    ``approx_kl`` (verl's ``ppo_kl``: mean clamped ``old - logp``), and when present
    ``dual_clip_fraction`` (verl's ``pg_clipfrac_lower``) and ``ref_kl`` (mean k3 KL).
    """
    with torch.no_grad():
        stats = {
            "logprob_mean": _masked_mean(logp.detach(), mask),
            "entropy_mean": _masked_mean(entropy if entropy is not None else torch.zeros_like(mask), mask),
            "clip_fraction": _masked_mean(parts["clipped"], mask),
            "approx_kl": _masked_mean(parts["neg_log_ratio"], mask),
        }
        if "dual_clipped" in parts:
            stats["dual_clip_fraction"] = _masked_mean(parts["dual_clipped"], mask)
        if "kl" in parts:
            stats["ref_kl"] = _masked_mean(parts["kl"], mask)
    return {k: v.detach() for k, v in stats.items()}
