"""Token log-probs from hidden states and the ``lm_head``, in blocks: the logits never exist whole.

:class:`LinearTokenLogprobs` maps hidden states ``h`` ``(B, T, H)``, the ``lm_head`` weight ``W``
``(V, H)`` and an optional bias ``b`` ``(V,)`` to ``(N,)`` target log-probs under
``softmax((h W^T + b) / T)``. The work runs over blocks of ``chunk_rows`` tokens by
``vocab_block`` vocabulary entries, vocabulary outermost (each block of ``W`` is read, and for
half types up-cast, once per pass):

- forward: each block of logits, accumulated in float32 (float64 for float64 inputs), updates
  per-token running statistics relative to the running max (``m``, ``s = sum exp(x - m)``,
  ``u = sum exp(x - m) (x - m)``: :func:`~rspo_kernels.loss.vocab_parallel.block_stats_update`)
  and yields the target logits that fall inside it; then it is freed. Only ``(N,)`` vectors are
  saved: ``lse`` as two parts (offset ``m`` and ``log s``) and the entropy ``H = log s - u / s``,
  so no absolute logit enters a sum. The bias enters shifted by its largest finite entry (a
  per-row constant: the softmax ignores it), so an offset carried by the bias does not round the
  logits either (not under a soft-cap, which does not commute with the shift: :func:`_bias_shift`).
  With a soft-cap every block is capped before the temperature, and the backward multiplies its
  gradient by the cap's derivative (:mod:`rspo_kernels.loss.softcap`).
- backward: each block is recomputed, turned into ``G = g (onehot - softmax) / T`` in place
  (``g = dL/dlogp``, grad_output included; with an entropy gradient ``g_H``, minus
  ``g_H p (x - E_p[x]) / T``, with ``x - E_p[x]`` formed as ``(x - m) - (log s - H)``), and
  contributes ``G W_blk`` to ``dh``, ``G^T h`` to ``dW[blk]`` and ``G.sum(0)`` to ``db[blk]``
  (docs/math.md, "The loss").
- with a :class:`~rspo_kernels.loss.vocab_parallel.VocabShard` the weight holds a slice of the
  vocabulary: the per-rank statistics are merged by two all-reduces after the forward loop, the
  backward runs on the global statistics and all-reduces ``dh`` (docs/tensor-parallel.md).

Only tokens that matter are touched: the forward reads the rows of live tokens, the backward those
with ``g != 0``, gathered once into a compact ``(n, H)`` matrix, so masked rows (padding, NaN
hidden states) never enter a matmul and get an exact zero gradient. Gathering costs one host
synchronisation per pass on a GPU.

When this route serves: :func:`rspo_kernels.rspo_linear_loss` of a token-local policy loss
(:func:`rspo_kernels.loss.policy.is_token_local`) in eager autograd forms its gradients during the
forward instead (:mod:`rspo_kernels.loss.linear_fused`: three ``N x V x H`` matmuls, not four).
This recomputing route remains for what cannot: :func:`rspo_kernels.token_logprobs_linear` (its
caller's loss is unknown), losses that are not token-local (sequence-level ratios, batch-level
token selection), a vocabulary-parallel head (``tp_group``: the global log-sum-exp is known only
after the forward's all-reduces), ``torch.func`` transforms and ``torch.compile`` tracing. It keeps
no ``(V, H)`` gradient buffer between forward and backward, and its backward multiplies by the
real grad_output (loss scaling exact, ``retain_graph`` repeats, ``no_grad`` does no gradient work).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from rspo_kernels.loss.chunked import check_backward_mode, entropy_grad
from rspo_kernels.loss.layout import compute_dtype
from rspo_kernels.loss.softcap import cap_, cap_derivative
from rspo_kernels.loss.vocab_parallel import (
    VocabShard,
    all_reduce_max_,
    all_reduce_sum,
    block_stats_update,
    combine_shards,
    finish_stats,
)

__all__ = ["DEFAULT_VOCAB_BLOCK", "LinearTokenLogprobs", "default_blocks", "linear_token_logprobs"]

DEFAULT_VOCAB_BLOCK = 4096
# Bytes of one float32 logits block: with the softmax computed in place, a block, its matmul output
# and the up-cast weight block are the whole working set. 512 x 4096 on a CPU (measured to fit the
# memory target at V = 32000; 2048 x 4096 does not); a GPU affords larger blocks.
_BLOCK_BYTES = {"cpu": 8 << 20}
_BLOCK_BYTES_DEFAULT = 256 << 20


def default_blocks(n_tokens: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """``(chunk_rows, vocab_block)`` for ``n_tokens`` rows and a vocabulary of ``vocab``.

    A block of logits is ``chunk_rows x vocab_block`` float32 values, about 8 MiB on a CPU
    (512 x 4096) and 256 MiB on a GPU. The vocabulary is split into equal blocks of at most
    :data:`DEFAULT_VOCAB_BLOCK`, so the last block is not a sliver.
    """
    n_blocks = max(1, -(-vocab // DEFAULT_VOCAB_BLOCK))
    vocab_block = max(1, -(-vocab // n_blocks))
    budget = _BLOCK_BYTES.get(device.type, _BLOCK_BYTES_DEFAULT)
    rows = budget // (4 * vocab_block)
    rows = rows - rows % 64 if rows >= 64 else max(rows, 1)  # whole multiples of 64 suit the matmul kernels
    return min(max(n_tokens, 1), rows), vocab_block


def _mm(a: torch.Tensor, b: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """``a @ b`` in the compute dtype, products accumulated in it.

    Half inputs on a GPU use the half tensor cores with a float32 output; elsewhere both operands
    are up-cast (on a CPU a half matmul would round its output to half).
    """
    if a.dtype == cdt and b.dtype == cdt:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a.to(b.dtype), b, out_dtype=cdt)
        except (RuntimeError, TypeError):  # torch without mm(out_dtype=): up-cast instead
            pass
    return a.to(cdt) @ b.to(cdt)


def _addmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cdt: torch.dtype) -> None:
    """``acc += a @ b``, in place when the operands already have the compute dtype (no temporary)."""
    if a.dtype == cdt and b.dtype == cdt:
        acc.addmm_(a, b)
    else:
        acc += _mm(a, b, cdt)


def _rows(hidden: torch.Tensor, index: torch.Tensor | None, cdt: torch.dtype) -> torch.Tensor:
    """The ``(n, H)`` rows ``index`` of ``(B, T, H)`` hidden states (all rows when None), a view if possible."""
    B, T, H = hidden.shape
    if index is None:
        flat = hidden.reshape(B * T, H)
    else:
        # Advanced indexing reads only the selected rows, even of a strided hidden[:, :-1] view.
        flat = hidden[index // T, index % T]
    # Half types stay half on a GPU (the matmuls take them with a float32 output).
    return flat if flat.is_cuda and flat.dtype in (torch.float16, torch.bfloat16) else flat.to(cdt)


def _block_logits(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    temperature: float,
    cdt: torch.dtype,
    softcap: float | None = None,
) -> torch.Tensor:
    """``cap(h w^T + b) / T``, ``[n, vb]`` in the compute dtype (``cap``: :mod:`rspo_kernels.loss.softcap`)."""
    x = _mm(h, w.t(), cdt)
    if b is not None:
        x.add_(b.to(cdt))
    if softcap is not None:
        cap_(x, softcap)
    if temperature != 1.0:
        x.div_(temperature)
    return x


def _bias_shift(
    bias: torch.Tensor | None,
    n_real: int,
    cdt: torch.dtype,
    dev: torch.device,
    shard: VocabShard | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``c``, ``(1,)`` in the compute dtype: the largest finite bias entry of the real rows (0 if none).

    Empty without a bias; 0 with a ``softcap``.

    The blocks use ``bias - c`` (:func:`_block_logits`).

    Softmax, log-probs and entropy ignore a per-row constant, but ``h W^T + b`` rounds each logit
    to the unit roundoff of ``|b|`` (5e-4 at 1e4): shifted, a constant offset carried by the bias
    costs nothing. Under tensor parallelism ``c`` is the group's maximum (one scalar all-reduce),
    so every rank shifts its slice by the same constant.

    With a soft-cap there is no shift: the cap acts on the raw logits, and
    ``c tanh((z - shift) / c)`` is not ``c tanh(z / c)`` minus a constant, so shifting the bias would
    change the capped logits' differences, hence the softmax (and a capped logit is bounded by ``c``
    anyway, so an offset carried by the bias saturates instead of rounding the softmax away).
    """
    if bias is None:
        return torch.zeros(0, dtype=cdt, device=dev)
    if softcap is not None:
        return torch.zeros(1, dtype=cdt, device=dev)
    b = bias[:n_real].to(cdt)
    ninf = torch.full((), float("-inf"), dtype=cdt, device=b.device)
    c = torch.where(torch.isfinite(b), b, ninf).amax().reshape(1) if n_real else ninf.reshape(1)
    all_reduce_max_(c, shard)
    return torch.where(torch.isfinite(c), c, torch.zeros((), dtype=cdt, device=b.device))


