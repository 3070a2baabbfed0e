"""The token-local policy loss from hidden states and the ``lm_head`` in one pass: three matmuls, not four.

:class:`LinearFusedLoss` maps hidden states ``h`` ``(B, T, H)``, the ``lm_head`` weight ``W``
``(V, H)`` and an optional bias ``b`` ``(V,)`` to the aggregated policy loss, and forms its
gradients during the forward. It serves every loss that is a sum over tokens
(:func:`rspo_kernels.loss.policy.is_token_local`): each token's ``g = dL/dlogp`` and
``g_H = dL/dentropy`` are known as soon as its log-prob and entropy are
(:func:`rspo_kernels.loss.policy.token_grads`), so the logits' gradient of a block of rows can be
formed while that block's logits are still alive:

- the live tokens are split into row blocks of ``chunk_rows`` rows, small enough that the whole
  ``(rows, V)`` logits of one block fit the memory budget (about 32 MiB of float32 on a CPU, 256 MiB
  on a GPU: :func:`fused_rows`);
- for each block: ``x = (h W^T + b) / T`` (one matmul, in the compute dtype), its running maximum
  ``m``, ``s = sum exp(x - m)``, ``u = sum exp(x - m)(x - m)``, the target logit; then
  ``lse = m + log s``, ``logp = x_id - lse``, ``H = log s - u / s`` (relative to ``m``, so a constant
  offset of the logits costs no precision, and a ``-inf`` logit adds nothing, never NaN);
- ``(g, g_H)`` of the block's tokens from the policy-loss registry, then in place
  ``G = (g (onehot - p) - g_H p ((x - lse) + H)) / T`` and ``dh[rows] = G W`` (second matmul, written
  straight into the full-size gradient of ``h``: no compact copy of the live rows),
  ``dW += G^T h`` (third matmul, in place), ``db += sum G``.

The order of the matmuls depends on the device (``_SCHEDULES``). On a GPU, one block at a time
(:func:`_one_block_at_a_time`). On a CPU, where each matmul over a thin block re-reads the whole
head, one tile of ``W`` at a time serves two blocks (:func:`_cpu_pipeline`): block ``i``'s
``dh`` and ``dW`` products and block ``i + 1``'s logits, which overwrite block ``i``'s ``G`` tile
by tile in a single transposed ``(V, rows)`` buffer. Both orders give the same result to rounding.

The forward saves the three gradients; backward only multiplies them by ``grad_output`` (in place
unless the graph is retained), so loss scaling is exact, ``retain_graph`` reuses them, and nothing
is recomputed. Half inputs keep ``dh``, ``dW``, ``db`` in float32 until backward, which rounds each
entry once after scaling (loss scaling keeps what float16 would flush); that costs a float32 copy of
the weight's gradient. Rows of dead tokens (padding, NaN hidden states) are never read and get an
exact zero gradient.

Compared with :class:`~rspo_kernels.loss.linear_chunked.LinearTokenLogprobs` (log-probs first,
logits recomputed in backward), one ``N x V x H`` matmul of four is saved; the price is that the
``(V, H)`` gradient exists from the forward on, which is the usual case anyway (the loss is the
last node of the graph), and that the loss algebra must be token-local. Everything else takes the
two-pass route (:func:`use_one_pass`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rspo_kernels.loss.chunked import check_backward_mode
from rspo_kernels.loss.layout import TokenBatch, compute_dtype
from rspo_kernels.loss.linear_chunked import _mm
from rspo_kernels.loss.options import LossOptions
from rspo_kernels.loss.policy import is_token_local, policy_loss, token_grads

__all__ = ["LinearFusedLoss", "fused_linear_loss", "fused_rows", "use_one_pass"]

# Bytes of one row block's float32 logits over the whole vocabulary: with the softmax and the
# gradient formed in place, that block is the working set (besides vocab-sliced temporaries).
# On a CPU, 32 MiB (256 rows at V = 32000): each matmul over a block streams the whole head, so
# thinner blocks cost time (2026-12-07, 2 cores: 64-row blocks 7.8 MiB, 1.18-1.29x unfused eager's
# time; 256 rows 0.94-1.05x; 512 rows 0.92-1.01x for 34 MiB more; `benchmarks/linear_memory.py
# --frontier` measures it, docs/performance.md has the figure).
_ROW_BLOCK_BYTES = {"cpu": 32 << 20}
_ROW_BLOCK_BYTES_DEFAULT = 256 << 20
# Vocabulary columns per elementwise temporary (exp, the entropy's product).
_SLICE = 1024
# Bytes of float32 head per vocabulary tile of the CPU schedule (_cpu_pipeline): a tile of W and the
# matching tile of its gradient stay in a 32 MiB last-level cache together.
_TILE_BYTES = 8 << 20


def fused_rows(vocab: int, device: torch.device) -> int:
    """Rows per block such that one block's ``(rows, vocab)`` float32 logits fit the budget.

    About 32 MiB on a CPU (256 rows at V = 32000) and 256 MiB on a GPU; a multiple of 16 rows when
    at least 16 fit (whole tiles for the matmul kernels), at least 1.
    """
    budget = _ROW_BLOCK_BYTES.get(device.type, _ROW_BLOCK_BYTES_DEFAULT)
    rows = budget // (4 * max(vocab, 1))
    return rows - rows % 16 if rows >= 16 else max(rows, 1)


def _keep_graph() -> bool:
    """Whether the running backward retains the graph (the saved gradients must then stay intact)."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):  # unknown: assume retained (copy rather than scale in place)
        return True


