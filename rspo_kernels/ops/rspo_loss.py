"""Fused RSPO policy loss in Triton: loss and logits gradient in one forward pass.

Layout (Liger-Kernel's ``cross_entropy.py``): the ``@triton.jit`` kernels, then the launcher, then
the ``torch.autograd.Function``. One program per token on a 1-D grid. Each program

1. streams its row of logits through an online log-sum-exp (and entropy) in float32,
2. forms ``logp``, the clipped surrogate, the k3 KL and ``dloss/dlogp`` (helpers in
   :mod:`rspo_kernels.ops._softmax_helpers`),
3. streams the row again and writes ``c_tok * dloss/dlogp * (onehot - softmax) / T`` into the
   gradient buffer, or over the logits themselves with ``inplace_backward=True``.

``c_tok`` is the token's coefficient in the (linear) loss aggregation, so the gradient of the final
scalar is complete after the forward. Saved state: the gradient buffer (which *is* the answer) and
nothing else of size tokens x vocab. The backward multiplies by ``grad_output`` in a kernel that
reads the scalar on the device and returns at once when it is 1, so no host sync is needed.
"""

import torch
import triton
import triton.language as tl

from rspo_kernels._chunked_loss import aggregation_coefficients, fused_loss_args, summarize_stats
from rspo_kernels.ops._softmax_helpers import (
    clipped_objective,
    k3_kl,
    load_scaled_block,
    row_logsumexp,
    softmax_grad_block,
)
from rspo_kernels.ops.token_logprobs import launch_config

__all__ = ["rspo_loss_triton", "RSPOLossFunction"]


