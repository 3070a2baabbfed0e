"""The memory-lean torch path of the fused log-probs: rows of logits in chunks, softmax recomputed.

:class:`ChunkedTokenLogprobs` maps ``(B, T, V)`` logits to ``(N,)`` target log-probs. Its forward
reads ``chunk_rows`` rows at a time (upcast to float32) through one ``log_softmax`` each, keeps
nothing of size vocab, and returns. Its backward reads the rows again, recomputes their softmax and
writes, once and in the logits' dtype,

    dlogits = g * (onehot(target) - softmax(logits / T)) / T,      g = dL/dlogp (grad_output included)

so the float32 ``(tokens, vocab)`` softmax never exists and gradients obey autograd: loss scaling
happens before the single rounding, ``retain_graph`` repeats exactly, ``no_grad`` does no gradient
work. Everything else of the loss is O(tokens) torch code differentiated by autograd
(:func:`rspo_kernels.loss.reference.token_objective`). It runs on any device; the dispatcher sends
CPU tensors (and float64 on a GPU) here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from rspo_kernels.loss.layout import compute_dtype
from rspo_kernels.loss.softcap import scaled_logits

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ChunkedTokenLogprobs",
    "check_backward_mode",
    "check_inplace_backward_once",
    "fused_token_logprobs",
    "logits_grad",
    "row_chunks",
]

# Size of one float32 chunk of logits; the working set is about three of these.
DEFAULT_CHUNK_BYTES = 8 << 20


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that a float32 chunk is about :data:`DEFAULT_CHUNK_BYTES`."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * max(vocab, 1)))


def row_chunks(
    tensors: tuple[torch.Tensor, ...], chunk_rows: int
) -> Iterator[tuple[tuple[torch.Tensor, ...], int, int]]:
    """Yield ``(rows, r0, r1)``: the flattened rows ``[r0, r1)`` of each ``(B, T, V)`` tensor, as views.

    A strided slice such as ``logits[:, :-1]`` is not one ``(N, V)`` view; then every tensor is
    chunked within each sequence, never copied whole.
    """
    B, T, V = tensors[0].shape
    try:
        flats = tuple(t.view(B * T, V) for t in tensors)
    except RuntimeError:
        flats = None
    if flats is not None:
        for r0 in range(0, B * T, chunk_rows):
            r1 = min(r0 + chunk_rows, B * T)
            yield tuple(f[r0:r1] for f in flats), r0, r1
        return
    for b in range(B):
        for t0 in range(0, T, chunk_rows):
            t1 = min(t0 + chunk_rows, T)
            yield tuple(t[b, t0:t1] for t in tensors), b * T + t0, b * T + t1


def check_backward_mode(op: str) -> None:
    """Refuse ``create_graph=True``: the fused backward is not itself differentiable.

    ``once_differentiable`` raises only when the incoming gradient requires grad; with a constant
    ``grad_output`` (``torch.autograd.grad(loss, x, create_graph=True)``) the second derivative
    would be dropped silently. Autograd enables grad mode in backward exactly when
    ``create_graph=True``.
    """
    # torch.func transforms run backward with grad mode on at their own level: not create_graph.
    in_functorch = torch._C._functorch.maybe_current_level() is not None
    if torch.is_grad_enabled() and not in_functorch:
        raise RuntimeError(
            f"{op} does not support create_graph=True (double backward): its backward is a fused kernel. "
            "For second derivatives compute the loss with RSPO_KERNELS_BACKEND=reference."
        )


def _safe_ids(ids: torch.Tensor, live: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = (ids >= 0) & (ids < vocab)
    return torch.where(valid & live, ids, torch.zeros_like(ids)), valid


def entropy_grad(g_entropy: torch.Tensor | None) -> torch.Tensor | None:
    """The entropy output's incoming gradient, or None when it has none.

    With ``set_materialize_grads(False)`` an unused output's gradient is None; the empty
    placeholder returned when no entropy was asked for may still get a (empty) gradient, which
    torch.compile materialises. Both mean: no entropy term in the backward.
    """
    return None if g_entropy is None or g_entropy.numel() == 0 else g_entropy


class ChunkedTokenLogprobs(torch.autograd.Function):
    """``(logits, ids, live) -> (logp, entropy)``; both differentiable.

    Nothing but the inputs is saved: backward recomputes the softmax with one fused
    ``torch.softmax`` per chunk, faster on CPU than subtracting a saved log-sum-exp, and with it
    ``E_p[x]`` for the entropy's gradient. Outputs are flat ``(N,)`` in the compute dtype
    (float32; float64 for float64 logits). Tokens that are not ``live`` get 0 everywhere and a
    zero gradient row, whatever the logits hold. ``entropy`` is empty unless asked for.
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
        softcap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, V = logits.shape
        cdt = compute_dtype(logits.dtype)
        safe, valid = _safe_ids(ids, live, V)
        logp = torch.zeros(B * T, dtype=cdt, device=logits.device)
        entropy = torch.zeros_like(logp) if with_entropy else logp.new_empty(0)
        for (rows,), r0, r1 in row_chunks((logits,), chunk_rows):
            # Read the caller's rows directly when no upcast or scaling is needed: one pass fewer.
            x, _ = scaled_logits(rows, temperature, softcap, cdt)  # [n, V]
            # One fused log_softmax is about 3x faster on CPU than logsumexp's max/sub/exp/sum passes.
            logsm = torch.log_softmax(x, dim=-1)  # [n, V]
            logp[r0:r1] = logsm.gather(1, safe[r0:r1].unsqueeze(-1)).squeeze(-1)
            if with_entropy:
                p = logsm.exp()
                # p log p -> 0 where p = 0 (a -inf logit), never 0 * -inf.
                entropy[r0:r1] = -torch.where(p > 0, p * logsm, torch.zeros((), dtype=cdt)).sum(dim=-1)
        zero = torch.zeros((), dtype=cdt, device=logits.device)
        logp = torch.where(live, torch.where(valid, logp, torch.full((), float("nan"), dtype=cdt)), zero)
        if with_entropy:
            entropy = torch.where(live, entropy, zero)
        return logp, entropy

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        logits, ids, live, temperature, with_entropy, inplace_backward, chunk_rows = inputs[:7]
        softcap = inputs[7] if len(inputs) > 7 else None  # a caller that predates the cap passes 7
        if not with_entropy:
            ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work for it
        ctx.save_for_backward(logits, ids, live)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        ctx.chunk_rows = chunk_rows
        ctx.softcap = softcap
        ctx.consumed = False

    @staticmethod
    def backward(ctx: Any, g_logp: torch.Tensor | None, g_entropy: torch.Tensor | None) -> tuple:
        check_backward_mode("rspo_loss")
        check_inplace_backward_once(ctx)
        logits, ids, live = ctx.saved_tensors
        g_entropy = entropy_grad(g_entropy)
        if g_logp is None:
            g_logp = torch.zeros(live.shape, dtype=compute_dtype(logits.dtype), device=live.device)
        grad = logits_grad(
            logits,
            ids,
            live,
            None,
            g_logp,
            ctx.temperature,
            ctx.chunk_rows,
            ctx.inplace_backward,
            g_entropy=g_entropy,
            softcap=ctx.softcap,
        )
        return grad, None, None, None, None, None, None, None


