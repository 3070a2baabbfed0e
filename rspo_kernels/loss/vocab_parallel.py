"""Vocabulary-parallel log-probs: each rank of a tensor-parallel group holds a slice of the vocabulary.

Megatron-style heads split the ``lm_head`` rows (and so the logits' last dimension) across the
``tp`` ranks of a group: rank ``r`` holds rows ``[vocab_start, vocab_start + V_local)`` of a
vocabulary padded to a multiple of ``tp``, of which the first ``vocab_size`` are real. A token's
log-prob and entropy need the softmax over the whole vocabulary; the fused paths
(:mod:`~rspo_kernels.loss.chunked` for logits, :mod:`~rspo_kernels.loss.linear_chunked` for
hidden states) compute per-rank statistics over their real columns and :func:`combine_shards`
merges them with two collectives per call:

- an all-reduce MAX of each token's local max logit ``m_r`` (an exact logit value: the common
  offset ``m``);
- one all-reduce SUM of the packed ``(N, 4)`` statistics ``s_r = sum exp(x - m)`` and
  ``u_r = sum exp(x - m) (x - m)`` (each rank's, rescaled from its own max to ``m``), the target
  logit and a "found" count (the rank holding the target contributes 1).

Then ``lse = m + log S`` (kept as the two parts), ``logp = (target - m) - log S`` and
``H = log S - U / S``: only differences of logits enter a sum, so a constant offset of the logits
(1e4, say) costs no precision, and a rank or block whose logits are all ``-inf`` adds exactly 0.
A live id that no rank holds gives a NaN log-prob, as an
out-of-range id does on one process. The backward needs no collective for the logits (each rank
recomputes its own columns with the global ``lse`` and entropy, and every rank sees the same
per-token gradients because the rest of the loss is replicated); the linear path all-reduces
``d hidden`` (partial sums over vocabulary slices) unless the caller's sequence-parallel
reduce-scatter does it. These collectives run inside ``torch.autograd.Function`` bodies, not as
differentiable collectives, so nothing is counted twice.
"""

from __future__ import annotations

import dataclasses
import operator
import sys
from typing import Any

import torch

from rspo_kernels.loss.chunked import (
    check_backward_mode,
    check_inplace_backward_once,
    default_chunk_rows,
    entropy_grad,
    logits_grad,
    row_chunks,
)
from rspo_kernels.loss.layout import compute_dtype
from rspo_kernels.loss.softcap import scaled_logits

__all__ = [
    "ShardedTokenLogprobs",
    "VocabShard",
    "all_reduce_max_",
    "all_reduce_sum",
    "block_stats_update",
    "combine_shards",
    "finish_stats",
    "id_bound",
    "logprob_op",
    "sharded_token_logprobs",
    "vocab_shard",
]


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """Where this rank's rows sit in the vocabulary.

    Attributes
    ----------
    group : ProcessGroup or None
        The tensor-parallel group (None: one process, only padding is masked).
    start : int
        Global index of the first local row (``vocab_start``).
    n_real : int
        Local rows that are real (``min(V_local, vocab_size - start)``, at least 0); the rest are
        padding: probability 0, gradient 0.
    sequence_parallel : bool
        The caller reduce-scatters ``d hidden`` (Megatron's sequence parallelism): skip the
        all-reduce.
    """

    group: Any
    start: int
    n_real: int
    sequence_parallel: bool


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def vocab_shard(
    tp_group: Any, vocab_start: Any, vocab_size: Any, sequence_parallel: Any, local_vocab: int
) -> VocabShard | None:
    """Validate the tensor-parallel arguments; None when there is nothing to shard or mask.

    ``local_vocab`` is the local row count ``V_local`` (the logits' last dimension, the weight's rows).
    """
    if not isinstance(sequence_parallel, bool):
        raise TypeError(f"sequence_parallel must be a bool, got {sequence_parallel!r}")
    start = _int("vocab_start", vocab_start, 0)
    size = None if vocab_size is None else _int("vocab_size", vocab_size, 1)
    if tp_group is None:
        if start != 0:
            raise ValueError(
                f"vocab_start={start} needs tp_group (the tensor-parallel process group whose ranks hold the "
                "other vocabulary slices); without one the rows start at 0"
            )
        if sequence_parallel:
            raise ValueError("sequence_parallel=True needs tp_group (the tensor-parallel process group)")
        if size is not None and size > local_vocab:
            # Ids in [V, vocab_size) would pass the range check and name no row: a NaN loss.
            raise ValueError(
                f"vocab_size={size} is larger than the V={local_vocab} vocabulary rows given, with no tp_group: "
                f"without tensor parallelism vocab_size is the real size of a padded vocabulary (<= V). Pass "
                f"vocab_size <= {local_vocab} (or None), or tp_group= when the rows are one rank's slice"
            )
        if size is None or size == local_vocab:
            return None
    else:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("tp_group is set but torch.distributed is not initialised (call init_process_group)")
        if not isinstance(tp_group, dist.ProcessGroup):
            raise TypeError(f"tp_group must be a torch.distributed.ProcessGroup or None, got {type(tp_group).__name__}")
    # A rank may hold padding only (start >= vocab_size at large tp): n_real = 0 is valid.
    n_real = local_vocab if size is None else max(0, min(local_vocab, size - start))
    return VocabShard(group=tp_group, start=start, n_real=n_real, sequence_parallel=sequence_parallel)


