"""The memory-lean torch path of the RSPO loss: rows of the logits in chunks, gradient in the forward.

The unfused specification (:mod:`rspo_kernels.loss_reference`) keeps a float32 ``(tokens, vocab)``
log-softmax alive for autograd and builds another one in the backward. Here the logits are read
``chunk_rows`` rows at a time: each chunk is upcast, its log-sum-exp, target log-prob and (when asked)
entropy are taken, and the gradient of the aggregated loss with respect to those rows,

    dL/dlogits = c_tok * dloss_tok/dlogp * (onehot(target) - softmax(logits / T)) / T,

is written straight into a gradient buffer in the logits' dtype (or into the logits themselves with
``inplace_backward=True``). The aggregation is linear in the per-token losses, ``L = sum c_tok *
loss_tok``, with coefficients ``c_tok`` that depend only on the mask (:func:`aggregation_coefficients`),
so the whole gradient is known during the forward pass. Extra memory is a few float32 chunks plus
O(tokens) vectors. It runs on any device; the dispatcher sends CPU tensors here.

The per-token algebra and the statistics are shared with the Triton backend.
"""

from __future__ import annotations

from typing import Iterator

import torch

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "aggregation_coefficients",
    "token_objective",
    "summarize_stats",
    "fused_loss_args",
    "token_logprobs_torch",
    "rspo_loss_torch",
]

# Size of one float32 chunk of logits; the working set is about three of these.
DEFAULT_CHUNK_BYTES = 8 << 20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nonzero_or_one(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.ones_like(x))


def aggregation_coefficients(
    mask: torch.Tensor, loss_agg_mode: str, max_response_length: int | None = None
) -> torch.Tensor:
    """Per-token coefficients ``c`` with ``agg_loss(l, mask, mode) == (c * l).sum()``.

    Parameters
    ----------
    mask : torch.Tensor
        ``(B, T)`` float mask (0 for padding).
    loss_agg_mode : str
        One of :data:`rspo_kernels.loss_reference.LOSS_AGG_MODES`.
    max_response_length : int, optional
        Divisor of ``seq-mean-token-sum-norm``; ``T`` when absent.

    Returns
    -------
    torch.Tensor
        ``(B, T)`` in ``mask.dtype``, zero wherever the mask is zero. Computed on the mask's
        device without a host synchronisation.

    Notes
    -----
    Every verl mode divides masked sums by quantities of the mask alone (token count, number of
    non-empty sequences, per-sequence counts, the horizon), so ``dL/dloss_tok = c_tok`` exactly.
    """
    seq_count = mask.sum(dim=-1, keepdim=True)  # [B, 1]
    n_seqs = _nonzero_or_one((seq_count > 0).to(mask.dtype).sum())
    if loss_agg_mode == "token-mean":
        return mask / _nonzero_or_one(seq_count.sum())
    if loss_agg_mode == "token-sum":
        return mask.clone()
    if loss_agg_mode == "seq-mean-token-sum":
        return mask / n_seqs
    if loss_agg_mode == "seq-mean-token-mean":
        return mask / _nonzero_or_one(seq_count) / n_seqs
    if loss_agg_mode == "seq-mean-token-sum-norm":
        horizon = mask.shape[-1] if max_response_length is None else max_response_length
        return mask / n_seqs / horizon
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")


