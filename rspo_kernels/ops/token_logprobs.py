"""Triton kernel for the log-probability (and entropy) of given tokens: forward only.

Layout (Liger-Kernel's): the ``@triton.jit`` kernel, then the launcher that picks the block size
and the grid. There is no autograd.Function: old and reference log-probs are constants; the
differentiable path is :mod:`rspo_kernels.ops.rspo_loss`.

One program per token on a 1-D grid (so no grid dimension limits ``B * T``); each streams its row
of logits once through an online log-sum-exp in float32.
"""

import os

import torch
import triton
import triton.language as tl

from rspo_kernels.ops._softmax_helpers import row_logsumexp

__all__ = ["token_logprobs_triton", "launch_config"]


@triton.jit(do_not_specialize=["T", "stride_lb", "stride_lt"])
def _token_logprobs_kernel(
    p_logits,
    p_target,
    p_logp,
    p_entropy,
    T,
    V,
    stride_lb,
    stride_lt,
    inv_temperature,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_b = i_n // T
    i_t = i_n % T
    p_row = p_logits + i_b * stride_lb + i_t * stride_lt
    b_lse, b_s, b_t = row_logsumexp(p_row, V, inv_temperature, WITH_ENTROPY, BLOCK_V)

    # Out-of-range ids are clamped for memory safety; the public API validates them.
    target = tl.minimum(tl.maximum(tl.load(p_target + i_n), 0), V - 1)
    b_xt = tl.load(p_row + target).to(tl.float32) * inv_temperature
    tl.store(p_logp + i_n, b_xt - b_lse)
    if WITH_ENTROPY:
        tl.store(p_entropy + i_n, tl.log(b_s) - b_t / b_s)


LAUNCH_ENV = "RSPO_KERNELS_LOSS_LAUNCH"


def launch_config(vocab: int, device: torch.device) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for one row of ``vocab`` logits.

    On a GPU, 4096-wide blocks with 8 warps keep 16-byte loads busy for large vocabularies at 64
    registers per thread and no spills (ptxas, sm_90). Under the CPU interpreter, small blocks keep
    the NumPy emulation fast and exercise the multi-block path at test shapes. For tuning,
    ``RSPO_KERNELS_LOSS_LAUNCH=8192x16`` overrides both (``benchmarks/gpu.py --sweep`` uses it).
    """
    override = os.environ.get(LAUNCH_ENV)
    if override:
        block, warps = (int(v) for v in override.lower().split("x"))
        return min(triton.next_power_of_2(vocab), block), warps
    if device.type == "cpu":
        return min(triton.next_power_of_2(vocab), 128), 1
    return min(triton.next_power_of_2(vocab), 4096), 8


@torch.no_grad()
def token_logprobs_triton(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``target_ids`` under ``softmax(logits / temperature)``.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, T, V)`` float16/bfloat16/float32, last dimension contiguous (other strides free, so
        ``logits[:, :-1]`` needs no copy).
    target_ids : torch.Tensor
        ``(B, T)`` integer ids in ``[0, V)``.
    temperature : float
        Divides the logits.
    return_entropy : bool
        Also compute the entropy of each row.

    Returns
    -------
    torch.Tensor or tuple of torch.Tensor
        ``(B, T)`` float32 log-probs, and the entropies when asked (the contract of
        :func:`rspo_kernels.loss_reference.token_logprobs_reference`).
    """
    B, T, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    ids = target_ids.reshape(-1).contiguous()
    logp = torch.empty(B * T, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logp) if return_entropy else logp  # dummy pointer when unused
    if B * T > 0:
        block_v, num_warps = launch_config(V, logits.device)
        _token_logprobs_kernel[(B * T,)](
            logits,
            ids,
            logp,
            entropy,
            T,
            V,
            logits.stride(0),
            logits.stride(1),
            1.0 / temperature,
            WITH_ENTROPY=return_entropy,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
    return (logp.view(B, T), entropy.view(B, T)) if return_entropy else logp.view(B, T)