def id_bound(vocab_size: int | None, tp_group: Any, local_vocab: int) -> int:
    """The exclusive upper bound the input checks apply to target ids (global ids under TP)."""
    if vocab_size is not None:
        return int(vocab_size)
    return local_vocab if tp_group is None else sys.maxsize  # unknown total: a NaN flags a stray id


def all_reduce_sum(x: torch.Tensor, shard: VocabShard | None) -> None:
    """In-place SUM over the tensor-parallel group (nothing without one)."""
    if shard is not None and shard.group is not None:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=shard.group)


def _offset(m: torch.Tensor) -> torch.Tensor:
    """The running max as an exp offset: ``-inf`` (nothing finite seen yet) becomes 0.

    A block of ``-inf`` logits (a masked vocabulary block) would otherwise give
    ``exp(-inf - -inf) = NaN``; with offset 0 its entries add ``exp(-inf) = 0``.
    """
    return torch.where(m == float("-inf"), torch.zeros((), dtype=m.dtype, device=m.device), m)


def rescale_stats(
    m: torch.Tensor, s: torch.Tensor, u: torch.Tensor | None, m_new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(s, u)`` relative to offset ``m`` re-expressed relative to ``m_new >= m``.

    ``s = sum exp(x - m)`` and ``u = sum exp(x - m) (x - m)``: every ``x - m`` gains ``m - m'`` and
    every weight is scaled by ``alpha = exp(m - m')``, so ``s' = alpha s`` and
    ``u' = alpha (u + (m - m') s)``. Empty statistics (``s = 0``, ``m = -inf``) stay 0.
    """
    off = _offset(m_new)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    some = s > 0
    dm = torch.where(some, m - off, zero)
    alpha = torch.where(some, torch.exp(dm), zero)
    return alpha * s, (None if u is None else alpha * (u + dm * s))


def block_stats_update(
    m: torch.Tensor, s: torch.Tensor, u: torch.Tensor | None, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One ``[n, vb]`` block of logits folded into each row's running ``(m, s, u)``; ``x`` is overwritten.

    ``m`` is the running max (``-inf`` before any finite logit), ``s = sum exp(x - m)`` and
    ``u = sum exp(x - m) (x - m)`` (None: no entropy). Everything is relative to ``m``, never the
    absolute logits: a constant offset of the logits costs no precision, and a block of ``-inf``
    logits adds exactly nothing. Then ``lse = m + log s`` and ``H = log s - u / s``.
    """
    m_new = torch.maximum(m, x.amax(dim=-1))
    s, u = rescale_stats(m, s, u, m_new)
    x.sub_(_offset(m_new).unsqueeze(-1))  # x - m', -inf stays -inf
    e = x.exp()
    s = s + e.sum(dim=-1)
    if u is not None:
        # e (x - m') where e > 0 only: a -inf logit gives 0, never 0 * -inf.
        u = u + torch.linalg.vecdot(e, x.masked_fill_(e == 0, 0.0))
    return m_new, s, u


