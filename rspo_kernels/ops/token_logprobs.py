"""Fused token log-probabilities in Triton: forward saves the log-sum-exp, backward recomputes.

Layout (Liger-Kernel's ``cross_entropy.py``): the ``@triton.jit`` kernels, then the launchers that
pick block sizes and the grid, then the ``torch.autograd.Function``. One program per token on a
1-D grid, rows on x (:func:`rspo_kernels.ops._grid.row_grid`: no y or z limit of 65,535 applies).

- Forward: each live token streams its row of logits once through an online log-sum-exp (and
  entropy) in float32 and stores ``logp`` and ``lse`` as two parts, the row max and the log of
  the sum relative to it: O(tokens) outputs, nothing of size vocab. Everything is relative to the
  row max, so a constant offset of the logits costs no precision in either pass.
- Backward: each token with a nonzero incoming gradient ``g = dL/dlogp`` streams its row again and
  writes ``g * (onehot(target) - exp(x / T - lse)) / T`` in the logits' dtype (minus
  ``g_H * p * (x - E_p[x]) / T`` when the entropy has a gradient ``g_H``); the target's entry,
  ``g (1 - p_target) / T``, comes from the sum of the other probabilities, since ``1 - exp(.)``
  would cancel for a confident target (it is written last, after a barrier). ``g`` already
  holds ``grad_output`` and the aggregation coefficient, so loss scaling happens in float32 before
  the single rounding. Tokens with ``g = 0`` (padding, clipped tokens) write zeros without reading
  their logits, so NaN or inf there never reaches the gradient.

Strides are left specialised (Triton keys them on divisibility by 16), so the loads along the
vocabulary are 16-byte vector loads; only ``T``, which changes every step, is
``do_not_specialize``. The vocabulary size is a ``constexpr``: fixed per model, it gives the
loop a constant trip count (and Triton 3.6's interpreter cannot loop to a runtime bound). The
kernels use ``tl.exp``/``tl.log`` only (no libdevice), and run under ``TRITON_INTERPRET=1`` with
Triton 3.6 and 3.9.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from rspo_kernels.loss.chunked import (
    check_backward_mode,
    check_inplace_backward_once,
    default_chunk_rows,
    entropy_grad,
    logits_grad,
)
from rspo_kernels.ops._grid import row_grid
from rspo_kernels.ops._softmax_helpers import (
    entropy_grad_block,
    finite_or_zero,
    load_scaled_block,
    lse_block_update,
    softcap_block,
    softcap_grad_block,
    softmax_grad_block,
)

__all__ = ["LAUNCH_ENV", "TritonTokenLogprobs", "fused_token_logprobs", "launch_config"]


@triton.jit(do_not_specialize=["T"])
def _token_logprobs_fwd_kernel(
    p_logits,
    p_ids,
    p_live,
    p_logp,
    p_lse,
    p_lse_lo,
    p_entropy,
    T,
    stride_lb,
    stride_lt,
    inv_temperature,
    softcap,
    V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    if tl.load(p_live + i_n) != 0:
        p_row = p_logits + (i_n // T) * stride_lb + (i_n % T) * stride_lt
        o_v = tl.arange(0, BLOCK_V)
        b_m = float("-inf")
        b_s = 0.0
        b_t = 0.0
        for v0 in range(0, V, BLOCK_V):
            b_x, _ = load_scaled_block(p_row, v0 + o_v, V, inv_temperature, softcap, SOFTCAP)  # [BV]
            b_m, b_s, b_t = lse_block_update(b_m, b_s, b_t, b_x, WITH_ENTROPY)
        i_target = tl.load(p_ids + i_n)
        m_valid = (i_target >= 0) & (i_target < V)
        b_zt = tl.load(p_row + tl.where(m_valid, i_target, 0)).to(tl.float32)
        if SOFTCAP:
            b_zt = softcap_block(b_zt, softcap)
        b_xt = b_zt * inv_temperature
        # (x_t - m) - log(s), not x_t - lse: for a confident target the rounding of lse = m + log(s)
        # would swamp the small log-prob. An out-of-range id is a NaN log-prob on every backend.
        tl.store(p_logp + i_n, tl.where(m_valid, (b_xt - b_m) - tl.log(b_s), float("nan")))
        # lse = m + log(s) kept as its two parts: the backward forms x - lse as (x - m) - log(s),
        # so a large constant offset of the logits does not round it.
        tl.store(p_lse + i_n, finite_or_zero(b_m))
        tl.store(p_lse_lo + i_n, tl.log(b_s))
        if WITH_ENTROPY:
            tl.store(p_entropy + i_n, tl.log(b_s) - b_t / b_s)
    else:
        tl.store(p_logp + i_n, 0.0)
        tl.store(p_lse + i_n, 0.0)
        tl.store(p_lse_lo + i_n, 0.0)
        if WITH_ENTROPY:
            tl.store(p_entropy + i_n, 0.0)


@triton.jit(do_not_specialize=["T"])
def _token_logprobs_bwd_kernel(
    p_logits,
    p_ids,
    p_lse,
    p_lse_lo,
    p_glogp,
    p_gentropy,
    p_mean_x,
    p_dlogits,
    T,
    stride_lb,
    stride_lt,
    stride_gb,
    stride_gt,
    inv_temperature,
    softcap,
    V: tl.constexpr,
    WITH_ENTROPY_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_b = i_n // T
    i_t = i_n % T
    p_grow = p_dlogits + i_b * stride_gb + i_t * stride_gt
    o_v = tl.arange(0, BLOCK_V)
    b_g = tl.load(p_glogp + i_n).to(tl.float32) * inv_temperature
    b_zero = b_g == 0.0
    if WITH_ENTROPY_GRAD:
        b_gh = tl.load(p_gentropy + i_n).to(tl.float32) * inv_temperature
        b_mu = tl.load(p_mean_x + i_n)
        b_zero = b_zero & (b_gh == 0.0)
    if b_zero:
        for v0 in range(0, V, BLOCK_V):
            tl.store(p_grow + v0 + o_v, tl.zeros([BLOCK_V], dtype=p_dlogits.dtype.element_ty), mask=v0 + o_v < V)
    else:
        p_row = p_logits + i_b * stride_lb + i_t * stride_lt
        b_off = tl.load(p_lse + i_n)
        b_lo = tl.load(p_lse_lo + i_n)  # lse = b_off + b_lo; b_mu is E_p[x - b_off]
        i_target = tl.load(p_ids + i_n)
        b_rest = 0.0  # 1 - p_target, summed off the target so that it keeps full relative precision
        b_ent_t = 0.0  # the entropy term at the target entry, kept when that entry is overwritten
        b_cap_t = 0.0  # the cap's derivative at the target, read before the row is overwritten (inplace)
        for v0 in range(0, V, BLOCK_V):
            b_x, m_v = load_scaled_block(p_row, v0 + o_v, V, inv_temperature, softcap, SOFTCAP)  # [BV]
            b_y = b_x - b_off  # [BV], relative to the row max: small at any offset, -inf stays -inf
            m_t = v0 + o_v == i_target  # [BV]
            b_dx, b_rest_blk = softmax_grad_block(b_y, b_lo, m_t, b_g)  # [BV], scalar
            b_rest += b_rest_blk
            if WITH_ENTROPY_GRAD:
                b_de = entropy_grad_block(b_y, b_lo, b_mu, b_gh)  # [BV]
                b_dx -= b_de
                b_ent_t += tl.sum(tl.where(m_t, b_de, 0.0), axis=0)
            if SOFTCAP:
                # Chain rule through the cap: dx/dz = 1 - tanh(z / c)^2. The target's factor is kept
                # for its entry, rewritten below (with inplace_backward the logits are gone by then).
                # From the capped, scaled b_x, not b_y = b_x - b_off (softcap_grad_block's contract).
                b_dcap = softcap_grad_block(b_x, 1.0 / (inv_temperature * softcap))  # [BV]
                b_dx = b_dx * b_dcap
                b_cap_t += tl.sum(tl.where(m_t, b_dcap, 0.0), axis=0)
            # Whole blocks under the vocabulary mask alone, so the stores stay 16-byte vector stores;
            # the target's entry (-p_t g here) is overwritten once the row is done.
            tl.store(p_grow + v0 + o_v, b_dx.to(p_dlogits.dtype.element_ty), mask=m_v)
        if (i_target >= 0) & (i_target < V):
            b_dt = b_rest * b_g - b_ent_t
            if SOFTCAP:
                b_dt = b_dt * b_cap_t
            # Another thread may have stored the block holding the target: order its store first.
            tl.debug_barrier()
            tl.store(p_grow + i_target, b_dt.to(p_dlogits.dtype.element_ty))


LAUNCH_ENV = "RSPO_KERNELS_LOSS_LAUNCH"


def launch_config(vocab: int, device: torch.device) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for one row of ``vocab`` logits.

    On a GPU, 4096-wide blocks with 8 warps keep 16-byte loads busy for large vocabularies
    (untuned: no GPU has run these kernels yet; ``benchmarks/gpu.py --sweep`` tunes them). Under the
    CPU interpreter, small blocks keep the NumPy emulation fast and exercise the multi-block path
    at test shapes. ``RSPO_KERNELS_LOSS_LAUNCH=8192x16`` overrides both.
    """
    override = os.environ.get(LAUNCH_ENV)
    if override:
        block, warps = (int(v) for v in override.lower().split("x"))
        return min(triton.next_power_of_2(vocab), block), warps
    if device.type == "cpu":
        return min(triton.next_power_of_2(vocab), 128), 1
    return min(triton.next_power_of_2(vocab), 4096), 8


