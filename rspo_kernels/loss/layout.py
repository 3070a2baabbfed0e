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
import operator
from typing import Any

import torch

from rspo_kernels.loss.options import LossOptions

__all__ = [
    "GlobalBatch",
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


@dataclasses.dataclass(frozen=True)
class GlobalBatch:
    """verl's ``global_batch_info``: how one rank's (micro-)batch is normalised by the global batch.

    ``dp_size`` ranks each compute ``agg_loss`` of their part divided by the global token count
    (``batch_num_tokens``, token-mean) or sequence count (``global_batch_size``, seq-mean-*) and
    multiplied by ``dp_size``; DDP / FSDP average the ranks' gradients and micro-batch gradients
    accumulate, so the update equals the single-process one whatever the split
    (``verl.trainer.ppo.core_algos.agg_loss``). None: the local count (``dp_size`` must be 1).
    """

    dp_size: int = 1
    batch_num_tokens: Any = None
    global_batch_size: Any = None

    @staticmethod
    def checked(dp_size: Any, batch_num_tokens: Any, global_batch_size: Any, modes: tuple[str, ...]) -> GlobalBatch:
        """Validate the three sizes for the aggregation ``modes`` the loss uses."""
        try:
            dp = operator.index(dp_size) if not isinstance(dp_size, bool) else 0  # numpy ints too
        except TypeError:
            dp = 0
        if dp < 1:
            raise ValueError(f"dp_size must be an int >= 1 (the data-parallel world size), got {dp_size!r}")
        dp_size = dp
        for name, v in (("batch_num_tokens", batch_num_tokens), ("global_batch_size", global_batch_size)):
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                if v.numel() != 1 or v.is_complex():
                    raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(v.shape)}")
                if v.device.type == "cpu" and not float(v) > 0:
                    raise ValueError(f"{name} must be > 0, got {float(v)}")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a number > 0 (the global batch's count), got {v!r}")
        if dp_size > 1:
            if "token-mean" in modes and batch_num_tokens is None:
                raise ValueError(
                    f"dp_size={dp_size} > 1 with loss_agg_mode='token-mean' needs batch_num_tokens "
                    "(the number of valid tokens in the global batch), as verl's agg_loss"
                )
            if any(m.startswith("seq-mean") for m in modes) and global_batch_size is None:
                raise ValueError(
                    f"dp_size={dp_size} > 1 with a seq-mean-* aggregation ({[m for m in modes if m != 'token-mean']}) "
                    "needs global_batch_size (the number of sequences in the global batch), as verl's agg_loss"
                )
        return GlobalBatch(dp_size, batch_num_tokens, global_batch_size)


def _as_count(v: Any, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype).reshape(()) if isinstance(v, torch.Tensor) else like.new_tensor(v)


def aggregation_coefficients(
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    n_seqs: int,
    loss_agg_mode: str,
    horizon: int,
    global_batch: GlobalBatch | None = None,
) -> torch.Tensor:
    """Per-token ``c`` with ``agg_loss(loss_tok, mask, mode, **global_batch_info) == (c * loss_tok).sum()``.

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
    global_batch : GlobalBatch, optional
        verl's ``global_batch_info``: global denominators times ``dp_size`` (None: local ones).
        The internal modes ``"sequence-mean"`` (GMPO's ``torch.mean`` over all ``n_seqs``
        sequences of a per-sequence loss spread over its tokens) and ``"sequence-token-sum"``
        (LUSPO: token sums averaged over all ``n_seqs`` sequences, as TRL) ignore it.

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
    gb = GlobalBatch() if global_batch is None else global_batch
    dp = gb.dp_size
    if loss_agg_mode == "token-mean":
        tokens = _nonzero_or_one(mask.sum()) if gb.batch_num_tokens is None else _as_count(gb.batch_num_tokens, mask)
        return mask / tokens * dp
    if loss_agg_mode == "token-sum":
        return mask * dp
    seq_count = torch.zeros(n_seqs, dtype=mask.dtype, device=mask.device).index_add_(0, seq_index, mask)
    if loss_agg_mode == "sequence-mean":
        return mask / _nonzero_or_one(seq_count)[seq_index] / max(n_seqs, 1)
    if loss_agg_mode == "sequence-token-sum":
        return mask / max(n_seqs, 1)
    if gb.global_batch_size is None:
        n_nonempty = _nonzero_or_one((seq_count > 0).to(mask.dtype).sum())
    else:
        n_nonempty = _as_count(gb.global_batch_size, mask)
    if loss_agg_mode == "seq-mean-token-sum":
        return mask / n_nonempty * dp
    if loss_agg_mode == "seq-mean-token-mean":
        return mask / _nonzero_or_one(seq_count)[seq_index] / n_nonempty * dp
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return mask / n_nonempty * dp / horizon
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
        Coefficient of each token in the aggregated loss (:func:`aggregation_coefficients`), for
        the entropy and KL terms and every policy loss aggregated with ``loss_agg_mode``.
    seq : torch.Tensor
        int64 sequence of each token, in ``[0, n_seqs)``.
    pg_coef : torch.Tensor
        Coefficient of each token in the policy-gradient term: ``coef``, except for the losses
        verl aggregates its own way (sapo: ``seq-mean-token-mean``; geo_mean: mean over sequences).
    is_weights : torch.Tensor or None
        Rollout importance-sampling weights (verl's ``rollout_is_weights``), compute dtype, no grad.
    n_seqs : int
        Number of sequences ``S`` (padded: ``B``; packed: ``len(cu_seqlens) - 1``, else 1).
    generator : torch.Generator or None
        Source of clip_cov's random token choice (None: torch's global generator, as verl).
    """

    rows: torch.Tensor
    ids: torch.Tensor
    live: torch.Tensor
    mask: torch.Tensor
    adv: torch.Tensor
    old: torch.Tensor | None
    ref: torch.Tensor | None
    coef: torch.Tensor
    seq: torch.Tensor | None = None
    pg_coef: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None
    n_seqs: int = 1
    generator: torch.Generator | None = None

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
    *,
    rollout_is_weights: torch.Tensor | None = None,
    global_batch: GlobalBatch | None = None,
    generator: torch.Generator | None = None,
) -> TokenBatch:
    """Normalise validated padded or packed inputs into a :class:`TokenBatch` (O(tokens) work).

    ``rows`` (logits or hidden states) is ``(B, T, D)`` (padded) or ``(N, D)`` (packed); ``weights`` is per response
    ``(B,)`` / per sequence ``(S,)`` or per token, read as :func:`weights_per_token` says. Packed inputs without
    ``cu_seqlens`` are one sequence per token-mean purposes; the seq-* modes need ``cu_seqlens`` (checked by the
    caller). ``rollout_is_weights`` has the token shape; ``global_batch`` is verl's
    ``global_batch_info``; ``generator`` drives clip_cov's random choice.
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
    coef = aggregation_coefficients(m, seq, n_seqs, options.loss_agg_mode, horizon, global_batch)
    pg_mode = pg_aggregation(options)
    pg_coef = (
        coef
        if pg_mode == options.loss_agg_mode
        else aggregation_coefficients(m, seq, n_seqs, pg_mode, horizon, global_batch)
    )
    return TokenBatch(
        rows=rows3,
        ids=target_ids.reshape(-1).long(),
        live=m != 0,
        mask=m,
        adv=adv,
        old=flat(old_logprobs),
        ref=flat(ref_logprobs),
        coef=coef,
        seq=seq,
        pg_coef=pg_coef,
        is_weights=flat(rollout_is_weights),
        n_seqs=n_seqs,
        generator=generator,
    )


def pg_aggregation(options: LossOptions) -> str:
    """The aggregation of the policy-gradient term: ``loss_agg_mode`` but where verl fixes its own.

    verl's sapo always aggregates ``seq-mean-token-mean``; its geo_mean takes ``torch.mean`` over
    the sequences of a per-sequence loss (``"sequence-mean"``, ignoring the global-batch sizes);
    TRL's luspo sums each sequence's tokens and averages over sequences (``"sequence-token-sum"``).
    """
    fixed = {"sapo": "seq-mean-token-mean", "geo_mean": "sequence-mean", "luspo": "sequence-token-sum"}
    return fixed.get(options.policy_loss, options.loss_agg_mode)