@triton.jit(do_not_specialize=["T", "stride_lb", "stride_lt", "stride_gb", "stride_gt"])
def _rspo_loss_fwd_kernel(
    p_logits,
    p_target,
    p_adv,
    p_coef,
    p_old,
    p_ref,
    p_loss,
    p_logp,
    p_entropy,
    p_clipped,
    p_kl,
    p_dlogits,
    T,
    V,
    stride_lb,
    stride_lt,
    stride_gb,
    stride_gt,
    inv_temperature,
    eps_low,
    eps_high,
    beta,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    USE_KL: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_b = i_n // T
    i_t = i_n % T
    p_row = p_logits + i_b * stride_lb + i_t * stride_lt
    p_grow = p_dlogits + i_b * stride_gb + i_t * stride_gt
    o_v = tl.arange(0, BLOCK_V)
    b_c = tl.load(p_coef + i_n)

    if b_c != 0.0:
        b_lse, b_s, b_t = row_logsumexp(p_row, V, inv_temperature, WITH_ENTROPY, BLOCK_V)

        target = tl.minimum(tl.maximum(tl.load(p_target + i_n), 0), V - 1)
        b_logp = tl.load(p_row + target).to(tl.float32) * inv_temperature - b_lse
        if HAS_OLD:
            b_old = tl.load(p_old + i_n).to(tl.float32)
        else:
            b_old = b_logp  # on-policy: ratio = 1, the gradient is the plain weighted one
        b_adv = tl.load(p_adv + i_n).to(tl.float32)
        b_loss, b_dlogp, b_clipped = clipped_objective(b_logp, b_old, b_adv, eps_low, eps_high)
        if HAS_REF:
            b_kl, b_dkl = k3_kl(b_logp, tl.load(p_ref + i_n).to(tl.float32))
            tl.store(p_kl + i_n, b_kl)
            if USE_KL:  # with beta = 0 the KL is only logged: never let 0 * inf reach the loss
                b_loss += beta * b_kl
                b_dlogp += beta * b_dkl

        tl.store(p_loss + i_n, b_loss)
        tl.store(p_logp + i_n, b_logp)
        tl.store(p_clipped + i_n, b_clipped.to(tl.int8))
        if WITH_ENTROPY:
            tl.store(p_entropy + i_n, tl.log(b_s) - b_t / b_s)

        if WITH_GRAD:
            b_g = b_c * b_dlogp * inv_temperature
            for v0 in range(0, V, BLOCK_V):
                b_x, m_v = load_scaled_block(p_row, v0 + o_v, V, inv_temperature)  # [BV]
                b_dx = softmax_grad_block(b_x, b_lse, v0 + o_v, target, b_g)  # [BV]
                tl.store(p_grow + v0 + o_v, b_dx.to(p_dlogits.dtype.element_ty), mask=m_v)
    else:
        # Padding: zero loss and gradient, whatever the row holds (ids may be -100).
        tl.store(p_loss + i_n, 0.0)
        tl.store(p_logp + i_n, 0.0)
        tl.store(p_clipped + i_n, 0)  # cast to int8 by the store
        if WITH_ENTROPY:
            tl.store(p_entropy + i_n, 0.0)
        if HAS_REF:
            tl.store(p_kl + i_n, 0.0)
        if WITH_GRAD:
            for v0 in range(0, V, BLOCK_V):
                tl.store(p_grow + v0 + o_v, tl.zeros([BLOCK_V], dtype=p_dlogits.dtype.element_ty), mask=v0 + o_v < V)


@triton.jit(do_not_specialize=["T", "stride_b", "stride_t"])
def _scale_rows_kernel(p_x, p_scale, T, V, stride_b, stride_t, BLOCK_V: tl.constexpr):
    b_scale = tl.load(p_scale).to(tl.float32)
    if b_scale != 1.0:  # the common case costs one scalar load per program
        i_n = tl.program_id(0).to(tl.int64)
        p_row = p_x + (i_n // T) * stride_b + (i_n % T) * stride_t
        o_v = tl.arange(0, BLOCK_V)
        for v0 in range(0, V, BLOCK_V):
            m_v = v0 + o_v < V
            b_x = tl.load(p_row + v0 + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
            tl.store(p_row + v0 + o_v, (b_x * b_scale).to(p_x.dtype.element_ty), mask=m_v)


def _launch_fwd(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    adv: torch.Tensor,
    coef: torch.Tensor,
    old: torch.Tensor | None,
    ref: torch.Tensor | None,
    dlogits: torch.Tensor | None,
    temperature: float,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    with_entropy: bool,
) -> dict[str, torch.Tensor]:
    """Run the forward kernel; every output is a flat ``(B * T,)`` tensor."""
    B, T, V = logits.shape
    N = B * T
    dev = logits.device
    out = {
        "loss": torch.empty(N, dtype=torch.float32, device=dev),
        "logp": torch.empty(N, dtype=torch.float32, device=dev),
        "clipped": torch.empty(N, dtype=torch.int8, device=dev),
    }
    out["entropy"] = torch.empty(N, dtype=torch.float32, device=dev) if with_entropy else out["logp"]
    out["kl"] = torch.empty(N, dtype=torch.float32, device=dev) if ref is not None else out["logp"]
    if N == 0:
        return out
    grad = logits if dlogits is None else dlogits  # unused pointer when no gradient is wanted
    block_v, num_warps = launch_config(V, dev)
    _rspo_loss_fwd_kernel[(N,)](
        logits,
        target_ids,
        adv,
        coef,
        adv if old is None else old,
        adv if ref is None else ref,
        out["loss"],
        out["logp"],
        out["entropy"],
        out["clipped"],
        out["kl"],
        grad,
        T,
        V,
        logits.stride(0),
        logits.stride(1),
        grad.stride(0),
        grad.stride(1),
        1.0 / temperature,
        epsilon_low,
        epsilon_high,
        beta,
        HAS_OLD=old is not None,
        HAS_REF=ref is not None,
        USE_KL=ref is not None and beta != 0.0,
        WITH_ENTROPY=with_entropy,
        WITH_GRAD=dlogits is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return out


def _flat_f32(x: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, T)`` -> contiguous ``(B * T,)`` float32 (O(tokens); expands per-response weights)."""
    return None if x is None else x.reshape(-1).to(torch.float32).contiguous()


def _launch_scale(x: torch.Tensor, scale: torch.Tensor) -> None:
    B, T, V = x.shape
    if B * T == 0:
        return
    block_v, num_warps = launch_config(V, x.device)
    _scale_rows_kernel[(B * T,)](
        x, scale.reshape(1).contiguous(), T, V, x.stride(0), x.stride(1), BLOCK_V=block_v, num_warps=num_warps
    )


class RSPOLossFunction(torch.autograd.Function):
    """Fused RSPO loss; ``forward`` also produces ``dL/dlogits``, ``backward`` only scales it."""

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
    ) -> torch.Tensor:
        B, T, V = logits.shape
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        m = mask.to(torch.float32)
        coef = aggregation_coefficients(m, loss_agg_mode, max_response_length).reshape(-1).contiguous()
        dlogits = None
        if ctx.needs_input_grad[0]:
            dlogits = logits if inplace_backward else torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
        out = _launch_fwd(
            logits,
            target_ids.reshape(-1).contiguous(),
            _flat_f32(adv),
            coef,
            _flat_f32(old_logprobs),
            _flat_f32(ref_logprobs),
            dlogits,
            temperature,
            epsilon_low,
            epsilon_high,
            beta,
            with_entropy=stats_out is not None,
        )
        loss = (coef * out["loss"]).sum()
        if stats_out is not None:
            stats_out.update(
                summarize_stats(
                    m.reshape(-1),
                    out["logp"],
                    out["entropy"],
                    out["clipped"].bool(),
                    _flat_f32(old_logprobs),
                    out["kl"] if ref_logprobs is not None else None,
                )
            )
        ctx.save_for_backward(dlogits)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (dlogits,) = ctx.saved_tensors
        # One backward only (as in Liger-Kernel): the buffer is scaled in place.
        _launch_scale(dlogits, grad_output.to(torch.float32))
        return (dlogits,) + (None,) * 13


def rspo_loss_triton(
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
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fused RSPO loss; same contract as :func:`rspo_kernels.loss_reference.rspo_loss_reference`.

    ``logits`` is ``(B, T, V)`` float16/bfloat16/float32 with a contiguous last dimension (other
    strides are free). The loss is float32.
    """
    stats: dict | None = {} if return_stats else None
    loss = RSPOLossFunction.apply(
        *fused_loss_args(
            logits, target_ids, weights, mask, old_logprobs, ref_logprobs, temperature,
            epsilon_low, epsilon_high, beta, loss_agg_mode, max_response_length, inplace_backward,
        ),
        stats,
    )
    return (loss, stats) if return_stats else loss