def finish_stats(
    m: torch.Tensor, s: torch.Tensor, u: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(offset, log s, entropy)`` per row from the running statistics: ``lse = offset + log s``.

    The log-sum-exp is kept as two parts (the offset, an exact logit value, and ``log s``) so that
    ``x - lse`` is formed as ``(x - offset) - log s`` without rounding ``lse`` at large logits.
    """
    ell = torch.log(s)
    return _offset(m), ell, (None if u is None else ell - u / s)


def combine_shards(
    m_r: torch.Tensor,
    s_r: torch.Tensor,
    u_r: torch.Tensor | None,
    target_r: torch.Tensor,
    found_r: torch.Tensor,
    shard: VocabShard | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Global ``(m, s, u, target logit, found)`` per token from each rank's ``(N,)`` statistics.

    ``(m_r, s_r, u_r)`` are the rank's running statistics over its real columns
    (:func:`block_stats_update`; ``m_r = -inf``, ``s_r = 0`` when it has none; ``u_r`` None when the
    entropy is not needed), ``target_r`` the target's logit where the rank holds it (else 0) and
    ``found_r`` 1 there (else 0), all in the compute dtype. The statistics are rescaled to the
    global max before they are summed, so no rank's absolute logits enter a sum. Without a group
    the local values are the global ones.
    """
    if shard is None or shard.group is None:
        return m_r, s_r, u_r, target_r, found_r
    import torch.distributed as dist

    m = m_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=shard.group)
    s_r, u_r = rescale_stats(m_r, s_r, u_r, m)
    cols = [s_r, target_r, found_r] + ([] if u_r is None else [u_r])
    packed = torch.stack(cols, dim=1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=shard.group)
    return m, packed[:, 0], (None if u_r is None else packed[:, 3]), packed[:, 1], packed[:, 2]


def all_reduce_max_(x: torch.Tensor, shard: VocabShard | None) -> None:
    """In-place MAX over the tensor-parallel group (nothing without one)."""
    if shard is not None and shard.group is not None:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=shard.group)


class ShardedTokenLogprobs(torch.autograd.Function):
    """``(logits_local, ids, live) -> (logp, entropy, offset, log_s)`` over a vocabulary split across ranks.

    The contract of :class:`rspo_kernels.loss.chunked.ChunkedTokenLogprobs` for the local slice
    ``(B, T, V_local)`` of the logits, with global ``ids``: the forward reads the real columns chunk
    by chunk (running max, sum-exp and entropy statistics relative to it, and the target logit)
    and merges them with :func:`combine_shards`; the backward recomputes the local softmax with the
    saved global ``lse = offset + log_s`` and entropy (no collective) and writes zeros to the padded
    columns. ``logp`` and ``entropy`` are differentiable, ``offset`` and ``log_s`` (saved for
    backward) are not.
    """

    @staticmethod
    def forward(
        logits: torch.Tensor,
        ids: torch.Tensor,
        live: torch.Tensor,
        temperature: float,
        with_entropy: bool,
        inplace_backward: bool,
        chunk_rows: int,
        shard: VocabShard,
        softcap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = logits.shape
        N, n_real = B * T, shard.n_real
        cdt = compute_dtype(logits.dtype)
        dev = logits.device
        zero = torch.zeros((), dtype=cdt, device=dev)
        local = ids - shard.start
        inside = live & (local >= 0) & (local < n_real)
        safe = torch.where(inside, local, torch.zeros_like(local))
        m_r = torch.full((N,), float("-inf"), dtype=cdt, device=dev)
        s_r = torch.zeros(N, dtype=cdt, device=dev)
        u_r = torch.zeros(N, dtype=cdt, device=dev) if with_entropy else None
        target_r = torch.zeros(N, dtype=cdt, device=dev)
        if n_real:
            for (rows,), r0, r1 in row_chunks((logits[..., :n_real],), chunk_rows):
                # [n, V_real], a fresh buffer (capped, or copied): overwritten by the statistics.
                if softcap is None:
                    x = rows.to(cdt, copy=True)
                else:
                    x, _ = scaled_logits(rows, 1.0, softcap, cdt)
                if temperature != 1.0:
                    x.div_(temperature)
                target_r[r0:r1] = x.gather(1, safe[r0:r1].unsqueeze(-1)).squeeze(-1)
                m, s, u = block_stats_update(m_r[r0:r1], s_r[r0:r1], None if u_r is None else u_r[r0:r1], x)
                m_r[r0:r1], s_r[r0:r1] = m, s
                if u_r is not None and u is not None:
                    u_r[r0:r1] = u
        # Dead rows may hold anything (NaN, inf): neutral values keep them out of the collectives.
        ninf = torch.full((), float("-inf"), dtype=cdt, device=dev)
        m_r, s_r = torch.where(live, m_r, ninf), torch.where(live, s_r, zero)
        u_r = None if u_r is None else torch.where(live, u_r, zero)
        target_r = torch.where(inside, target_r, zero)
        m, s, u, target, found = combine_shards(m_r, s_r, u_r, target_r, inside.to(cdt), shard)
        off, ell, ent = finish_stats(m, s, u)
        nan = torch.full((), float("nan"), dtype=cdt, device=dev)
        # (target - offset) - log s, not target - lse: lse would round at large logits.
        logp = torch.where(live, torch.where(found > 0, (target - off) - ell, nan), zero)
        entropy = torch.where(live, ent, zero) if ent is not None else logp.new_empty(0)
        return logp, entropy, torch.where(live, off, zero), torch.where(live, ell, zero)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        logits, ids, live, temperature, with_entropy, inplace_backward, chunk_rows, shard = inputs[:8]
        softcap = inputs[8] if len(inputs) > 8 else None  # a caller that predates the cap passes 8
        _, entropy, off, ell = output
        ctx.mark_non_differentiable(*((off, ell) if with_entropy else (entropy, off, ell)))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, ids, live, off, ell, entropy)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        ctx.chunk_rows = chunk_rows
        ctx.shard = shard
        ctx.softcap = softcap
        ctx.consumed = False

    @staticmethod
    def backward(ctx: Any, g_logp: Any, g_entropy: Any, _g_off: Any, _g_ell: Any) -> tuple:
        check_backward_mode("rspo_loss")
        check_inplace_backward_once(ctx)
        logits, ids, live, off, ell, entropy = ctx.saved_tensors
        shard: VocabShard = ctx.shard
        g_entropy = entropy_grad(g_entropy)
        if g_logp is None:
            g_logp = torch.zeros_like(off)
        n_real = shard.n_real
        if ctx.inplace_backward:
            grad = logits
        else:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        grad[..., n_real:] = 0  # padded rows: probability 0, gradient 0
        if n_real:
            logits_grad(
                logits[..., :n_real],
                ids - shard.start,
                live,
                (off, ell),
                g_logp,
                ctx.temperature,
                ctx.chunk_rows,
                False,
                g_entropy=g_entropy,
                # E_p[x - offset] = log s - H: both relative, no absolute logit enters.
                mean_x=None if g_entropy is None else ell - entropy,
                out=grad[..., :n_real],
                softcap=ctx.softcap,
            )
        if ctx.inplace_backward:
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None, None, None