def _shifted(bias: torch.Tensor | None, shift: torch.Tensor, n_real: int, cdt: torch.dtype) -> torch.Tensor | None:
    """``bias - c`` over the real rows in the compute dtype (b and c share their leading digits: exact)."""
    return None if bias is None else bias[:n_real].to(cdt) - shift


def idle_row_offset(softcap: float | None, temperature: float, cdt: torch.dtype, dev: torch.device) -> torch.Tensor:
    """The exp offset for rows the backward computes without a gradient (compiled: no gather).

    Their hidden states are zeroed, so their logits are the shifted bias (``<= 0``,
    :func:`_bias_shift`), or under a soft-cap ``c`` the capped bias (``<= c / T``): relative to that
    bound, with ``log s = 0``, exp() stays finite there (``inf * 0`` would be NaN).
    """
    return torch.full((), 0.0 if softcap is None else softcap / temperature, dtype=cdt, device=dev)


def _active(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices of the true entries of ``mask``; None when every entry is true (no gather needed).

    Also None while ``torch.compile`` traces: a gather's size depends on the data, which
    ``fullgraph=True`` cannot follow, so every row is computed and the callers zero the others.
    """
    if torch.compiler.is_compiling() or mask.numel() == 0 or bool(mask.all()):
        return None
    return torch.nonzero(mask).squeeze(-1)


def _zero_dead_rows(h: torch.Tensor, keep: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Without a gather (``index`` None) under ``torch.compile``, rows outside ``keep`` become 0.

    A masked row may hold NaN; zeroed, it cannot reach a log-sum-exp or ``G^T h``.
    """
    if index is None and torch.compiler.is_compiling():
        return torch.where(keep.unsqueeze(-1), h, torch.zeros((), dtype=h.dtype, device=h.device))
    return h


def forward_logit_blocks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias_c: torch.Tensor | None,
    live: torch.Tensor,
    index: torch.Tensor | None,
    n_real: int,
    temperature: float,
    chunk_rows: int,
    vocab_block: int,
    softcap: float | None,
) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
    """The forward passes' blocks of logits: ``(v0, v1, r0, r1, x)``, vocabulary outermost.

    ``x`` is ``cap(h W^T + bias_c) / T`` at rows ``r0:r1`` of the active rows (``index``; all when
    None) and columns ``v0:v1``, in the compute dtype. ``bias_c`` is the bias already shifted by
    :func:`_bias_shift` (:func:`_shifted`). Each weight block is read (and, on a CPU, up-cast) once;
    dead rows under ``torch.compile`` are zeros (:func:`_zero_dead_rows`). Run it inside
    ``autocast(enabled=False)``; the caller frees ``x`` before the next block.
    """
    cdt = compute_dtype(hidden.dtype)
    n = hidden.shape[0] * hidden.shape[1] if index is None else index.numel()
    h = _rows(hidden, index, cdt) if n else hidden.new_empty(0, hidden.shape[-1], dtype=cdt)
    h = _zero_dead_rows(h, live, index)
    for v0 in range(0, n_real, vocab_block):
        v1 = min(v0 + vocab_block, n_real)
        w = weight[v0:v1]
        w = w if w.is_cuda else w.to(cdt)
        b = None if bias_c is None else bias_c[v0:v1]
        for r0 in range(0, n, chunk_rows):
            r1 = min(r0 + chunk_rows, n)
            yield v0, v1, r0, r1, _block_logits(h[r0:r1], w, b, temperature, cdt, softcap)