def token_objective(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    adv: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token loss, its derivative in ``logp``, the clip indicator and the k3 KL.

    All arguments are ``(n,)`` tensors of one float dtype. Returns ``(loss_tok, dloss_dlogp,
    clipped, kl)``; ``kl`` is None without ``ref_logp``.
    """
    ratio = torch.ones_like(logp) if old_logp is None else torch.exp(logp - old_logp)
    surrogate = ratio * adv
    clipped_surrogate = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    loss = -torch.minimum(surrogate, clipped_surrogate)
    clipped = clipped_surrogate < surrogate
    # d(-ratio * A)/dlogp = -ratio * A on the unclipped branch; the clipped branch is constant.
    dlogp = torch.where(clipped, torch.zeros_like(surrogate), -surrogate)
    kl = None
    if ref_logp is not None:
        delta = ref_logp - logp
        e = torch.exp(delta)
        kl = e - delta - 1.0
        if beta != 0.0:
            loss = loss + beta * kl
            dlogp = dlogp + beta * (1.0 - e)
    return loss, dlogp, clipped, kl


def summarize_stats(
    mask: torch.Tensor,
    logp: torch.Tensor,
    entropy: torch.Tensor,
    clipped: torch.Tensor,
    old_logp: torch.Tensor | None,
    kl: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Masked token means of what trainers log (see :func:`rspo_kernels.rspo_loss`).

    Inputs are flat ``(N,)``; outputs are detached 0-d float tensors (0 where nothing is unmasked).
    """

    def mean(x: torch.Tensor) -> torch.Tensor:
        x = torch.where(mask != 0, x.to(mask.dtype) * mask, torch.zeros_like(mask))
        return (x.sum() / _nonzero_or_one(mask.sum())).detach()

    stats = {
        "logprob_mean": mean(logp),
        "entropy_mean": mean(entropy),
        "clip_fraction": mean(clipped),
        "approx_kl": mean(old_logp - logp) if old_logp is not None else torch.zeros_like(mask.sum()),
    }
    if kl is not None:
        stats["ref_kl"] = mean(kl)
    return stats


def _flat_rows(x: torch.Tensor) -> torch.Tensor | None:
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:  # a strided slice such as logits[:, :-1] is not one (N, V) view
        return None


def _row_chunks(
    logits: torch.Tensor, grad: torch.Tensor | None, chunk_rows: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, int, int]]:
    """Yield ``(logits_rows, grad_rows, r0, r1)`` covering the flattened rows ``[r0, r1)``."""
    B, T, _ = logits.shape
    flat_l = _flat_rows(logits)
    flat_g = None if grad is None else _flat_rows(grad)
    if flat_l is not None and (grad is None or flat_g is not None):
        for r0 in range(0, B * T, chunk_rows):
            r1 = min(r0 + chunk_rows, B * T)
            yield flat_l[r0:r1], None if flat_g is None else flat_g[r0:r1], r0, r1
        return
    for b in range(B):  # non-viewable layout: chunk within each sequence, never copy the whole
        for t0 in range(0, T, chunk_rows):
            t1 = min(t0 + chunk_rows, T)
            yield logits[b, t0:t1], None if grad is None else grad[b, t0:t1], b * T + t0, b * T + t1


