"""Vocabulary-parallel log-probs: each rank of a tensor-parallel group holds a slice of the vocabulary.

Megatron-style heads split the ``lm_head`` rows (and so the logits' last dimension) across the
``tp`` ranks of a group: rank ``r`` holds rows ``[vocab_start, vocab_start + V_local)`` of a
vocabulary padded to a multiple of ``tp``, of which the first ``vocab_size`` are real. A token's
log-prob and entropy need the softmax over the whole vocabulary; the fused paths
(:mod:`~rspo_kernels.loss.chunked` for logits, :mod:`~rspo_kernels.loss.linear_chunked` for
hidden states) compute per-rank statistics over their real columns and :func:`combine_shards`
merges them with two collectives per call:

- an all-reduce MAX of each token's local log-sum-exp ``l_r`` (an upper bound of the local row
  max, so ``exp(l_r - m) <= 1``: the stabiliser);
- one all-reduce SUM of the packed ``(N, 4)`` statistics ``s_r = exp(l_r - m)`` (local sum-exp),
  ``s_r (mu_r - m)`` (local sum of ``x exp(x - m)``, for the entropy), the target logit and a
  "found" count (the rank holding the target contributes 1).

Then ``lse = m + log S``, ``E_p[x] = m + U / S``, ``logp = target - lse`` and
``H = lse - E_p[x] = log S - U / S``. A live id that no rank holds gives a NaN log-prob, as an
out-of-range id does on one process. The backward needs no collective for the logits (each rank
recomputes its own columns with the global ``lse`` and ``E_p[x]``, and every rank sees the same
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
    "all_reduce_sum",
    "combine_shards",
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
        if size is None or size >= local_vocab:
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


def combine_shards(
    lse_r: torch.Tensor,
    mean_r: torch.Tensor | None,
    target_r: torch.Tensor,
    found_r: torch.Tensor,
    shard: VocabShard | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Global ``(lse, E_p[x], target logit, found)`` per token from each rank's ``(N,)`` statistics.

    ``lse_r`` is the log-sum-exp over the rank's real columns (``-inf`` when it has none),
    ``mean_r`` their softmax-weighted mean logit (None when the entropy is not needed),
    ``target_r`` the target's logit where the rank holds it (else 0) and ``found_r`` 1 there (else
    0), all in the compute dtype. Without a group the local values are the global ones.
    """
    if shard is None or shard.group is None:
        return lse_r, mean_r, target_r, found_r
    import torch.distributed as dist

    m = lse_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=shard.group)
    finite = torch.isfinite(m)
    zero = torch.zeros((), dtype=lse_r.dtype, device=lse_r.device)
    m0 = torch.where(finite, m, zero)
    s_r = torch.where(lse_r > float("-inf"), torch.exp(lse_r - m0), zero)
    cols = [s_r, target_r, found_r]
    if mean_r is not None:
        # s_r * (mu_r - m): relative to the common offset, so large logits lose no precision.
        cols.append(torch.where(s_r > 0, s_r * (mean_r - m0), zero))
    packed = torch.stack(cols, dim=1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=shard.group)
    s, target, found = packed[:, 0], packed[:, 1], packed[:, 2]
    lse = torch.where(finite, m0 + torch.log(s), m)
    mean = None if mean_r is None else torch.where(s > 0, m0 + packed[:, 3] / s, zero)
    return lse, mean, target, found


class ShardedTokenLogprobs(torch.autograd.Function):
    """``(logits_local, ids, live) -> (logp, entropy, lse, mean_x)`` over a vocabulary split across ranks.

    The contract of :class:`rspo_kernels.loss.chunked.ChunkedTokenLogprobs` for the local slice
    ``(B, T, V_local)`` of the logits, with global ``ids``: the forward reads the real columns chunk
    by chunk (local log-sum-exp, mean and target logit) and merges them with
    :func:`combine_shards`; the backward recomputes the local softmax with the saved global
    ``lse`` and ``E_p[x]`` (no collective) and writes zeros to the padded columns. ``logp`` and
    ``entropy`` are differentiable, ``lse`` and ``mean_x`` (saved for backward) are not.
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
        lse_r = torch.full((N,), float("-inf"), dtype=cdt, device=dev)
        target_r = torch.zeros(N, dtype=cdt, device=dev)
        mean_r = torch.zeros(N, dtype=cdt, device=dev) if with_entropy else None
        if n_real:
            for (rows,), r0, r1 in row_chunks((logits[..., :n_real],), chunk_rows):
                x, _ = scaled_logits(rows, temperature, softcap, cdt)  # [n, V_real]
                lse_c = torch.logsumexp(x, dim=-1)
                lse_r[r0:r1] = lse_c
                target_r[r0:r1] = x.gather(1, safe[r0:r1].unsqueeze(-1)).squeeze(-1)
                if mean_r is not None:
                    p = torch.exp(x - lse_c.unsqueeze(-1))
                    mean_r[r0:r1] = torch.linalg.vecdot(p, torch.where(p > 0, x, zero))
        # Dead rows may hold anything (NaN, inf): neutral values keep them out of the collectives.
        lse_r = torch.where(live, lse_r, zero)
        target_r = torch.where(inside, target_r, zero)
        mean_r = None if mean_r is None else torch.where(live, mean_r, zero)
        lse, mean, target, found = combine_shards(lse_r, mean_r, target_r, inside.to(cdt), shard)
        nan = torch.full((), float("nan"), dtype=cdt, device=dev)
        logp = torch.where(live, torch.where(found > 0, target - lse, nan), zero)
        entropy = torch.where(live, lse - mean, zero) if mean is not None else logp.new_empty(0)
        return logp, entropy, lse, (mean if mean is not None else logp.new_empty(0))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        logits, ids, live, temperature, with_entropy, inplace_backward, chunk_rows, shard = inputs[:8]
        softcap = inputs[8] if len(inputs) > 8 else None  # a caller that predates the cap passes 8
        _, entropy, lse, mean = output
        ctx.mark_non_differentiable(*((lse, mean) if with_entropy else (entropy, lse, mean)))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, ids, live, lse, mean)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        ctx.chunk_rows = chunk_rows
        ctx.shard = shard
        ctx.softcap = softcap
        ctx.consumed = False

    @staticmethod
    def backward(ctx: Any, g_logp: Any, g_entropy: Any, _g_lse: Any, _g_mean: Any) -> tuple:
        check_backward_mode("rspo_loss")
        check_inplace_backward_once(ctx)
        logits, ids, live, lse, mean = ctx.saved_tensors
        shard: VocabShard = ctx.shard
        g_entropy = entropy_grad(g_entropy)
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
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
                lse,
                g_logp,
                ctx.temperature,
                ctx.chunk_rows,
                False,
                g_entropy=g_entropy,
                mean_x=None if g_entropy is None else mean,
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
