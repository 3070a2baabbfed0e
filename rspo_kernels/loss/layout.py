"""Every input layout of the loss, normalised once into flat per-token vectors.

Padded inputs are ``(B, T, V)`` logits with ``(B, T)`` token tensors; packed inputs (verl's
remove-padding, flash-attention varlen) are ``(N, V)`` logits with ``(N,)`` token tensors and
``cu_seqlens = [0, len_0, len_0 + len_1, ..., N]``. Both become a :class:`TokenBatch`: the logits
(or hidden states) as a ``(B', T', D)`` view (``(1, N, V)`` when packed; never copied), and ``(N,)`` vectors for ids,
mask, weights, log-probs, each token's sequence and its coefficient in the aggregated loss. This is
the only form a backend sees.
"""

from __future__ import annotations

import dataclasses

import torch

from rspo_kernels.loss.options import LossOptions

__all__ = [
    "TokenBatch",
    "aggregation_coefficients",
    "compute_dtype",
    "sequence_index",
    "token_batch",
    "weights_per_token",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation for half types; float64 stays float64 (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nonzero_or_one(x: torch.Tensor) -> torch.Tensor:
    # An empty denominator only ever divides an all-zero numerator: 0 / 1 = 0, never NaN.
    return torch.where(x > 0, x, torch.ones_like(x))


def weights_per_token(weights: torch.Tensor, packed: bool, n_seqs: int | None, weights_per: str | None) -> bool:
    """Whether validated ``weights`` hold one value per token (else one per response / sequence).

    Padded inputs: ``(B, T)`` is per token, ``(B,)`` per response. Packed inputs with
    ``cu_seqlens`` (``n_seqs = S``): a vector of ``S`` values is per sequence, also when
    ``S == N`` (zero-length sequences make that happen), unless ``weights_per="token"``; a vector
    of ``N != S`` values is per token. ``weights_per`` pins the reading either way.
    """
    if weights_per is not None:
        return weights_per == "token"
    if not packed:
        return weights.dim() == 2
    return n_seqs is None or weights.numel() != n_seqs


def sequence_index(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``(N,)`` int64 index of the sequence each packed token belongs to (no host sync).

    Token ``i`` belongs to sequence ``s`` when ``cu_seqlens[s] <= i < cu_seqlens[s + 1]``, i.e. ``s``
    is the number of sequence ends at or before ``i``.
    """
    tokens = torch.arange(n_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)


def aggregation_coefficients(
    mask: torch.Tensor, seq_index: torch.Tensor, n_seqs: int, loss_agg_mode: str, horizon: int
) -> torch.Tensor:
    """Per-token ``c`` with ``agg_loss(loss_tok, mask, mode) == (c * loss_tok).sum()``.

    Parameters
    ----------
    mask : torch.Tensor
        ``(N,)`` float mask, 0 at padding.
    seq_index : torch.Tensor
        ``(N,)`` int64 sequence of each token, in ``[0, n_seqs)``.
    n_seqs : int
        Number of sequences ``S``.
    loss_agg_mode : str
        One of :data:`rspo_kernels.loss.LOSS_AGG_MODES`.
    horizon : int
        Divisor of ``"seq-mean-token-sum-norm"``.

    Returns
    -------
    torch.Tensor
        ``(N,)`` in ``mask.dtype``, zero wherever the mask is zero; computed without a host sync.

    Notes
    -----
    Every verl mode divides masked sums by quantities of the mask alone (token count, number of
    non-empty sequences ``G``, per-sequence counts ``n_s``, the horizon), so the aggregation is
    linear in the token losses and ``dL/dloss_tok = c_tok`` exactly (docs/math.md § The loss the weights feed).
    """
    if loss_agg_mode == "token-mean":
        return mask / _nonzero_or_one(mask.sum())
    if loss_agg_mode == "token-sum":
        return mask.clone()
    seq_count = torch.zeros(n_seqs, dtype=mask.dtype, device=mask.device).index_add_(0, seq_index, mask)
    n_nonempty = _nonzero_or_one((seq_count > 0).to(mask.dtype).sum())
    if loss_agg_mode == "seq-mean-token-sum":
        return mask / n_nonempty
    if loss_agg_mode == "seq-mean-token-mean":
        return mask / _nonzero_or_one(seq_count)[seq_index] / n_nonempty
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return mask / n_nonempty / horizon
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """The normalised loss inputs. ``N = B' * T'`` tokens; every vector is ``(N,)``.

    Attributes
    ----------
    rows : torch.Tensor
        ``(B', T', D)`` view of what the log-probs are computed from (``(1, N, D)`` when packed):
        the caller's logits (``D = V``) or, for the linear loss, its hidden states (``D = H``).
    ids : torch.Tensor
        int64 target ids as given (padding may hold -100: read only where ``live``).
    live : torch.Tensor
        bool, ``mask != 0``: the tokens that enter the loss.
    mask : torch.Tensor
        The mask in the compute dtype.
    adv : torch.Tensor
        Each token's weight (per-response weights broadcast), compute dtype.
    old, ref : torch.Tensor or None
        Behaviour and reference log-probs, compute dtype.
    coef : torch.Tensor
        Coefficient of each token in the aggregated loss (:func:`aggregation_coefficients`).
    """

    rows: torch.Tensor
    ids: torch.Tensor
    live: torch.Tensor
    mask: torch.Tensor
    adv: torch.Tensor
    old: torch.Tensor | None
    ref: torch.Tensor | None
    coef: torch.Tensor

    def take(self, index: torch.Tensor | slice) -> TokenBatch:
        """The tokens ``index`` of this batch: every ``(N,)`` vector indexed, ``rows`` unchanged.

        For a loss that is a sum over tokens (:func:`rspo_kernels.loss.policy.is_token_local`),
        ``policy_loss(batch)`` equals the sum of ``policy_loss(batch.take(chunk))`` over any
        partition of the tokens into chunks: what a backend that forms gradients block by block
        in its forward relies on. Fields added later are indexed too when they are ``(N,)``.
        """
        n = self.ids.shape[0]
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "rows" and isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n:
                v = v[index]
            out[f.name] = v
        return TokenBatch(**out)


def token_batch(
    rows: torch.Tensor,
    target_ids: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    options: LossOptions,
    weights_per: str | None = None,
) -> TokenBatch:
    """Normalise validated padded or packed inputs into a :class:`TokenBatch` (O(tokens) work).

    ``rows`` (logits or hidden states) is ``(B, T, D)`` (padded) or ``(N, D)`` (packed); ``weights`` is per response
    ``(B,)`` / per sequence ``(S,)`` or per token, read as :func:`weights_per_token` says. Packed inputs without
    ``cu_seqlens`` are one sequence per token-mean purposes; the seq-* modes need ``cu_seqlens`` (checked by the
    caller).
    """
    packed = rows.dim() == 2
    dev = rows.device
    cdt = compute_dtype(rows.dtype)
    rows3 = rows.unsqueeze(0) if packed else rows
    B, T, _ = rows3.shape
    N = B * T
    if packed:
        if cu_seqlens is not None:
            seq = sequence_index(cu_seqlens, N)
            n_seqs = cu_seqlens.numel() - 1
        else:
            seq = torch.zeros(N, dtype=torch.long, device=dev)
            n_seqs = 1
        horizon = options.max_response_length or 1  # required for the norm mode (checked upstream)
    else:
        seq = torch.arange(B, device=dev).repeat_interleave(T)
        n_seqs = B
        horizon = options.max_response_length or T
    m = torch.ones(N, dtype=cdt, device=dev) if mask is None else mask.reshape(-1).to(cdt)
    w = weights.detach().to(cdt)
    if weights_per_token(w, packed, n_seqs if cu_seqlens is not None else None, weights_per):
        adv = w.reshape(-1)
    else:  # one weight per response / sequence
        adv = w[seq.clamp(max=max(w.numel() - 1, 0))] if packed else w.repeat_interleave(T)
    flat = lambda x: None if x is None else x.detach().reshape(-1).to(cdt)  # noqa: E731
    return TokenBatch(
        rows=rows3,
        ids=target_ids.reshape(-1).long(),
        live=m != 0,
        mask=m,
        adv=adv,
        old=flat(old_logprobs),
        ref=flat(ref_logprobs),
        coef=aggregation_coefficients(m, seq, n_seqs, options.loss_agg_mode, horizon),
    )
