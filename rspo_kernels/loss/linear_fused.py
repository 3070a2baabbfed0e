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
# On a CPU, 32 MiB (256 rows at V = 32000): thinner blocks make the three matmuls memory-bound (each
# block streams the whole head), and 8 MiB blocks ran slower than the two-pass route on 2 cores; the
# price is about 24 MiB more than 8 MiB blocks (benchmarks/linear_memory.py --chunk-rows measures it).
_ROW_BLOCK_BYTES = {"cpu": 32 << 20}
_ROW_BLOCK_BYTES_DEFAULT = 256 << 20
# Vocabulary columns per elementwise temporary (exp, the entropy's product).
_SLICE = 1024


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


def _relative_sums(x: torch.Tensor, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``s = sum exp(x)`` and ``u = sum exp(x) x`` per row of ``x`` (logits minus their row maximum).

    Vocabulary slices at a time, so the temporaries stay small (and die with this frame: a slice
    view left alive would keep the whole block's storage). ``exp(-inf) * lowest = 0``: a ``-inf``
    logit adds nothing to ``u``, never NaN.
    """
    s = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    u = torch.zeros_like(s) if with_entropy else None
    lowest = torch.finfo(x.dtype).min
    for v0 in range(0, x.shape[1], _SLICE):
        sl = x[:, v0 : v0 + _SLICE]
        e = sl.exp()
        s += e.sum(dim=-1)
        if u is not None:
            u += e.mul_(sl.clamp(min=lowest)).sum(dim=-1)
    return s, u


def _entropy_logit_grad_(x: torch.Tensor, g: torch.Tensor, g_h: torch.Tensor, ent: torch.Tensor) -> None:
    """In place, ``x = log p`` becomes ``-p (g + g_H (log p + H))``: the softmax and entropy parts of ``G``.

    ``log p + H = (x - lse) + H``, relative throughout. A ``-inf`` logit (p = 0) gives 0, not
    ``0 * inf``. Slices at a time, as :func:`_relative_sums`.
    """
    g, g_h, ent = g.unsqueeze(-1), g_h.unsqueeze(-1), ent.unsqueeze(-1)
    for v0 in range(0, x.shape[1], _SLICE):
        sl = x[:, v0 : v0 + _SLICE]
        coef = sl.add(ent).mul_(g_h).add_(g)
        coef.masked_fill_(sl == float("-inf"), 0.0)
        sl.exp_().mul_(coef).neg_()


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
        temperature = options.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        need_any = need_h or need_w or need_b
        with_entropy = with_entropy or options.entropy_coeff != 0.0
        live = batch.live
        index: torch.Tensor | None = None
        if not bool(live.all()):  # one host synchronisation: the live rows, read block by block
            index = torch.nonzero(live).squeeze(-1)
        n = N if index is None else index.numel()
        try:
            flat_h: torch.Tensor | None = hidden.view(N, H)
        except RuntimeError:  # a strided view such as hidden[:, :-1]: gather rows instead
            flat_h = None
        ids = batch.ids
        logp = torch.zeros(N, dtype=cdt, device=dev)
        entropy = torch.zeros(N if with_entropy else 0, dtype=cdt, device=dev)
        # Gradient buffers: the compute dtype (float32 for half inputs) until backward rounds them.
        grad_h: Any = torch.zeros(B, T, H, dtype=cdt, device=dev) if need_h else None
        grad_w: Any = None
        if need_w:  # written by the first block's matmul; zeros only when there is none
            grad_w = torch.empty(V, H, dtype=cdt, device=dev) if n else torch.zeros(V, H, dtype=cdt, device=dev)
        grad_b: Any = torch.zeros(V, dtype=cdt, device=dev) if need_b else None
        zero = torch.zeros((), dtype=cdt, device=dev)
        with torch.autocast(dev.type, enabled=False):
            for r0 in range(0, n, chunk_rows):
                r1 = min(r0 + chunk_rows, n)
                rows: torch.Tensor | slice = slice(r0, r1) if index is None else index[r0:r1]
                if flat_h is not None:
                    h = flat_h[rows]
                else:
                    tok = torch.arange(r0, r1, device=dev) if isinstance(rows, slice) else rows
                    h = hidden[tok // T, tok % T]
                if not (h.is_cuda and h.dtype in (torch.float16, torch.bfloat16)):
                    h = h.to(cdt)  # half stays half on a GPU (the matmuls take it with a float32 output)
                x = _logits(h, weight, bias, temperature, cdt)  # (r, V)
                r_ids = ids[rows]
                valid = (r_ids >= 0) & (r_ids < V)
                safe = r_ids.clamp(0, V - 1).unsqueeze(-1)
                # Relative to the row maximum: a constant offset of the logits costs no precision.
                # A row of -inf only (no finite logit) is shifted by 0, so no inf - inf.
                m = x.amax(dim=-1)
                m = torch.where(torch.isfinite(m), m, zero)
                x.sub_(m.unsqueeze(-1))
                tgt = x.gather(1, safe).squeeze(-1)
                s, u = _relative_sums(x, with_entropy)
                log_s = s.log()
                lp = torch.where(valid, tgt - log_s, torch.full((), float("nan"), dtype=cdt, device=dev))
                logp[rows] = lp
                ent = None
                if u is not None:
                    ent = log_s - u / s
                    entropy[rows] = ent
                if not need_any:
                    del x
                    continue
                _, g, g_h = token_grads(batch.take(rows), lp, ent, options)
                g = g / temperature
                # G = g (onehot - p) - g_H p ((x - lse) + H), in place over x (x - lse = x_rel - log s).
                x.sub_(log_s.unsqueeze(-1))
                if g_h is None:
                    x.exp_().mul_(-g.unsqueeze(-1))
                else:
                    assert ent is not None
                    _entropy_logit_grad_(x, g, g_h / temperature, ent)
                x.scatter_add_(1, safe, torch.where(valid, g, zero).unsqueeze(-1))
                if need_h:
                    flat_g = grad_h.view(N, H)
                    if isinstance(rows, slice):
                        dst = flat_g[rows]  # contiguous rows: the matmul writes into the gradient itself
                        if weight.dtype == cdt:
                            torch.mm(x, weight, out=dst)
                        else:
                            dst.copy_(_grad_times_weight(x, weight, cdt))
                    else:
                        flat_g.index_copy_(0, rows, _grad_times_weight(x, weight, cdt))
                if need_w:
                    if r0 == 0:  # the first block writes (no pass over a zero-filled (V, H) buffer)
                        torch.mm(x.t(), h.to(cdt), out=grad_w)
                    else:
                        grad_w.addmm_(x.t(), h.to(cdt))
                if need_b:
                    grad_b += x.sum(dim=0)
                del x
        loss = policy_loss(batch, logp, entropy if with_entropy else None, options, False)
        assert isinstance(loss, torch.Tensor)
        # Full-precision inputs: the gradients already have their dtype (no copy).
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
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