def _launch_fwd(
    logits: torch.Tensor,
    ids: torch.Tensor,
    live: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, offset, log_s, entropy)``: ``lse = offset + log_s``, ``offset`` the row max."""
    B, T, V = logits.shape
    N = B * T
    dev = logits.device
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty_like(logp)
    lse_lo = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    if N:
        block_v, num_warps = launch_config(V, dev)
        _token_logprobs_fwd_kernel[row_grid(N)](
            logits,
            ids,
            live.view(torch.uint8),
            logp,
            lse,
            lse_lo,
            entropy if with_entropy else logp,
            T,
            logits.stride(0),
            logits.stride(1),
            1.0 / temperature,
            1.0 if softcap is None else softcap,
            V=V,
            WITH_ENTROPY=with_entropy,
            SOFTCAP=softcap is not None,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
    return logp, lse, lse_lo, entropy


def _launch_bwd(
    logits: torch.Tensor,
    ids: torch.Tensor,
    lse: torch.Tensor,
    lse_lo: torch.Tensor,
    g_logp: torch.Tensor,
    dlogits: torch.Tensor,
    temperature: float,
    g_entropy: torch.Tensor | None = None,
    mean_x: torch.Tensor | None = None,
    softcap: float | None = None,
) -> None:
    B, T, V = logits.shape
    if B * T == 0:
        return
    block_v, num_warps = launch_config(V, logits.device)
    with_gh = g_entropy is not None
    _token_logprobs_bwd_kernel[row_grid(B * T)](
        logits,
        ids,
        lse,
        lse_lo,
        g_logp,
        g_entropy if with_gh else g_logp,
        mean_x if with_gh else lse,
        dlogits,
        T,
        logits.stride(0),
        logits.stride(1),
        dlogits.stride(0),
        dlogits.stride(1),
        1.0 / temperature,
        1.0 if softcap is None else softcap,
        V=V,
        WITH_ENTROPY_GRAD=with_gh,
        SOFTCAP=softcap is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )


class TritonTokenLogprobs(torch.autograd.Function):
    """``(logits, ids, live) -> (logp, offset, log_s, entropy)``; ``logp`` and ``entropy`` differentiable.

    The contract of :class:`rspo_kernels.loss.chunked.ChunkedTokenLogprobs` (plus the saved
    log-sum-exp ``lse = offset + log_s`` in two parts, which the backward kernel reads instead of
    recomputing it, and ``E_p[x - offset]`` as ``log_s - entropy``), for float16, bfloat16 and
    float32 logits whose last dimension is contiguous.
    """

    @staticmethod
    def forward(
        logits: torch.Tensor,
        ids: torch.Tensor,
        live: torch.Tensor,
        temperature: float,
        with_entropy: bool,
        inplace_backward: bool,
        softcap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _launch_fwd(logits, ids, live, temperature, with_entropy, softcap)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        logits, ids, live, temperature, with_entropy, inplace_backward = inputs[:6]
        softcap = inputs[6] if len(inputs) > 6 else None  # a caller that predates the cap passes 6
        _, lse, lse_lo, entropy = output
        ctx.mark_non_differentiable(*((lse, lse_lo) if with_entropy else (lse, lse_lo, entropy)))
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work for it
        ctx.save_for_backward(logits, ids, live, lse, lse_lo, entropy)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        ctx.softcap = softcap
        ctx.consumed = False

    @staticmethod
    def backward(
        ctx: Any, g_logp: torch.Tensor | None, _g_lse: Any, _g_lse_lo: Any, g_entropy: torch.Tensor | None
    ) -> tuple:
        check_backward_mode("rspo_loss")
        check_inplace_backward_once(ctx)
        logits, ids, live, lse, lse_lo, entropy = ctx.saved_tensors
        g_entropy = entropy_grad(g_entropy)
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        # H = lse - E_p[x]: the entropy's gradient needs E_p[x - offset] = log(s) - H, recovered without
        # another pass and without forming an absolute logit.
        mean_x = None if g_entropy is None else lse_lo - entropy
        if torch._C._functorch.maybe_current_level() is not None:
            # torch.func wraps tensors that have no storage a kernel could read: same math in torch,
            # with the softmax recomputed (lse=None): exp(x - lse) would cancel at confident targets.
            dlogits = logits_grad(
                logits,
                ids,
                live,
                None,
                g_logp,
                ctx.temperature,
                default_chunk_rows(logits.shape[-1]),
                ctx.inplace_backward,
                g_entropy=g_entropy,
                softcap=ctx.softcap,
            )
            return dlogits, None, None, None, None, None, None
        dlogits = (
            logits if ctx.inplace_backward else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        )
        # Dead tokens take no gradient, whatever reaches their (constant 0) log-prob.
        zero = torch.zeros((), device=g_logp.device)
        g = torch.where(live, g_logp.to(torch.float32), zero).contiguous()
        gh = None if g_entropy is None else torch.where(live, g_entropy.to(torch.float32), zero).contiguous()
        _launch_bwd(logits, ids, lse, lse_lo, g, dlogits, ctx.temperature, gh, mean_x, ctx.softcap)
        if ctx.inplace_backward:
            torch.autograd.graph.increment_version(logits)
        return dlogits, None, None, None, None, None, None


def fused_token_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    live: torch.Tensor,
    *,
    temperature: float,
    with_entropy: bool,
    inplace_backward: bool = False,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton log-probs of ``ids``; the contract of :func:`rspo_kernels.loss.chunked.fused_token_logprobs`.

    ``logits`` is ``(B, T, V)`` float16/bfloat16/float32 (a non-contiguous last dimension is copied
    once); ``ids`` and ``live`` are ``(N,)``. Returns float32 ``(N,)`` log-probs and entropies (or
    None), both differentiable.
    """
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    logp, _, _, entropy = TritonTokenLogprobs.apply(
        logits,
        ids.contiguous(),
        live.contiguous(),
        float(temperature),
        bool(with_entropy),
        bool(inplace_backward),
        None if softcap is None else float(softcap),
    )
    return logp, (entropy if with_entropy else None)
