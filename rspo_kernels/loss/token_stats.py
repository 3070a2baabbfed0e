"""Per-token statistics and multi-target log-probs from the fused paths: no ``(tokens x vocab)`` buffer.

What :func:`rspo_kernels.token_logprobs` and :func:`rspo_kernels.token_logprobs_linear` return when
asked for more than one log-prob per token:

- ``sum_pi_squared``: ``sum_v softmax(x)_v^2`` per token (verl's optimal-token baseline), computed
  relative to the running max, ``q / s^2`` with ``q = sum_v exp(2 (x_v - m))`` and
  ``s = sum_v exp(x_v - m)``, so it never overflows;
- ``topk_logprobs`` / ``topk_ids``: ``torch.topk`` of the token's log-softmax (sorted, descending);
- multi-target log-probs: ``(N, K)`` ids give ``log_softmax(x)[ids]`` with their gradient
  ``dL/dx = sum_k g_k onehot(id_k) - p sum_k g_k`` (distillation on a teacher's top-k ids).

Here ``x = cap(z) / T``: the raw logits ``z`` soft-capped (:mod:`rspo_kernels.loss.softcap`) and
divided by the temperature. Two ``torch.autograd.Function`` classes share one per-block accumulator
(:class:`_RowStats`): :class:`StatsTokenLogprobs` reads rows of logits in chunks (the whole
vocabulary per chunk), :class:`StatsLinearLogprobs` forms blocks of ``hidden @ W^T + b`` (vocabulary
outermost, as :mod:`rspo_kernels.loss.linear_chunked`, with its bias shift). Each block updates the
running statistics relative to the running max ``m`` of the single-target paths
(:func:`~rspo_kernels.loss.vocab_parallel.block_stats_update`: ``s = sum exp(x - m)``,
``u = sum exp(x - m) (x - m)``, entropy ``log s - u / s``), ``q`` (the same update on ``2 x``,
whose running max is exactly ``2 m``), the target logits and a running top-k of ``x``; no absolute
logit enters a sum, so a constant offset of the logits costs no precision, and a block of ``-inf``
logits adds 0. Log-probs are ``(x - m) - log s``. Nothing larger than one block and ``O(N K)``
results is ever held. The backward recomputes each block, as the single-target paths do.

Vocabulary parallelism (:mod:`rspo_kernels.loss.vocab_parallel`, docs/tensor-parallel.md): each
rank accumulates over its real columns, then an all-reduce MAX of the local maxima gives the
global ``m``, each rank rescales its ``(s, u, q)`` to it
(:func:`~rspo_kernels.loss.vocab_parallel.rescale_stats`) and one all-reduce SUM merges them with
the ``K`` target logits and their "found" counts; the top-k are all-gathered (``tp x K``
candidates per token, global ids) and reduced by one more ``topk``.

The statistics (``sum_pi_squared``, ``topk_logprobs``, ``topk_ids``) are returned detached: they
feed baselines and logging. A differentiable top-k log-prob is the multi-target form called with
the top-k ids (``token_logprobs(logits, stats.topk_ids)``).
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch

from rspo_kernels.loss.chunked import check_backward_mode, default_chunk_rows, entropy_grad, row_chunks
from rspo_kernels.loss.layout import compute_dtype
from rspo_kernels.loss.linear_chunked import (
    _active,
    _addmm,
    _bias_shift,
    _block_logits,
    _rows,
    _shifted,
    _zero_dead_rows,
    default_blocks,
    forward_logit_blocks,
    idle_row_offset,
)
from rspo_kernels.loss.softcap import cap_derivative, scaled_logits
from rspo_kernels.loss.vocab_parallel import (
    VocabShard,
    all_reduce_sum,
    block_stats_update,
    finish_stats,
    rescale_stats,
)

__all__ = [
    "StatsLinearLogprobs",
    "StatsTokenLogprobs",
    "TokenStats",
    "check_target_ids",
    "check_topk",
    "linear_token_stats",
    "shape_stats",
    "token_stats",
]

_NEG_INF = float("-inf")


class TokenStats(NamedTuple):
    """What ``token_logprobs(..., return_sum_pi_squared=True / topk=K)`` returns; None where not asked.

    Attributes
    ----------
    logprobs : torch.Tensor
        ``target_ids.shape`` log-probabilities (``(..., K)`` for multi-target ids); differentiable.
    entropy : torch.Tensor or None
        Token-shape entropies (with ``return_entropy=True``); differentiable.
    sum_pi_squared : torch.Tensor or None
        Token-shape ``sum_v softmax(x)_v^2`` (with ``return_sum_pi_squared=True``); detached.
    topk_logprobs : torch.Tensor or None
        ``(..., K)`` the ``K`` largest log-probs, descending (with ``topk=K``); detached.
    topk_ids : torch.Tensor or None
        ``(..., K)`` int64 their vocabulary ids (global ids under ``tp_group``).
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    sum_pi_squared: torch.Tensor | None
    topk_logprobs: torch.Tensor | None
    topk_ids: torch.Tensor | None