def _default_chunk_rows(vocab: int) -> int:
    return max(1, DEFAULT_CHUNK_BYTES // (4 * max(vocab, 1)))


def _chunk_log_softmax(
    rows: torch.Tensor, ids: torch.Tensor, temperature: float, cdt: torch.dtype, want_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return ``(log_softmax rows (n, V) in cdt, logp (n,), entropy (n,) or None)``; fresh memory."""
    x = rows.to(cdt, copy=True)  # [n, V]
    if temperature != 1.0:
        x.div_(temperature)
    lse = torch.logsumexp(x, dim=-1)  # [n]
    x.sub_(lse.unsqueeze(-1))  # x is now log-softmax
    logp = x.gather(1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if want_entropy:
        entropy = -(torch.exp(x) * x).sum(dim=-1)
    return x, logp, entropy


@torch.no_grad()
def token_logprobs_torch(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_rows: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked log-probabilities of ``target_ids`` (and entropies), forward only.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, T, V)`` any float dtype, any strides.
    target_ids : torch.Tensor
        ``(B, T)`` int64 ids in ``[0, V)``.
    temperature : float
        Divides the logits.
    return_entropy : bool
        Also compute the entropies.
    chunk_rows : int, optional
        Rows per chunk; by default a float32 chunk is about 8 MiB.

    Returns
    -------
    torch.Tensor or tuple of torch.Tensor
        ``(B, T)`` float32 (float64 for float64 logits) log-probs, and the entropies when asked
        (the contract of :func:`rspo_kernels.loss_reference.token_logprobs_reference`).
    """
    B, T, V = logits.shape
    cdt = _compute_dtype(logits.dtype)
    ids = target_ids.reshape(-1)
    logp = torch.empty(B * T, dtype=cdt, device=logits.device)
    entropy = torch.empty(B * T, dtype=cdt, device=logits.device) if return_entropy else None
    for rows, _, r0, r1 in _row_chunks(logits, None, chunk_rows or _default_chunk_rows(V)):
        _, lp, ent = _chunk_log_softmax(rows, ids[r0:r1], temperature, cdt, return_entropy)
        logp[r0:r1] = lp
        if entropy is not None:
            entropy[r0:r1] = ent
    return (logp.view(B, T), entropy.view(B, T)) if return_entropy else logp.view(B, T)


class ChunkedRSPOLossFunction(torch.autograd.Function):
    """Forward computes the loss and the full logits gradient chunk by chunk; backward scales it."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        target_ids: torch.Tensor,
        adv: torch.Tensor,
        mask: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        ref_logprobs: torch.Tensor | None,
        temperature: float,
        epsilon_low: float,
        epsilon_high: float,
        beta: float,
        loss_agg_mode: str,
        max_response_length: int | None,
        inplace_backward: bool,
        stats_out: dict | None,
        chunk_rows: int | None,
    ) -> torch.Tensor:
        B, T, V = logits.shape
        N = B * T
        cdt = _compute_dtype(logits.dtype)
        m = mask.reshape(-1).to(cdt)
        coef = aggregation_coefficients(mask.to(cdt), loss_agg_mode, max_response_length).reshape(-1)
        # Padding may hold any id (-100, pad): read a valid column, the zero coefficient removes it.
        ids = torch.where(m != 0, target_ids.reshape(-1), torch.zeros_like(target_ids.reshape(-1)))
        a = adv.reshape(-1).to(cdt)
        old = None if old_logprobs is None else old_logprobs.reshape(-1).to(cdt)
        ref = None if ref_logprobs is None else ref_logprobs.reshape(-1).to(cdt)
        want_grad = ctx.needs_input_grad[0]
        want_entropy = stats_out is not None
        grad = None
        if want_grad:
            grad = logits if inplace_backward else torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)

        logp = torch.empty(N, dtype=cdt, device=logits.device)
        loss_tok = torch.empty_like(logp)
        clipped = torch.empty(N, dtype=torch.bool, device=logits.device)
        entropy = torch.empty_like(logp) if want_entropy else None
        kl = torch.empty_like(logp) if ref is not None else None
        for rows, grad_rows, r0, r1 in _row_chunks(logits, grad, chunk_rows or _default_chunk_rows(V)):
            chunk_ids = ids[r0:r1]
            x, lp, ent = _chunk_log_softmax(rows, chunk_ids, temperature, cdt, want_entropy)
            l_tok, dlogp, clip, kl_tok = token_objective(
                lp,
                None if old is None else old[r0:r1],
                None if ref is None else ref[r0:r1],
                a[r0:r1],
                epsilon_low,
                epsilon_high,
                beta,
            )
            c = coef[r0:r1]
            live = c != 0
            logp[r0:r1] = lp
            loss_tok[r0:r1] = torch.where(live, l_tok, torch.zeros_like(l_tok))
            clipped[r0:r1] = clip & live
            if entropy is not None:
                entropy[r0:r1] = ent
            if kl is not None:
                kl[r0:r1] = kl_tok
            if grad_rows is not None:
                g = torch.where(live, c * dlogp / temperature, torch.zeros_like(dlogp))  # [n]
                x.exp_().mul_(-g.unsqueeze(-1))  # -p * g
                x.scatter_add_(1, chunk_ids.unsqueeze(-1), g.unsqueeze(-1))  # + onehot * g
                grad_rows.copy_(x)
        loss = (coef * loss_tok).sum()
        if stats_out is not None:
            stats_out.update(summarize_stats(m, logp, entropy, clipped, old, kl))
        ctx.save_for_backward(grad)
        ctx.has_grad = grad is not None
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if not ctx.has_grad:  # pragma: no cover - autograd only calls us when logits need a gradient
            return (None,) * 15
        # The buffer already holds dL/dlogits for dL = 1; scale in place (one backward only, like
        # Liger-Kernel), and skip the pass entirely in the usual case.
        if grad_output.device.type != "cpu" or grad_output.item() != 1.0:
            grad.mul_(grad_output.to(grad.dtype))
        return (grad,) + (None,) * 14


def fused_loss_args(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    temperature: float,
    epsilon_low: float,
    epsilon_high: float | None,
    beta: float,
    loss_agg_mode: str,
    max_response_length: int | None,
    inplace_backward: bool,
) -> tuple:
    """The positional arguments both fused autograd Functions take, with defaults resolved.

    A missing mask becomes all ones, per-response ``(B,)`` weights are broadcast to ``(B, T)``,
    constant inputs are detached and ``epsilon_high=None`` becomes ``epsilon_low``.
    """
    B, T, _ = logits.shape
    mask_t = torch.ones(B, T, device=logits.device) if mask is None else mask
    adv = weights.unsqueeze(-1).expand(B, T) if weights.dim() == 1 else weights
    return (
        logits,
        target_ids,
        adv.detach(),
        mask_t,
        None if old_logprobs is None else old_logprobs.detach(),
        None if ref_logprobs is None else ref_logprobs.detach(),
        float(temperature),
        float(epsilon_low),
        float(epsilon_low if epsilon_high is None else epsilon_high),
        float(beta),
        loss_agg_mode,
        max_response_length,
        bool(inplace_backward),
    )


def rspo_loss_torch(
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
    chunk_rows: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Chunked RSPO loss; same contract as :func:`rspo_kernels.loss_reference.rspo_loss_reference`.

    ``chunk_rows`` bounds the extra memory to about three float32 ``(chunk_rows, V)`` buffers plus
    O(tokens) vectors (default: a float32 chunk of about 8 MiB).
    """
    stats: dict | None = {} if return_stats else None
    loss = ChunkedRSPOLossFunction.apply(
        *fused_loss_args(
            logits, target_ids, weights, mask, old_logprobs, ref_logprobs, temperature,
            epsilon_low, epsilon_high, beta, loss_agg_mode, max_response_length, inplace_backward,
        ),
        stats,
        chunk_rows,
    )
    return (loss, stats) if return_stats else loss