class LinearTokenLogprobs(torch.autograd.Function):
    """``(hidden, weight, bias, ids, live) -> (logp, offset, log_s, entropy, c)``; ``logp``, ``entropy`` differentiable.

    ``lse = offset + log_s`` per token; ``c`` is the bias shift (:func:`_bias_shift`).

    Outputs are flat ``(N,)`` in the compute dtype (float32; float64 for float64 inputs). Tokens
    that are not ``live`` get 0 everywhere and zero gradient rows, whatever their hidden states
    hold; they add nothing to the weight's or bias's gradient. ``entropy`` is empty unless asked
    for. A live id outside ``[0, V)`` gives a NaN log-prob.
    """

    @staticmethod
    def forward(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ids: torch.Tensor,
        live: torch.Tensor,
        temperature: float,
        with_entropy: bool,
        chunk_rows: int,
        vocab_block: int,
        shard: VocabShard | None = None,
        softcap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = hidden.shape
        # A vocabulary shard: only its real rows enter the softmax, ids are global.
        N, V = B * T, (weight.shape[0] if shard is None else shard.n_real)
        cdt = compute_dtype(hidden.dtype)
        dev = hidden.device
        index = _active(live)
        n = N if index is None else index.numel()
        act_ids = ids if index is None else ids[index]
        if shard is not None:
            act_ids = act_ids - shard.start
        valid = (act_ids >= 0) & (act_ids < V)
        # Running per-row statistics relative to the running max (block_stats_update): never the
        # absolute logits, so a constant offset costs no precision and a -inf block adds 0.
        m = torch.full((n,), float("-inf"), dtype=cdt, device=dev)
        s = torch.zeros(n, dtype=cdt, device=dev)
        u = torch.zeros(n, dtype=cdt, device=dev) if with_entropy else None
        target = torch.zeros(n, dtype=cdt, device=dev)
        with torch.autocast(dev.type, enabled=False):
            shift = _bias_shift(bias, V, cdt, dev, shard, softcap)
            bias_c = _shifted(bias, shift, V, cdt)
            blocks = forward_logit_blocks(
                hidden, weight, bias_c, live, index, V, temperature, chunk_rows, vocab_block, softcap
            )
            for v0, v1, r0, r1, x in blocks:  # x: [rows, vb]
                local = act_ids[r0:r1] - v0
                inside = (local >= 0) & (local < v1 - v0)
                hit = x.gather(1, local.clamp(0, v1 - v0 - 1).unsqueeze(-1)).squeeze(-1)
                target[r0:r1] = torch.where(inside, hit, target[r0:r1])
                c_m, c_s, c_u = block_stats_update(m[r0:r1], s[r0:r1], None if u is None else u[r0:r1], x)
                m[r0:r1], s[r0:r1] = c_m, c_s
                if u is not None and c_u is not None:
                    u[r0:r1] = c_u
                del x
        zero = torch.zeros((), dtype=cdt, device=dev)
        if shard is not None:
            m, s, u, target, found = combine_shards(m, s, u, torch.where(valid, target, zero), valid.to(cdt), shard)
            valid = found > 0
        off, ell, ent = finish_stats(m, s, u)
        # (target - offset) - log s: lse = offset + log s is never rounded as one number.
        logp_act = torch.where(valid, (target - off) - ell, torch.full((), float("nan"), dtype=cdt, device=dev))
        if index is None:  # every row computed (all live, or compiled): dead ones read 0
            logp_act, off, ell = (torch.where(live, v, zero) for v in (logp_act, off, ell))
            ent = None if ent is None else torch.where(live, ent, zero)

        def scatter(v: torch.Tensor) -> torch.Tensor:
            if index is None:
                return v
            return torch.zeros(N, dtype=cdt, device=dev).index_copy_(0, index, v)

        entropy = scatter(ent) if ent is not None else off.new_empty(0)
        return scatter(logp_act), scatter(off), scatter(ell), entropy, shift

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        hidden, weight, bias, ids, live, temperature, with_entropy, chunk_rows, vocab_block, shard = inputs[:10]
        softcap = inputs[10] if len(inputs) > 10 else None  # a caller that predates the cap passes 10
        ctx.shard = shard
        ctx.softcap = softcap
        _, off, ell, entropy, shift = output
        ctx.mark_non_differentiable(*((off, ell, shift) if with_entropy else (off, ell, entropy, shift)))
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work for it
        ctx.save_for_backward(hidden, weight, bias, ids, live, off, ell, entropy, shift)
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        ctx.vocab_block = vocab_block

    @staticmethod
    def backward(
        ctx: Any, g_logp: torch.Tensor | None, _g_off: Any, _g_ell: Any, g_entropy: torch.Tensor | None, _g_c: Any
    ) -> tuple:
        check_backward_mode("rspo_linear_loss")
        hidden, weight, bias, ids, live, off, ell, entropy, shift = ctx.saved_tensors
        g_entropy = entropy_grad(g_entropy)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        shard: VocabShard | None = ctx.shard
        B, T, H = hidden.shape
        N, V = B * T, (weight.shape[0] if shard is None else shard.n_real)
        cdt = off.dtype
        dev = hidden.device
        temperature = ctx.temperature
        zero = torch.zeros((), dtype=cdt, device=dev)
        # g / T: the gradient with respect to the logits before the temperature. Dead tokens take
        # none, whatever reaches their constant 0 log-prob; a NaN g at a live token stays NaN.
        g = zero.expand(N) if g_logp is None else torch.where(live, g_logp.to(cdt) / temperature, zero)
        # The entropy's share, dH/dx = -p (x - E_p[x]), from the saved relative statistics.
        gh = None if g_entropy is None else torch.where(live, g_entropy.to(cdt) / temperature, zero)
        # Rows with any gradient: a clipped token (g = 0) still has its entropy's (gh != 0).
        needed = g != 0 if gh is None else (g != 0) | (gh != 0)
        index = _active(needed)
        n = N if index is None else index.numel()
        # Optional buffers, each present exactly when its gradient is needed (Any: mypy cannot see that).
        grad_h: Any = None
        grad_w: Any = None
        grad_b: Any = None
        if need_h:
            grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev)
        if need_w:
            grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=dev)
        if need_b:
            grad_b = torch.zeros(weight.shape[0], dtype=cdt, device=dev)
        if n == 0:
            return grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype), *([None] * 8)
        act = (lambda v: v) if index is None else (lambda v: v[index])  # noqa: E731
        # Rows computed without a gradient (compiled: no gather): an offset bounding their logits.
        bound = idle_row_offset(ctx.softcap, temperature, cdt, dev)
        off, ell = torch.where(needed, off, bound), torch.where(needed, ell, zero)
        a_ids, a_off, a_g = act(ids if shard is None else ids - shard.start), act(off), act(g)
        # p = exp(x - offset) / s: 1 / s per row folded into the coefficients (one pass fewer).
        a_inv_s = torch.exp(-act(ell))
        a_gh = None if gh is None else act(gh)
        # E_p[x - offset] = log s - H: both relative, so x - E_p[x] keeps its precision at any offset.
        a_mu: Any = None if gh is None else act(ell - entropy)
        # Accumulate dh in the compute dtype: directly into the result when it already is one.
        direct_h = need_h and index is None and hidden.dtype == cdt and grad_h.is_contiguous()
        acc_h: Any = grad_h.view(N, H) if direct_h else (torch.zeros(n, H, dtype=cdt, device=dev) if need_h else None)
        with torch.autocast(dev.type, enabled=False):
            bias_c = _shifted(bias, shift, V, cdt)
            h = _zero_dead_rows(_rows(hidden, index, cdt), needed, index)
            for v0 in range(0, V, ctx.vocab_block):
                v1 = min(v0 + ctx.vocab_block, V)
                w = weight[v0:v1]
                w = w if w.is_cuda else w.to(cdt)
                b = None if bias_c is None else bias_c[v0:v1]
                acc_w: Any = None
                # Accumulate into grad_w itself when it has the compute dtype; torch.func's wrapped
                # tensors have no data pointer to compare, hence the dtype test.
                w_direct = weight.dtype == cdt
                if need_w:
                    acc_w = grad_w[v0:v1] if w_direct else torch.zeros(v1 - v0, H, dtype=cdt, device=dev)
                for r0 in range(0, n, ctx.chunk_rows):
                    r1 = min(r0 + ctx.chunk_rows, n)
                    c_g = a_g[r0:r1]
                    x = _block_logits(h[r0:r1], w, b, temperature, cdt, ctx.softcap)  # [n, vb]
                    # The cap's chain-rule factor, read off the capped, scaled x (cap_derivative's
                    # contract) before x is shifted by the offset and becomes G in place.
                    d_cap = None if ctx.softcap is None else cap_derivative(x, temperature, ctx.softcap)
                    c_inv_s = a_inv_s[r0:r1]
                    x.sub_(a_off[r0:r1].unsqueeze(-1))  # x - offset: small, -inf stays -inf
                    if a_gh is None:
                        # G = g (onehot - softmax), in place.
                        x.exp_().mul_((-c_g * c_inv_s).unsqueeze(-1))
                    else:
                        # G = g onehot - p (g + g_H (x - E_p[x])); a -inf logit (p = 0) gives 0.
                        coef = x.sub(a_mu[r0:r1].unsqueeze(-1)).masked_fill_(x == float("-inf"), 0.0)
                        coef.mul_((a_gh[r0:r1] * c_inv_s).unsqueeze(-1)).add_((c_g * c_inv_s).unsqueeze(-1))
                        x.exp_().mul_(coef).neg_()
                        del coef
                    local = a_ids[r0:r1] - v0
                    inside = (local >= 0) & (local < v1 - v0)
                    x.scatter_add_(
                        1,
                        local.clamp(0, v1 - v0 - 1).unsqueeze(-1),
                        torch.where(inside, c_g, torch.zeros((), dtype=cdt, device=dev)).unsqueeze(-1),
                    )
                    if d_cap is not None:
                        x.mul_(d_cap)
                        del d_cap
                    if need_h:
                        _addmm(acc_h[r0:r1], x, w, cdt)
                    if need_w:
                        _addmm(acc_w, x.t(), h[r0:r1], cdt)
                    if need_b:
                        grad_b[v0:v1] += x.sum(dim=0)
                    del x
                if need_w and not w_direct:
                    grad_w[v0:v1] = acc_w  # one rounding to the weight's dtype per entry
        if need_h and shard is not None and not shard.sequence_parallel:
            # Each rank holds dh's share of its vocabulary slice: sum them (in the compute dtype).
            all_reduce_sum(acc_h, shard)
        if need_h and not direct_h:
            flat = grad_h.view(N, H)
            if index is None:
                flat.copy_(acc_h)
            else:
                flat.index_copy_(0, index, acc_h.to(hidden.dtype))
        return grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype), *([None] * 8)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    live: torch.Tensor,
    *,
    temperature: float,
    with_entropy: bool,
    chunk_rows: int | None = None,
    vocab_block: int | None = None,
    shard: VocabShard | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocked log-probs of ``ids`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Parameters
    ----------
    hidden : torch.Tensor
        ``(B, T, H)``, any float dtype and strides (validated inputs; see :func:`rspo_linear_loss`).
    weight : torch.Tensor
        ``(V, H)``, the dtype of ``hidden``.
    bias : torch.Tensor or None
        ``(V,)``.
    ids, live : torch.Tensor
        ``(N,)`` int64 target ids (read only where ``live``) and bool live tokens, ``N = B * T``.
    temperature : float
        Divides the logits.
    with_entropy : bool
        Also compute the entropies (differentiable too).
    chunk_rows, vocab_block : int, optional
        Block shape; :func:`default_blocks` when absent.
    shard : VocabShard, optional
        ``weight`` holds a slice of a (possibly padded) vocabulary; ``ids`` are global
        (:mod:`rspo_kernels.loss.vocab_parallel`). Every rank of ``shard.group`` must call with the
        same ``hidden``, ``ids`` and ``live``.
    softcap : float, optional
        Final-logit soft-capping ``z -> c * tanh(z / c)`` before the temperature; the backward
        multiplies each block's gradient by ``1 - tanh(z / c)^2``.

    Returns
    -------
    logp : torch.Tensor
        ``(N,)`` float32 (float64 for float64 inputs), differentiable in ``hidden``, ``weight`` and
        ``bias``; 0 where not ``live``.
    entropy : torch.Tensor or None
        ``(N,)`` entropies when asked.
    """
    B, T, _ = hidden.shape
    d_rows, d_vb = default_blocks(B * T, weight.shape[0], hidden.device)
    logp, _, _, entropy, _ = LinearTokenLogprobs.apply(
        hidden,
        weight,
        bias,
        ids,
        live,
        float(temperature),
        bool(with_entropy),
        int(chunk_rows or d_rows),
        int(vocab_block or d_vb),
        shard,
        None if softcap is None else float(softcap),
    )
    return logp, (entropy if with_entropy else None)