def check_topk(topk: Any, vocab: int) -> int | None:
    """Validate ``topk``: None, or an int in ``[1, vocab]`` (``vocab``: the real, global vocabulary size)."""
    if topk is None:
        return None
    if isinstance(topk, bool):
        raise TypeError(f"topk must be an int >= 1 or None, got {topk!r}")
    try:
        k = operator.index(topk)
    except TypeError:
        raise TypeError(f"topk must be an int >= 1 or None, got {topk!r} ({type(topk).__name__})") from None
    if k < 1 or k > vocab:
        raise ValueError(f"topk must lie in [1, V={vocab}] (the vocabulary size), got {k}; pass None for no top-k")
    return k


def check_target_ids(target_ids: Any, token_shape: tuple[int, ...], device: torch.device) -> int | None:
    """``target_ids`` of the token shape (returns None) or of the token shape plus ``(K,)`` (returns ``K >= 1``)."""
    from rspo_kernels.loss import _checks

    if isinstance(target_ids, torch.Tensor) and target_ids.dim() == len(token_shape) + 1:
        K = int(target_ids.shape[-1])
        _checks.check_ids(target_ids, (*token_shape, K), device)
        if K == 0:
            raise ValueError(
                f"target_ids has shape {tuple(target_ids.shape)}: multi-target ids need K >= 1 ids per token "
                "in the last dimension"
            )
        return K
    _checks.check_ids(target_ids, token_shape, device)
    return None


def topk_bound(vocab_size: int | None, tp_group: Any, local_vocab: int) -> int:
    """The real vocabulary size ``topk`` may not exceed (``V_local x`` the group size when unknown under TP)."""
    if vocab_size is not None:
        return int(vocab_size)
    if tp_group is None:
        return local_vocab
    import torch.distributed as dist

    return local_vocab * dist.get_world_size(tp_group)


def shape_stats(stats: TokenStats, ids_shape: tuple[int, ...], token_shape: tuple[int, ...]) -> TokenStats:
    """Flat :class:`TokenStats` (``(N, K)`` / ``(N,)``) reshaped to the caller's layout."""
    token_shape = tuple(token_shape)

    def per_token(v: torch.Tensor | None) -> torch.Tensor | None:
        return None if v is None else v.view(token_shape)

    def per_k(v: torch.Tensor | None) -> torch.Tensor | None:
        return None if v is None else v.view(*token_shape, v.shape[-1])

    return TokenStats(
        stats.logprobs.view(ids_shape),
        per_token(stats.entropy),
        per_token(stats.sum_pi_squared),
        per_k(stats.topk_logprobs),
        per_k(stats.topk_ids),
    )


