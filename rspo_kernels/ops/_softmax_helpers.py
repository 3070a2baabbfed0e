"""Small ``@triton.jit`` helpers shared by the loss kernels: the math lives here once.

Every helper works on one row of logits (one token) held in float32 registers, a vocabulary block at
a time. They use only ``tl.exp``, ``tl.log``, ``tl.max``, ``tl.sum`` and ``tl.where``, so they run
unchanged under ``TRITON_INTERPRET=1`` (no libdevice).
"""

import triton
import triton.language as tl


@triton.jit
def load_scaled_block(p_row, o_v, V, inv_temperature):
    """Load ``logits[o_v] / T`` as float32, ``-inf`` past the end of the vocabulary."""
    m_v = o_v < V
    b_x = tl.load(p_row + o_v, mask=m_v, other=float("-inf")).to(tl.float32) * inv_temperature  # [BV]
    return b_x, m_v


@triton.jit
def online_lse_update(b_m, b_s, b_x):
    """One step of the streaming log-sum-exp: running max ``b_m`` and ``b_s = sum exp(x - b_m)``."""
    b_m_new = tl.maximum(b_m, tl.max(b_x, axis=0))
    # exp(-inf - finite) = 0 wipes the empty initial state; no special case needed.
    b_s = b_s * tl.exp(b_m - b_m_new) + tl.sum(tl.exp(b_x - b_m_new), axis=0)
    return b_m_new, b_s


@triton.jit
def online_lse_entropy_update(b_m, b_s, b_t, b_x, m_v):
    """Streaming log-sum-exp plus ``b_t = sum exp(x - b_m) * (x - b_m)`` for the entropy.

    When the max moves from ``m`` to ``m'`` every ``(x - m)`` gains ``m - m'`` and every weight is
    scaled by ``alpha = exp(m - m')``, hence ``t' = alpha * (t + s * (m - m'))``. Then
    ``entropy = log(s) - t / s``.
    """
    b_m_new = tl.maximum(b_m, tl.max(b_x, axis=0))
    b_alpha = tl.exp(b_m - b_m_new)
    b_e = tl.exp(b_x - b_m_new)  # [BV], 0 past the vocabulary
    b_d = tl.where(m_v, b_x - b_m_new, 0.0)  # [BV], avoids 0 * -inf
    b_dm = tl.where(b_s > 0, b_m - b_m_new, 0.0)  # s = 0 while m = -inf: avoid 0 * -inf
    b_t = b_alpha * (b_t + b_s * b_dm) + tl.sum(b_e * b_d, axis=0)
    b_s = b_s * b_alpha + tl.sum(b_e, axis=0)
    return b_m_new, b_s, b_t


@triton.jit
def row_logsumexp(p_row, V, inv_temperature, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """One pass over a row of ``V`` logits: ``(lse, s, t)`` of ``logits / T`` in float32.

    ``lse`` is the log-sum-exp; with ``WITH_ENTROPY`` the entropy is ``log(s) - t / s``
    (see :func:`online_lse_entropy_update`), otherwise ``t`` stays 0.
    """
    o_v = tl.arange(0, BLOCK_V)
    b_m = float("-inf")
    b_s = 0.0
    b_t = 0.0
    for v0 in range(0, V, BLOCK_V):
        b_x, m_v = load_scaled_block(p_row, v0 + o_v, V, inv_temperature)  # [BV]
        if WITH_ENTROPY:
            b_m, b_s, b_t = online_lse_entropy_update(b_m, b_s, b_t, b_x, m_v)
        else:
            b_m, b_s = online_lse_update(b_m, b_s, b_x)
    return b_m + tl.log(b_s), b_s, b_t


@triton.jit
def clipped_objective(b_logp, b_old, b_adv, eps_low, eps_high):
    """PPO clipped surrogate: ``(loss, dloss/dlogp, clipped)`` for one token.

    ``loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` with ``r = exp(logp - old)``. Only the
    unclipped branch depends on ``logp``; its derivative is ``-r A``.
    """
    b_ratio = tl.exp(b_logp - b_old)
    b_clip_ratio = tl.minimum(tl.maximum(b_ratio, 1.0 - eps_low), 1.0 + eps_high)
    b_sur = b_ratio * b_adv
    b_clip_sur = b_clip_ratio * b_adv
    b_clipped = b_clip_sur < b_sur
    b_loss = -tl.minimum(b_sur, b_clip_sur)
    b_dlogp = tl.where(b_clipped, 0.0, -b_sur)
    return b_loss, b_dlogp, b_clipped


@triton.jit
def k3_kl(b_logp, b_ref):
    """k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` and its derivative in ``logp``."""
    b_delta = b_ref - b_logp
    b_e = tl.exp(b_delta)
    return b_e - b_delta - 1.0, 1.0 - b_e


@triton.jit
def softmax_grad_block(b_x, b_lse, o_v, target, b_g):
    """``b_g * (onehot(target) - softmax)`` on one vocabulary block (``b_g`` already holds 1/T)."""
    b_p = tl.exp(b_x - b_lse)  # [BV]
    return (tl.where(o_v == target, 1.0, 0.0) - b_p) * b_g