def sharded_token_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    live: torch.Tensor,
    *,
    temperature: float,
    with_entropy: bool,
    shard: VocabShard,
    inplace_backward: bool = False,
    chunk_rows: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of global ``ids`` from this rank's ``(B, T, V_local)`` logits slice.

    The contract of :func:`rspo_kernels.loss.chunked.fused_token_logprobs`; every rank of
    ``shard.group`` must call it with the same ``ids``, ``live`` and ``temperature``.
    """
    logp, entropy, _, _ = ShardedTokenLogprobs.apply(
        logits,
        ids,
        live,
        float(temperature),
        bool(with_entropy),
        bool(inplace_backward),
        int(chunk_rows or default_chunk_rows(logits.shape[-1])),
        shard,
        None if softcap is None else float(softcap),
    )
    return logp, (entropy if with_entropy else None)


def logprob_op(device_type: str, dtype: torch.dtype, shard: VocabShard | None, chunk_rows: int | None = None) -> Any:
    """The fused log-prob function for logits: the dispatcher's choice, or the sharded torch path.

    The Triton kernels and the unfused reference see one process's whole vocabulary; with a shard
    the chunked torch path runs on any device. Forcing another backend with
    ``RSPO_KERNELS_BACKEND`` then raises instead of silently ignoring the shard. ``chunk_rows``,
    the chunked torch path's block size, is bound where that path serves (the Triton kernels and
    the reference have no chunks).
    """
    import functools
    import os

    from rspo_kernels._dispatch import BACKEND_ENV, implementation

    chunks: dict[str, Any] = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    if shard is None:
        backend, fn = implementation("token_logprobs", device_type, dtype)
        return functools.partial(fn, **chunks) if backend == "torch" and chunks else fn
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced in ("triton", "reference"):
        raise NotImplementedError(
            f"{BACKEND_ENV}={forced} does not support a vocabulary-parallel or padded vocabulary (tp_group, "
            f"vocab_start, vocab_size): unset it (or set it to 'torch') to use the chunked torch path on any "
            "device, or compute the loss from hidden states with rspo_linear_loss(..., tp_group=...)"
        )
    return functools.partial(sharded_token_logprobs, shard=shard, **chunks)