class _RowStats:
    """Running per-row statistics over vocabulary blocks of ``x`` (one row per token).

    ``m`` the running max, ``s = sum exp(x - m)``, ``u = sum exp(x - m) (x - m)`` (entropy) and
    ``q = sum exp(2 (x - m))`` (``sum pi^2``), all relative to ``m``
    (:func:`~rspo_kernels.loss.vocab_parallel.block_stats_update`); ``target`` the logits at the
    ``K`` ids (with ``found``); ``vals`` / ``idx`` a running top-k of ``x`` (local column indices).
    """

    def __init__(
        self, n: int, K: int, cdt: torch.dtype, dev: torch.device, entropy: bool, sum_pi2: bool, topk: int | None
    ):
        self.m = torch.full((n,), _NEG_INF, dtype=cdt, device=dev)
        self.s = torch.zeros(n, dtype=cdt, device=dev)
        self.u = torch.zeros(n, dtype=cdt, device=dev) if entropy else None
        self.q = torch.zeros(n, dtype=cdt, device=dev) if sum_pi2 else None
        self.target = torch.zeros(n, K, dtype=cdt, device=dev)
        self.found = torch.zeros(n, K, dtype=torch.bool, device=dev)
        self.topk = topk
        self.vals = None if topk is None else torch.full((n, topk), _NEG_INF, dtype=cdt, device=dev)
        self.idx = None if topk is None else torch.zeros(n, topk, dtype=torch.long, device=dev)

    def update(self, r0: int, r1: int, x: torch.Tensor, col0: int, ids: torch.Tensor) -> None:
        """Fold the block ``x`` ``[n, vb]`` (columns ``[col0, col0 + vb)``) into rows ``[r0, r1)``.

        ``x`` is overwritten. ``ids`` ``[n, K]`` are local column indices (any value: those outside
        the block are skipped).
        """
        vb = x.shape[1]
        local = ids - col0
        inside = (local >= 0) & (local < vb)
        hit = x.gather(1, local.clamp(0, vb - 1))
        self.target[r0:r1] = torch.where(inside, hit, self.target[r0:r1])
        self.found[r0:r1] |= inside
        if self.vals is not None and self.idx is not None:
            v, i = torch.topk(x, min(self.topk or 1, vb), dim=-1)
            v_all = torch.cat([self.vals[r0:r1], v], dim=1)
            i_all = torch.cat([self.idx[r0:r1], i + col0], dim=1)
            top_v, pos = torch.topk(v_all, self.topk or 1, dim=-1)
            self.vals[r0:r1] = top_v
            self.idx[r0:r1] = i_all.gather(1, pos)
        m = self.m[r0:r1]
        if self.q is not None:
            # sum exp(2 (x - m)) is the running sum of exp(y - m_y) for y = 2 x, whose max is exactly 2 m.
            _, self.q[r0:r1], _ = block_stats_update(2.0 * m, self.q[r0:r1], None, x * 2.0)
        u = None if self.u is None else self.u[r0:r1]
        self.m[r0:r1], self.s[r0:r1], u = block_stats_update(m, self.s[r0:r1], u, x)
        if self.u is not None and u is not None:
            self.u[r0:r1] = u