def logits_grad(
    logits: torch.Tensor,
    ids: torch.Tensor,
    live: torch.Tensor,
    lse: tuple[torch.Tensor, torch.Tensor] | None,
    g_logp: torch.Tensor,
    temperature: float,
    chunk_rows: int,
    inplace: bool,
    *,
    g_entropy: torch.Tensor | None = None,
    mean_x: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``(g * onehot(ids) - p * (g + g_H * (x - E_p[x]))) / T`` chunk by chunk, in the logits' dtype.

    ``x = logits / T``, ``p = softmax(x)``, ``g = dL/dlogp``, ``g_H = dL/dentropy`` (None: no
    entropy term); ``dH/dx = -p (x - E_p[x])`` since ``H = lse(x) - E_p[x]``. With the forward's
    per-token log-sum-exp in two parts, ``lse = (offset, log s)`` (``lse = offset + log s``,
    :func:`rspo_kernels.loss.vocab_parallel.finish_stats`), the softmax is
    ``exp((x - offset) - log s)``; with ``lse=None`` it is recomputed by ``torch.softmax`` (one
    fused pass, the faster choice on CPU). ``mean_x`` is ``E_p[x - offset]`` when given (with
    ``lse``), else recomputed from the chunk's softmax relative to the row max: ``x - E_p[x]`` is
    never formed from absolute logits, so a constant offset of the logits costs no precision.
    Rows with ``g = g_H = 0`` (padding, clipped tokens) are written as zeros without reading their
    logits, so NaN or inf there never leaks. With ``inplace`` the result overwrites ``logits`` (whose version
    counter is bumped, so any other autograd node that saved them raises instead of reading the
    gradient); else it goes to ``out`` when given (a view into a larger gradient), or a new tensor.
    An id outside ``[0, V)`` adds no one-hot term (a vocabulary slice that does not hold it).
    With ``softcap`` ``c``, ``x = c tanh(logits / c) / T`` and the result is multiplied by the
    cap's derivative ``1 - tanh(logits / c)^2`` (:mod:`rspo_kernels.loss.softcap`).
    """
    V = logits.shape[-1]
    cdt = compute_dtype(logits.dtype)
    if inplace:
        grad = logits
    else:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if out is None else out
    zero = torch.zeros((), dtype=cdt, device=live.device)
    # Dead tokens take no gradient, whatever reaches their (constant 0) log-prob.
    g = torch.where(live, g_logp.to(cdt) / temperature, zero)
    gh = None if g_entropy is None else torch.where(live, g_entropy.to(cdt) / temperature, zero)
    safe, valid = _safe_ids(ids, live, V)
    hit = torch.where(valid, g, zero)  # the one-hot term's weight: 0 where this slice lacks the id
    sparse_ok = logits.device.type == "cpu" and not torch.compiler.is_compiling()
    for (rows, grad_rows), r0, r1 in row_chunks((logits, grad), chunk_rows):
        c_g, c_ids, c_hit = g[r0:r1], safe[r0:r1], hit[r0:r1]
        c_gh = None if gh is None else gh[r0:r1]
        c_lse = None if lse is None else (lse[0][r0:r1], lse[1][r0:r1])
        c_mu = None if mean_x is None else mean_x[r0:r1]
        nonzero = c_g != 0 if c_gh is None else (c_g != 0) | (c_gh != 0)
        if sparse_ok and not bool(nonzero.all()):
            # Clipped and padded tokens are common in RL batches: compute only the others.
            idx = torch.nonzero(nonzero).squeeze(-1)
            c_gh, c_mu = (None if v is None else v[idx] for v in (c_gh, c_mu))
            c_lse = None if c_lse is None else (c_lse[0][idx], c_lse[1][idx])
            sub = _softmax_grad_rows(
                rows.index_select(0, idx),
                c_g[idx],
                c_ids[idx],
                c_lse,
                temperature,
                cdt,
                c_gh,
                c_mu,
                c_hit[idx],
                softcap,
            )
            # After reading: with inplace, grad_rows are the logits.
            grad_rows.index_fill_(0, torch.nonzero(~nonzero).squeeze(-1), 0.0)
            grad_rows.index_copy_(0, idx, sub.to(grad_rows.dtype))
            continue
        blk = _softmax_grad_rows(rows, c_g, c_ids, c_lse, temperature, cdt, c_gh, c_mu, c_hit, softcap)
        blk.masked_fill_(~nonzero.unsqueeze(-1), 0.0)  # 0 * NaN of a dead row must not leak
        grad_rows.copy_(blk)
    if inplace:
        torch.autograd.graph.increment_version(logits)
    return grad


def _softmax_grad_rows(
    rows: torch.Tensor,
    g: torch.Tensor,
    ids: torch.Tensor,
    lse: tuple[torch.Tensor, torch.Tensor] | None,
    temperature: float,
    cdt: torch.dtype,
    gh: torch.Tensor | None = None,
    mean_x: torch.Tensor | None = None,
    hit: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``hit * onehot(ids) - p * (g + gh * (x - E_p[x]))`` for a block of rows, in a fresh ``cdt`` buffer.

    ``hit`` is ``g`` where the row holds its id (the default), else 0. ``lse`` and ``mean_x`` as in
    :func:`logits_grad` (``mean_x`` relative to ``lse[0]``), both of the capped, scaled ``x``. With
    ``softcap`` the result is multiplied by the cap's derivative (the chain rule through
    ``x = cap(z) / T``).
    """
    d_cap = None
    if softcap is None:
        x = rows.to(cdt) / temperature if temperature != 1.0 else rows
    else:
        x, d_cap = scaled_logits(rows, temperature, softcap, cdt, with_grad=True)
    zero = torch.zeros((), dtype=cdt, device=rows.device)
    if lse is None:
        out = torch.softmax(x, dim=-1, dtype=cdt)
        if gh is not None:
            # Relative to the row max (an exact logit): x - max is exact where it matters.
            m = x.amax(dim=-1).to(cdt)
            dev = x.to(cdt).sub(torch.where(m == float("-inf"), zero, m).unsqueeze(-1))
    elif gh is None:
        out = x.to(cdt).sub(lse[0].unsqueeze(-1)).sub_(lse[1].unsqueeze(-1)).exp_()  # one buffer
    else:
        dev = x.to(cdt).sub(lse[0].unsqueeze(-1))  # x - offset, -inf stays -inf
        out = dev.sub(lse[1].unsqueeze(-1)).exp_()
    if gh is None:
        out.mul_(-g.unsqueeze(-1))
    else:
        # (x - E_p[x]) where p > 0 only: a -inf logit (p = 0) must give 0, never 0 * -inf.
        dev.masked_fill_(out == 0, 0.0)  # [n, V]
        mu = torch.linalg.vecdot(out, dev) if mean_x is None else mean_x
        dev.sub_(mu.unsqueeze(-1)).mul_(gh.unsqueeze(-1)).add_(g.unsqueeze(-1))
        out.mul_(dev).neg_()
    out.scatter_add_(1, ids.unsqueeze(-1), (g if hit is None else hit).unsqueeze(-1))
    return out if d_cap is None else out.mul_(d_cap)


def check_inplace_backward_once(ctx: Any) -> None:
    """With ``inplace_backward`` the logits are overwritten: a second backward would read garbage."""
    if ctx.inplace_backward:
        if ctx.consumed:
            raise RuntimeError(
                "rspo_loss(..., inplace_backward=True) overwrites the logits with their gradient during "
                "backward, so backward can run only once (retain_graph=True cannot repeat it). "
                "Use inplace_backward=False to backpropagate more than once."
            )
        ctx.consumed = True


def fused_token_logprobs(
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
    """Chunked log-probs of ``ids`` under ``softmax(logits / temperature)``; differentiable.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, T, V)`` any float dtype, any strides.
    ids : torch.Tensor
        ``(N,)`` int64 target ids (``N = B * T``); read only where ``live``.
    live : torch.Tensor
        ``(N,)`` bool: the tokens whose log-probs are needed.
    temperature : float
        Divides the logits.
    with_entropy : bool
        Also compute the entropies (differentiable too).
    inplace_backward : bool
        Write the gradient over ``logits`` in backward (one backward only).
    chunk_rows : int, optional
        Rows per chunk; by default a float32 chunk is about 8 MiB.
    softcap : float, optional
        Final-logit soft-capping ``z -> c * tanh(z / c)`` before the temperature
        (:mod:`rspo_kernels.loss.softcap`).

    Returns
    -------
    logp : torch.Tensor
        ``(N,)`` float32 (float64 for float64 logits), 0 where not ``live``, NaN for an id
        outside ``[0, V)``.
    entropy : torch.Tensor or None
        ``(N,)`` entropies when asked.
    """
    logp, entropy = ChunkedTokenLogprobs.apply(
        logits,
        ids,
        live,
        float(temperature),
        bool(with_entropy),
        bool(inplace_backward),
        int(chunk_rows or default_chunk_rows(logits.shape[-1])),
        None if softcap is None else float(softcap),
    )
    return logp, (entropy if with_entropy else None)