def use_one_pass(options: LossOptions, tensors: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether :class:`LinearFusedLoss` serves this call; otherwise the two-pass route does.

    It needs a token-local loss, gradients to form (grad mode on and an input that requires one),
    and plain eager autograd: ``torch.func`` transforms and ``torch.compile`` tracing take the
    two-pass route, whose Function they support.
    """
    if not is_token_local(options) or not torch.is_grad_enabled():
        return False
    if not any(t is not None and t.requires_grad for t in tensors):
        return False
    if torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None:
        return False
    return True


def _logits(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    cdt: torch.dtype,
) -> torch.Tensor:
    """``(h W^T + b) / T`` over the whole vocabulary, ``(rows, V)`` in the compute dtype."""
    V = weight.shape[0]
    if weight.dtype == cdt or weight.is_cuda:
        x = _mm(h, weight.t(), cdt)
    else:  # half weights on a CPU: up-cast a slice at a time (a CPU half matmul rounds its output)
        x = torch.empty(h.shape[0], V, dtype=cdt, device=h.device)
        hc = h.to(cdt)
        for v0 in range(0, V, _SLICE):
            v1 = min(v0 + _SLICE, V)
            torch.mm(hc, weight[v0:v1].to(cdt).t(), out=x[:, v0:v1])
    if bias is not None:
        x.add_(bias.to(cdt))
    if temperature != 1.0:
        x.div_(temperature)
    return x


def _grad_times_weight(G: torch.Tensor, weight: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """``G W`` ``(rows, H)`` in the compute dtype."""
    if weight.dtype == cdt:
        return G @ weight
    if weight.is_cuda:
        return _mm(G, weight, cdt)
    acc = torch.zeros(G.shape[0], weight.shape[1], dtype=cdt, device=G.device)
    for v0 in range(0, weight.shape[0], _SLICE):
        v1 = min(v0 + _SLICE, weight.shape[0])
        acc.addmm_(G[:, v0:v1], weight[v0:v1].to(cdt))
    return acc


def _slice_scratch(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One ``(rows, _SLICE)`` temporary with the strides of ``x``'s slices, reused for every slice.

    Allocated once per block rather than once per slice: each allocation of that size is a fresh
    ``mmap`` under a small ``MALLOC_MMAP_THRESHOLD_``, with its page faults.
    """
    width = min(_SLICE, x.shape[1])
    return torch.empty_like(x[:, :width], dtype=dtype)


def _relative_sums(x: torch.Tensor, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``s = sum exp(x)`` and ``u = sum exp(x) x`` per row of ``x`` (logits minus their row maximum).

    Vocabulary slices at a time, so the temporaries stay small. ``exp(-inf) * lowest = 0``: a
    ``-inf`` logit adds nothing to ``u``, never NaN.
    """
    s = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    u = torch.zeros_like(s) if with_entropy else None
    lowest = torch.finfo(x.dtype).min
    e_buf = _slice_scratch(x)
    c_buf = _slice_scratch(x) if with_entropy else None
    for v0 in range(0, x.shape[1], _SLICE):
        sl = x[:, v0 : v0 + _SLICE]
        w = sl.shape[1]
        e = torch.exp(sl, out=e_buf[:, :w])
        s += e.sum(dim=-1)
        if u is not None:
            assert c_buf is not None
            u += e.mul_(torch.clamp(sl, min=lowest, out=c_buf[:, :w])).sum(dim=-1)
    return s, u


def _entropy_logit_grad_(x: torch.Tensor, g: torch.Tensor, g_h: torch.Tensor, ent: torch.Tensor) -> None:
    """In place, ``x = log p`` becomes ``-p (g + g_H (log p + H))``: the softmax and entropy parts of ``G``.

    ``log p + H = (x - lse) + H``, relative throughout. A ``-inf`` logit (p = 0) gives 0, not
    ``0 * inf``. Slices at a time, as :func:`_relative_sums`.
    """
    g, g_h, ent = g.unsqueeze(-1), g_h.unsqueeze(-1), ent.unsqueeze(-1)
    c_buf, m_buf = _slice_scratch(x), _slice_scratch(x, torch.bool)
    for v0 in range(0, x.shape[1], _SLICE):
        sl = x[:, v0 : v0 + _SLICE]
        w = sl.shape[1]
        coef = torch.add(sl, ent, out=c_buf[:, :w]).mul_(g_h).add_(g)
        coef.masked_fill_(torch.eq(sl, float("-inf"), out=m_buf[:, :w]), 0.0)
        sl.exp_().mul_(coef).neg_()


@dataclasses.dataclass
class _Grads:
    """The gradient buffers of ``hidden`` ``(B, T, H)``, ``weight`` ``(V, H)``, ``bias`` ``(V,)`` (None: not wanted)."""

    h: torch.Tensor | None
    w: torch.Tensor | None
    b: torch.Tensor | None

    @property
    def wanted(self) -> bool:
        return self.h is not None or self.w is not None or self.b is not None


class _Block:
    """What every row block of one call shares, and the per-block work between the matmuls.

    ``rows(r0, r1)`` names the block's tokens (a slice, or the live-token indices), ``hidden_rows``
    reads their hidden states, and :meth:`logits_to_grad_` turns a block's logits into ``G`` in
    place while recording its log-probs and entropies.
    """

    def __init__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        batch: TokenBatch,
        options: LossOptions,
        index: torch.Tensor | None,
        cdt: torch.dtype,
        logp: torch.Tensor,
        entropy: torch.Tensor | None,
    ) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.batch, self.options, self.index, self.cdt = batch, options, index, cdt
        self.logp, self.entropy = logp, entropy
        B, T, H = hidden.shape
        try:
            self.flat_h: torch.Tensor | None = hidden.view(B * T, H)
        except RuntimeError:  # a strided view such as hidden[:, :-1]: gather rows instead
            self.flat_h = None
        self.zero = torch.zeros((), dtype=cdt, device=hidden.device)

    def rows(self, r0: int, r1: int) -> torch.Tensor | slice:
        return slice(r0, r1) if self.index is None else self.index[r0:r1]

    def hidden_rows(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """The ``(rows, H)`` hidden states in the compute dtype (half stays half on a GPU)."""
        if self.flat_h is not None:
            h = self.flat_h[rows]
        else:
            T = self.hidden.shape[1]
            tok = torch.arange(rows.start, rows.stop, device=self.hidden.device) if isinstance(rows, slice) else rows
            h = self.hidden[tok // T, tok % T]
        if not (h.is_cuda and h.dtype in (torch.float16, torch.bfloat16)):
            h = h.to(self.cdt)  # a GPU's matmuls take half operands with a float32 output
        return h

    def logits_to_grad_(self, x: torch.Tensor, rows: torch.Tensor | slice, with_grad: bool) -> None:
        """Record the block's log-probs (and entropies) and, if ``with_grad``, overwrite ``x`` with ``G``.

        ``x`` is the block's ``(rows, V)`` logits ``(h W^T + b) / T`` in the compute dtype, any
        strides. ``G = dL/dx = (g (onehot - p) - g_H p ((x - lse) + H)) / T``.
        """
        V, dev, cdt, zero = x.shape[1], x.device, self.cdt, self.zero
        temperature = self.options.temperature
        r_ids = self.batch.ids[rows]
        valid = (r_ids >= 0) & (r_ids < V)
        safe = r_ids.clamp(0, V - 1).unsqueeze(-1)
        # Relative to the row maximum: a constant offset of the logits costs no precision.
        # A row of -inf only (no finite logit) is shifted by 0, so no inf - inf.
        m = x.amax(dim=-1)
        m = torch.where(torch.isfinite(m), m, zero)
        x.sub_(m.unsqueeze(-1))
        tgt = x.gather(1, safe).squeeze(-1)
        s, u = _relative_sums(x, self.entropy is not None)
        log_s = s.log()
        lp = torch.where(valid, tgt - log_s, torch.full((), float("nan"), dtype=cdt, device=dev))
        self.logp[rows] = lp
        ent = None
        if u is not None:
            assert self.entropy is not None
            ent = log_s - u / s
            self.entropy[rows] = ent
        if not with_grad:
            return
        _, g, g_h = token_grads(self.batch.take(rows), lp, ent, self.options)
        g = g / temperature
        # G = g (onehot - p) - g_H p ((x - lse) + H), in place over x (x - lse = x_rel - log s).
        x.sub_(log_s.unsqueeze(-1))
        if g_h is None:
            x.exp_().mul_(-g.unsqueeze(-1))
        else:
            assert ent is not None
            _entropy_logit_grad_(x, g, g_h / temperature, ent)
        x.scatter_add_(1, safe, torch.where(valid, g, zero).unsqueeze(-1))


def _one_block_at_a_time(block: _Block, spans: list[tuple[int, int]], grads: _Grads) -> None:
    """Each block: its ``(rows, V)`` logits in one matmul, ``G`` in place, then ``dh``, ``dW``, ``db``.

    The GPU schedule: blocks are large (256 MiB of logits), so each matmul is already efficient.
    """
    weight, cdt = block.weight, block.cdt
    N, H = block.batch.ids.numel(), weight.shape[1]
    for r0, r1 in spans:
        rows = block.rows(r0, r1)
        h = block.hidden_rows(rows)
        x = _logits(h, weight, block.bias, block.options.temperature, cdt)  # (r, V)
        block.logits_to_grad_(x, rows, grads.wanted)
        if not grads.wanted:
            continue
        if grads.h is not None:
            flat_g = grads.h.view(N, H)
            if isinstance(rows, slice):
                dst = flat_g[rows]  # contiguous rows: the matmul writes into the gradient itself
                if weight.dtype == cdt:
                    torch.mm(x, weight, out=dst)
                else:
                    dst.copy_(_grad_times_weight(x, weight, cdt))
            else:
                flat_g.index_copy_(0, rows, _grad_times_weight(x, weight, cdt))
        if grads.w is not None:
            if r0 == 0:  # the first block writes (no pass over a zero-filled (V, H) buffer)
                torch.mm(x.t(), h.to(cdt), out=grads.w)
            else:
                grads.w.addmm_(x.t(), h.to(cdt))
        if grads.b is not None:
            grads.b += x.sum(dim=0)
        del x


def vocab_tile(hidden_size: int, same_dtype: bool) -> int:
    """Vocabulary rows of the head per tile of :func:`_cpu_pipeline`: about 8 MiB of float32 head
    (2 MiB when the tile is an up-cast copy of a half head), at least 16."""
    budget = _TILE_BYTES if same_dtype else _TILE_BYTES // 4
    return max(16, budget // (4 * max(hidden_size, 1)))


def _cpu_pipeline(block: _Block, spans: list[tuple[int, int]], grads: _Grads) -> None:
    """The CPU schedule: one tile of the head at a time serves two row blocks.

    A block's logits live transposed, ``(V, rows)``, in one buffer. For each tile of ``vocab_tile``
    vocabulary rows, block ``i``'s ``G`` tile feeds ``dh += G_t^T W_t`` and ``dW_t (+)= G_t h``,
    then block ``i + 1``'s logits ``W_t h'^T + b_t`` overwrite that same tile. The tile of ``W``
    is read from memory once for two matmuls and stays in cache, and the buffer is the whole
    working set: small blocks then run almost as fast as large ones (one matmul's worth of
    re-reading ``W`` per block is what makes small blocks slow on a CPU).
    """
    if not spans:
        return
    weight, bias, cdt = block.weight, block.bias, block.cdt
    V, H = weight.shape
    N = block.batch.ids.numel()
    temperature = block.options.temperature
    tile = vocab_tile(H, weight.dtype == cdt)
    tiles = [(v0, min(v0 + tile, V)) for v0 in range(0, V, tile)]
    width = spans[0][1] - spans[0][0]
    buf = torch.empty(V * width, dtype=cdt, device=weight.device)

    def head_tile(v0: int, v1: int) -> torch.Tensor:
        return weight[v0:v1].to(cdt)  # a view for a full-precision head; a small up-cast for a half one

    def logits_tile(xt: torch.Tensor, w_t: torch.Tensor, h: torch.Tensor, v0: int, v1: int) -> None:
        torch.mm(w_t, h.t(), out=xt)
        if bias is not None:
            xt.add_(bias[v0:v1].to(cdt).unsqueeze(-1))
        if temperature != 1.0:
            xt.div_(temperature)

    def logits(h: torch.Tensor) -> torch.Tensor:
        xT = buf[: V * h.shape[0]].view(V, h.shape[0])
        for v0, v1 in tiles:
            logits_tile(xT[v0:v1], head_tile(v0, v1), h, v0, v1)
        return xT

    rows = block.rows(*spans[0])
    h = block.hidden_rows(rows)
    xT = logits(h)
    for i in range(len(spans)):
        block.logits_to_grad_(xT.t(), rows, grads.wanted)
        nxt = spans[i + 1] if i + 1 < len(spans) else None
        rows_n = block.rows(*nxt) if nxt is not None else None
        h_n = block.hidden_rows(rows_n) if rows_n is not None else None
        # The next block's logits can take each tile's place only when its view has the same shape.
        fused_next = h_n is not None and h_n.shape[0] == h.shape[0] and grads.wanted
        if grads.wanted:
            dhT = torch.empty(H, h.shape[0], dtype=cdt, device=weight.device) if grads.h is not None else None
            for j, (v0, v1) in enumerate(tiles):
                w_t, g_t = head_tile(v0, v1), xT[v0:v1]  # (tile, H), (tile, k)
                if dhT is not None:
                    if j == 0:
                        torch.mm(w_t.t(), g_t, out=dhT)
                    else:
                        dhT.addmm_(w_t.t(), g_t)
                if grads.w is not None:
                    if i == 0:  # the first block writes (no pass over a zero-filled (V, H) buffer)
                        torch.mm(g_t, h, out=grads.w[v0:v1])
                    else:
                        grads.w[v0:v1].addmm_(g_t, h)
                if grads.b is not None:
                    grads.b[v0:v1] += g_t.sum(dim=1)
                if fused_next:
                    assert h_n is not None
                    logits_tile(g_t, w_t, h_n, v0, v1)
            if dhT is not None:
                assert grads.h is not None
                flat_g = grads.h.view(N, H)
                if isinstance(rows, slice):
                    flat_g[rows] = dhT.t()
                else:
                    flat_g.index_copy_(0, rows, dhT.t())
        if h_n is not None:
            assert rows_n is not None
            if not fused_next:
                xT = logits(h_n)
            rows, h = rows_n, h_n


# How the blocks' matmuls are ordered, per device type (the result is the same, to rounding).
_SCHEDULES = {"cpu": _cpu_pipeline}


class LinearFusedLoss(torch.autograd.Function):
    """``(hidden, weight, bias) -> (loss, logp, entropy)``; the loss is differentiable, the rest are not.

    ``batch`` and ``options`` define a token-local policy loss; ``logp`` and ``entropy`` are the
    detached flat ``(N,)`` values (0 at dead tokens; ``entropy`` empty unless asked for) the
    statistics are computed from. The gradients are formed in forward and saved; backward scales
    them by ``grad_output``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        batch: TokenBatch,
        options: LossOptions,
        with_entropy: bool,
        chunk_rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, H = hidden.shape
        N, V = B * T, weight.shape[0]
        cdt = compute_dtype(hidden.dtype)
        dev = hidden.device
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        with_entropy = with_entropy or options.entropy_coeff != 0.0
        live = batch.live
        index: torch.Tensor | None = None
        if not bool(live.all()):  # one host synchronisation: the live rows, read block by block
            index = torch.nonzero(live).squeeze(-1)
        n = N if index is None else index.numel()
        logp = torch.zeros(N, dtype=cdt, device=dev)
        entropy = torch.zeros(N if with_entropy else 0, dtype=cdt, device=dev)
        # Gradient buffers: the compute dtype (float32 for half inputs) until backward rounds them.
        grads = _Grads(
            h=torch.zeros(B, T, H, dtype=cdt, device=dev) if need_h else None,
            # written by the first block's matmul; zeros only when there is none
            w=(torch.empty(V, H, dtype=cdt, device=dev) if n else torch.zeros(V, H, dtype=cdt, device=dev))
            if need_w
            else None,
            b=torch.zeros(V, dtype=cdt, device=dev) if need_b else None,
        )
        block = _Block(hidden, weight, bias, batch, options, index, cdt, logp, entropy if with_entropy else None)
        spans = [(r0, min(r0 + chunk_rows, n)) for r0 in range(0, n, chunk_rows)]
        with torch.autocast(dev.type, enabled=False):
            _SCHEDULES.get(dev.type, _one_block_at_a_time)(block, spans, grads)
        loss = policy_loss(batch, logp, entropy if with_entropy else None, options, False)
        assert isinstance(loss, torch.Tensor)
        # Full-precision inputs: the gradients already have their dtype (no copy).
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(grads.h, grads.w, grads.b)
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx: Any, g_loss: torch.Tensor, _g_logp: Any, _g_entropy: Any) -> tuple:
        check_backward_mode("rspo_linear_loss")
        keep = _keep_graph()
        saved = ctx.saved_tensors
        one = g_loss.device.type == "cpu" and bool(g_loss == 1)  # a free check on a CPU only
        out: list[torch.Tensor | None] = []
        for t, dtype in zip(saved, ctx.dtypes, strict=True):
            if t is None:
                out.append(None)
                continue
            if not one:
                # Not retained: scale the saved buffer in place and hand it over (autograd takes it
                # as .grad without a copy). Retained: leave it intact for the next backward.
                t = t * g_loss.to(t.dtype) if keep else t.mul_(g_loss.to(t.dtype))
            out.append(t if t.dtype == dtype else t.to(dtype))
        return out[0], out[1], out[2], None, None, None, None


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    batch: TokenBatch,
    options: LossOptions,
    *,
    with_entropy: bool,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The loss of a token-local policy loss in one pass, and the detached log-probs (and entropies).

    Parameters
    ----------
    hidden : torch.Tensor
        ``(B, T, H)``, any float dtype and strides (validated inputs; see :func:`rspo_linear_loss`).
    weight : torch.Tensor
        ``(V, H)``, the dtype of ``hidden``.
    bias : torch.Tensor or None
        ``(V,)``.
    batch : TokenBatch
        The normalised inputs (:func:`rspo_kernels.loss.layout.token_batch`) of ``hidden``'s tokens.
    options : LossOptions
        A token-local loss (:func:`rspo_kernels.loss.policy.is_token_local`).
    with_entropy : bool
        Also return the entropies (for the statistics); computed anyway when ``entropy_coeff != 0``.
    chunk_rows : int, optional
        Rows per block; every block keeps its ``(rows, V)`` logits. :func:`fused_rows` when absent.

    Returns
    -------
    loss : torch.Tensor
        0-d, float32 (float64 for float64 inputs), differentiable in ``hidden``, ``weight``, ``bias``.
    logp, entropy : torch.Tensor
        ``(N,)`` detached; ``entropy`` None unless asked for or used.
    """
    if not is_token_local(options):
        raise ValueError("fused_linear_loss needs a token-local loss (rspo_kernels.loss.policy.is_token_local)")
    rows = int(chunk_rows or fused_rows(weight.shape[0], hidden.device))
    loss, logp, entropy = LinearFusedLoss.apply(hidden, weight, bias, batch, options, bool(with_entropy), rows)
    used = with_entropy or options.entropy_coeff != 0.0
    return loss, logp, (entropy if used else None)