def _finish(
    acc: _RowStats,
    live: torch.Tensor,
    shard: VocabShard | None,
    with_entropy: bool,
) -> tuple[torch.Tensor, ...]:
    """``(logp [n, K], entropy, sum_pi2, topk_logp, topk_ids, offset, log_s)`` from the local accumulators.

    ``live`` ``[n]``: other rows get 0 everywhere (and take no part in the collectives with their
    values). Under a tensor-parallel group the ranks' statistics are merged (module docstring).
    ``lse = offset + log_s`` (:func:`~rspo_kernels.loss.vocab_parallel.finish_stats`). Entries that
    are not asked for are empty tensors.
    """
    cdt, dev = acc.m.dtype, acc.m.device
    zero = torch.zeros((), dtype=cdt, device=dev)
    ninf = torch.full((), _NEG_INF, dtype=cdt, device=dev)
    # Dead rows may hold anything (NaN, inf): neutral values keep them out of the collectives.
    m, s = torch.where(live, acc.m, ninf), torch.where(live, acc.s, zero)
    u = None if acc.u is None else torch.where(live, acc.u, zero)
    q = None if acc.q is None else torch.where(live, acc.q, zero)
    live2 = live.unsqueeze(-1)
    target = torch.where(acc.found & live2, acc.target, zero)
    found = (acc.found & live2).to(cdt)
    vals, idx = acc.vals, acc.idx
    if idx is not None and shard is not None:
        idx = idx + shard.start
    group = None if shard is None else shard.group
    if group is not None:
        import torch.distributed as dist

        m_r = m
        m = m_r.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        s, u = rescale_stats(m_r, s, u, m)
        if q is not None:
            q, _ = rescale_stats(2.0 * m_r, q, None, 2.0 * m)  # relative to the doubled max
        K = target.shape[1]
        cols = [s.unsqueeze(-1), target, found]
        if u is not None:
            cols.append(u.unsqueeze(-1))
        if q is not None:
            cols.append(q.unsqueeze(-1))
        packed = torch.cat(cols, dim=1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        s = packed[:, 0]
        target, found = packed[:, 1 : 1 + K], packed[:, 1 + K : 1 + 2 * K]
        col = 1 + 2 * K
        if u is not None:
            u = packed[:, col]
            col += 1
        if q is not None:
            q = packed[:, col]
        if vals is not None and idx is not None:
            world = dist.get_world_size(group)
            all_v = [torch.empty_like(vals) for _ in range(world)]
            all_i = [torch.empty_like(idx) for _ in range(world)]
            dist.all_gather(all_v, vals.contiguous(), group=group)
            dist.all_gather(all_i, idx.contiguous(), group=group)
            vals, pos = torch.topk(torch.cat(all_v, dim=1), vals.shape[1], dim=-1)
            idx = torch.cat(all_i, dim=1).gather(1, pos)
    off, ell, ent = finish_stats(m, s, u)
    off, ell = torch.where(live, off, zero), torch.where(live, ell, zero)
    nan = torch.full((), float("nan"), dtype=cdt, device=dev)
    # (x - offset) - log s, never x - lse: lse would round at large logits.
    logp = torch.where(live2, torch.where(found > 0, (target - off.unsqueeze(-1)) - ell.unsqueeze(-1), nan), zero)

    def empty() -> torch.Tensor:  # one per output: an autograd.Function must not return one tensor twice
        return logp.new_empty(0)

    entropy = torch.where(live, ent, zero) if (with_entropy and ent is not None) else empty()
    # sum pi^2 = sum exp(2 (x - lse)) = q / s^2 (0 for a row with no finite logit).
    sum_pi2 = empty() if q is None else torch.where(live & (s > 0), q / (s * s), zero)
    if vals is not None and idx is not None:
        topk_logp = torch.where(live2, (vals - off.unsqueeze(-1)) - ell.unsqueeze(-1), zero)
        topk_ids = torch.where(live2, idx, torch.zeros((), dtype=idx.dtype, device=dev))
    else:
        topk_logp, topk_ids = empty(), torch.empty(0, dtype=torch.long, device=dev)
    return logp, entropy, sum_pi2, topk_logp, topk_ids, off, ell


def _grad_block(
    x: torch.Tensor,
    d_cap: torch.Tensor | None,
    off: torch.Tensor,
    ell: torch.Tensor,
    g_sum: torch.Tensor,
    gh: torch.Tensor | None,
    mean: torch.Tensor | None,
    local_ids: torch.Tensor,
    hit: torch.Tensor,
) -> torch.Tensor:
    """``(sum_k hit_k onehot(id_k) - p (g_sum + gh (x - E_p[x]))) * cap'`` for a block ``x`` ``[n, vb]``, in place.

    ``lse = off + ell`` (:func:`_finish`); ``mean`` is ``E_p[x - off] = ell - H``, so ``x - E_p[x]``
    is formed as ``(x - off) - mean`` from relative values only. ``g_sum`` ``[n]`` already holds
    ``1/T``; ``hit`` ``[n, K]`` is ``g_k / T`` where the block holds ``id_k`` (``local_ids``,
    clamped), else 0. A ``-inf`` logit (``p = 0``) gives 0, never ``0 * -inf``.
    """
    x.sub_(off.unsqueeze(-1))  # x - offset: small at any offset, -inf stays -inf
    if gh is None:
        out = x.sub_(ell.unsqueeze(-1)).exp_().mul_(-g_sum.unsqueeze(-1))
    else:
        assert mean is not None
        coef = x.sub(mean.unsqueeze(-1)).masked_fill_(x == _NEG_INF, 0.0)
        coef.mul_(gh.unsqueeze(-1)).add_(g_sum.unsqueeze(-1))
        out = x.sub_(ell.unsqueeze(-1)).exp_().mul_(coef).neg_()
    out.scatter_add_(1, local_ids, hit)
    return out if d_cap is None else out.mul_(d_cap)


def _incoming(
    g_logp: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    live: torch.Tensor,
    K: int,
    temperature: float,
    cdt: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(g [N, K] / T, sum_k g_k / T, g_H / T)``; dead tokens take no gradient."""
    N = live.shape[0]
    zero = torch.zeros((), dtype=cdt, device=live.device)
    if g_logp is None:
        g = torch.zeros(N, K, dtype=cdt, device=live.device)
    else:
        g = torch.where(live.unsqueeze(-1), g_logp.to(cdt) / temperature, zero)
    gh = None if g_entropy is None else torch.where(live, g_entropy.to(cdt) / temperature, zero)
    return g, g.sum(dim=-1), gh


def _mark_outputs(ctx: Any, output: tuple, with_entropy: bool) -> None:
    _, entropy, sum_pi2, topk_logp, topk_ids, off, ell = output
    frozen = (sum_pi2, topk_logp, topk_ids, off, ell)
    ctx.mark_non_differentiable(*(frozen if with_entropy else (entropy, *frozen)))
    ctx.set_materialize_grads(False)


class StatsTokenLogprobs(torch.autograd.Function):
    """``(logits, ids [N, K], live) -> (logp [N, K], entropy, sum_pi2, topk_logp, topk_ids, offset, log_s)``.

    ``logits`` ``(B, T, V_local)`` in any float dtype and strides; ``logp`` and ``entropy`` are
    differentiable, the rest detached (empty where not asked). Tokens that are not ``live`` get 0
    and a zero gradient row. With a shard the columns past ``shard.n_real`` are padding.
    """

    @staticmethod
    def forward(
        logits: torch.Tensor,
        ids: torch.Tensor,
        live: torch.Tensor,
        temperature: float,
        softcap: float | None,
        with_entropy: bool,
        sum_pi2: bool,
        topk: int | None,
        chunk_rows: int,
        shard: VocabShard | None,
    ) -> tuple[torch.Tensor, ...]:
        B, T, V = logits.shape
        n_real = V if shard is None else shard.n_real
        cdt = compute_dtype(logits.dtype)
        local = ids if shard is None else ids - shard.start
        acc = _RowStats(B * T, ids.shape[1], cdt, logits.device, with_entropy, sum_pi2, topk)
        if n_real:
            for (rows,), r0, r1 in row_chunks((logits[..., :n_real],), chunk_rows):
                x, _ = scaled_logits(rows, temperature, softcap, cdt)  # [n, V_real]
                x = x.clone() if x is rows else x  # about to be overwritten in place
                acc.update(r0, r1, x, 0, local[r0:r1])
        return _finish(acc, live, shard, with_entropy)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        logits, ids, live, temperature, softcap, with_entropy, _, _, chunk_rows, shard = inputs
        _mark_outputs(ctx, output, with_entropy)
        ctx.save_for_backward(logits, ids, live, output[5], output[6], output[1])
        ctx.temperature, ctx.softcap, ctx.chunk_rows, ctx.shard = temperature, softcap, chunk_rows, shard

    @staticmethod
    def backward(ctx: Any, g_logp: Any, g_entropy: Any, *_frozen: Any) -> tuple:
        check_backward_mode("token_logprobs")
        logits, ids, live, off, ell, entropy = ctx.saved_tensors
        shard: VocabShard | None = ctx.shard
        V = logits.shape[-1]
        n_real = V if shard is None else shard.n_real
        cdt = off.dtype
        g, g_sum, gh = _incoming(g_logp, entropy_grad(g_entropy), live, ids.shape[1], ctx.temperature, cdt)
        local = ids if shard is None else ids - shard.start
        inside = (local >= 0) & (local < n_real)
        hit = torch.where(inside, g, torch.zeros((), dtype=cdt, device=g.device))
        safe = torch.where(inside, local, torch.zeros_like(local))
        nonzero = (g_sum != 0) | (hit != 0).any(dim=-1)
        if gh is not None:
            nonzero |= gh != 0
        # E_p[x - offset] = log s - H: relative, so x - E_p[x] keeps its precision at any offset.
        mean = None if gh is None else ell - entropy
        grad = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        if n_real:
            for (rows, grad_rows), r0, r1 in row_chunks((logits[..., :n_real], grad[..., :n_real]), ctx.chunk_rows):
                x, d_cap = scaled_logits(rows, ctx.temperature, ctx.softcap, cdt, with_grad=True)
                x = x.clone() if x is rows else x  # about to be overwritten in place
                blk = _grad_block(
                    x,
                    d_cap,
                    off[r0:r1],
                    ell[r0:r1],
                    g_sum[r0:r1],
                    None if gh is None else gh[r0:r1],
                    None if mean is None else mean[r0:r1],
                    safe[r0:r1],
                    hit[r0:r1],
                )
                # Rows without gradient are zeros whatever their logits hold (0 * NaN must not leak).
                blk.masked_fill_(~nonzero[r0:r1].unsqueeze(-1), 0.0)
                grad_rows.copy_(blk)
        return grad, *([None] * 9)


class StatsLinearLogprobs(torch.autograd.Function):
    """``(hidden, weight, bias, ids [N, K], live) ->`` the outputs of :class:`StatsTokenLogprobs`.

    The logits are ``cap(hidden @ weight^T + bias) / T`` formed block by block (``chunk_rows`` tokens
    by ``vocab_block`` entries, vocabulary outermost); gradients reach ``hidden``, ``weight`` and
    ``bias`` from ``logp`` and ``entropy``. Only live rows are read (masked hidden states may hold
    NaN). With a shard, ``weight`` holds the local rows and ``hidden``'s gradient is all-reduced
    over the group unless ``shard.sequence_parallel``.
    """

    @staticmethod
    def forward(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ids: torch.Tensor,
        live: torch.Tensor,
        temperature: float,
        softcap: float | None,
        with_entropy: bool,
        sum_pi2: bool,
        topk: int | None,
        chunk_rows: int,
        vocab_block: int,
        shard: VocabShard | None,
    ) -> tuple[torch.Tensor, ...]:
        B, T, _ = hidden.shape
        N, V = B * T, (weight.shape[0] if shard is None else shard.n_real)
        cdt = compute_dtype(hidden.dtype)
        dev = hidden.device
        index = _active(live)
        n = N if index is None else index.numel()
        act = ids if index is None else ids[index]
        local = act if shard is None else act - shard.start
        acc = _RowStats(n, ids.shape[1], cdt, dev, with_entropy, sum_pi2, topk)
        with torch.autocast(dev.type, enabled=False):
            # The same blocks as the single-target path (bias shifted by its largest finite entry,
            # none under a soft-cap): linear_chunked.forward_logit_blocks.
            shift = _bias_shift(bias, V, cdt, dev, shard, softcap)
            blocks = forward_logit_blocks(
                hidden,
                weight,
                _shifted(bias, shift, V, cdt),
                live,
                index,
                V,
                temperature,
                chunk_rows,
                vocab_block,
                softcap,
            )
            for v0, _v1, r0, r1, x in blocks:  # x: [rows, vb]
                acc.update(r0, r1, x, v0, local[r0:r1])
                del x
        act_live = live if index is None else torch.ones(n, dtype=torch.bool, device=dev)
        outs = _finish(acc, act_live, shard, with_entropy)
        if index is not None:
            # Outputs asked for are per token: back to all N rows (0 at dead ones); the others stay empty.
            asked = (True, with_entropy, sum_pi2, topk is not None, topk is not None, True, True)
            outs = tuple(
                torch.zeros((N, *v.shape[1:]), dtype=v.dtype, device=dev).index_copy_(0, index, v) if a else v
                for v, a in zip(outs, asked, strict=True)
            )
        return (*outs, shift)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        hidden, weight, bias, ids, live, temperature, softcap, with_entropy = inputs[:8]
        chunk_rows, vocab_block, shard = inputs[10:]
        _mark_outputs(ctx, output[:7], with_entropy)
        ctx.mark_non_differentiable(output[7])
        ctx.save_for_backward(hidden, weight, bias, ids, live, output[5], output[6], output[1], output[7])
        ctx.temperature, ctx.softcap, ctx.shard = temperature, softcap, shard
        ctx.chunk_rows, ctx.vocab_block = chunk_rows, vocab_block

    @staticmethod
    def backward(ctx: Any, g_logp: Any, g_entropy: Any, *_frozen: Any) -> tuple:
        check_backward_mode("token_logprobs_linear")
        hidden, weight, bias, ids, live, off, ell, entropy, shift = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        shard: VocabShard | None = ctx.shard
        B, T, H = hidden.shape
        N, V = B * T, (weight.shape[0] if shard is None else shard.n_real)
        cdt = off.dtype
        dev = hidden.device
        g, g_sum, gh = _incoming(g_logp, entropy_grad(g_entropy), live, ids.shape[1], ctx.temperature, cdt)
        nonzero = (g != 0).any(dim=-1) if gh is None else (g != 0).any(dim=-1) | (gh != 0)
        index = _active(nonzero)
        n = N if index is None else index.numel()
        grad_h: Any = torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev) if need_h else None
        grad_w: Any = torch.zeros(weight.shape, dtype=weight.dtype, device=dev) if need_w else None
        grad_b: Any = torch.zeros(weight.shape[0], dtype=cdt, device=dev) if need_b else None
        nones = [None] * 10
        if n == 0:
            return grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype), *nones
        pick = (lambda v: v) if index is None else (lambda v: v[index])  # noqa: E731
        zero = torch.zeros((), dtype=cdt, device=dev)
        # Rows computed without a gradient (compiled: no gather): an offset bounding their logits.
        off = torch.where(nonzero, off, idle_row_offset(ctx.softcap, ctx.temperature, cdt, dev))
        ell = torch.where(nonzero, ell, zero)
        a_ids = pick(ids if shard is None else ids - shard.start)
        a_g, a_gs, a_off, a_ell = pick(g), pick(g_sum), pick(off), pick(ell)
        a_gh = None if gh is None else pick(gh)
        # E_p[x - offset] = log s - H: relative, so x - E_p[x] keeps its precision at any offset.
        a_mu = None if gh is None else pick(ell - entropy)
        acc_h: Any = torch.zeros(n, H, dtype=cdt, device=dev) if need_h else None
        with torch.autocast(dev.type, enabled=False):
            bias_c = _shifted(bias, shift, V, cdt)
            h = _zero_dead_rows(_rows(hidden, index, cdt), nonzero, index)
            for v0 in range(0, V, ctx.vocab_block):
                v1 = min(v0 + ctx.vocab_block, V)
                w = weight[v0:v1]
                w = w if w.is_cuda else w.to(cdt)
                b = None if bias_c is None else bias_c[v0:v1]
                acc_w: Any = torch.zeros(v1 - v0, H, dtype=cdt, device=dev) if need_w else None
                for r0 in range(0, n, ctx.chunk_rows):
                    r1 = min(r0 + ctx.chunk_rows, n)
                    x = _block_logits(h[r0:r1], w, b, ctx.temperature, cdt, ctx.softcap)  # [n, vb]
                    d_cap = None if ctx.softcap is None else cap_derivative(x, ctx.temperature, ctx.softcap)
                    local = a_ids[r0:r1] - v0
                    inside = (local >= 0) & (local < v1 - v0)
                    G = _grad_block(
                        x,
                        d_cap,
                        a_off[r0:r1],
                        a_ell[r0:r1],
                        a_gs[r0:r1],
                        None if a_gh is None else a_gh[r0:r1],
                        None if a_mu is None else a_mu[r0:r1],
                        local.clamp(0, v1 - v0 - 1),
                        torch.where(inside, a_g[r0:r1], zero),
                    )
                    if need_h:
                        _addmm(acc_h[r0:r1], G, w, cdt)
                    if need_w:
                        _addmm(acc_w, G.t(), h[r0:r1], cdt)
                    if need_b:
                        grad_b[v0:v1] += G.sum(dim=0)
                    del x, G, d_cap
                if need_w:
                    grad_w[v0:v1] = acc_w
        if need_h and shard is not None and not shard.sequence_parallel:
            all_reduce_sum(acc_h, shard)
        if need_h:
            flat = grad_h.view(N, H)
            if index is None:
                flat.copy_(acc_h)
            else:
                flat.index_copy_(0, index, acc_h.to(hidden.dtype))
        return grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype), *nones


def _unpack(outs: tuple[torch.Tensor, ...], with_entropy: bool, sum_pi2: bool, topk: int | None) -> TokenStats:
    logp, entropy, spi2, topk_logp, topk_ids = outs[:5]
    return TokenStats(
        logp,
        entropy if with_entropy else None,
        spi2 if sum_pi2 else None,
        topk_logp if topk is not None else None,
        topk_ids if topk is not None else None,
    )


def token_stats(
    logits: torch.Tensor,
    ids: torch.Tensor,
    live: torch.Tensor,
    *,
    temperature: float,
    with_entropy: bool,
    sum_pi2: bool,
    topk: int | None,
    softcap: float | None = None,
    shard: VocabShard | None = None,
    chunk_rows: int | None = None,
) -> TokenStats:
    """Flat statistics of ``(B, T, V_local)`` logits: ``ids`` ``(N, K)`` global, ``live`` ``(N,)``.

    Returns a :class:`TokenStats` of flat tensors: ``logprobs`` ``(N, K)``, ``entropy`` and
    ``sum_pi_squared`` ``(N,)``, top-k ``(N, topk)``. Every rank of ``shard.group`` calls with the
    same ``ids`` and ``live``.
    """
    outs = StatsTokenLogprobs.apply(
        logits,
        ids,
        live,
        float(temperature),
        None if softcap is None else float(softcap),
        bool(with_entropy),
        bool(sum_pi2),
        topk,
        int(chunk_rows or default_chunk_rows(logits.shape[-1])),
        shard,
    )
    return _unpack(outs, with_entropy, sum_pi2, topk)


def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    live: torch.Tensor,
    *,
    temperature: float,
    with_entropy: bool,
    sum_pi2: bool,
    topk: int | None,
    softcap: float | None = None,
    shard: VocabShard | None = None,
    chunk_rows: int | None = None,
    vocab_block: int | None = None,
) -> TokenStats:
    """:func:`token_stats` from ``(B, T, H)`` hidden states and the ``(V_local, H)`` head (and bias)."""
    B, T, _ = hidden.shape
    d_rows, d_vb = default_blocks(B * T, weight.shape[0], hidden.device)
    outs = StatsLinearLogprobs.apply(
        hidden,
        weight,
        bias,
        ids,
        live,
        float(temperature),
        None if softcap is None else float(softcap),
        bool(with_entropy),
        bool(sum_pi2),
        topk,
        int(chunk_rows or d_rows),
        int(vocab_block or d_vb),
        shard,
    )
    return _unpack(outs, with_entropy, sum_pi2, topk)
