"""Small ``@triton.jit`` helpers shared by the log-prob kernels: the softmax math lives here once.

Every helper works on one row of logits (one token) held in float32 registers, a vocabulary block at
a time. They use only ``tl.exp``, ``tl.log``, ``tl.max``, ``tl.sum`` and ``tl.where``, so they run
unchanged under ``TRITON_INTERPRET=1`` (no libdevice).
"""

import triton
import triton.language as tl


@triton.jit
def tanh_exp(b_y):
    """``tanh(y)`` from ``tl.exp`` alone (libdevice's tanh fails under the interpreter).

    The sign-symmetric form ``sign(y) (1 - e) / (1 + e)``, ``e = exp(-2 |y|) <= 1``, never overflows.
    """
    b_e = tl.exp(-2.0 * tl.abs(b_y))
    b_t = (1.0 - b_e) / (1.0 + b_e)
    return tl.where(b_y < 0, -b_t, b_t)


@triton.jit
def softcap_block(b_z, softcap):
    """``c * tanh(z / c)`` (Gemma's final-logit soft-capping); ``-inf`` (masking, past the end) stays ``-inf``."""
    return tl.where(b_z == float("-inf"), b_z, softcap * tanh_exp(b_z / softcap))


@triton.jit
def softcap_grad_block(b_x, temperature_over_cap):
    """``1 - tanh(z / c)^2`` from the capped, scaled ``x = c tanh(z / c) / T``; 0 where ``x = -inf``."""
    b_t = b_x * temperature_over_cap
    return tl.maximum(1.0 - b_t * b_t, 0.0)


@triton.jit
def load_scaled_block(p_row, o_v, V, inv_temperature, softcap, SOFTCAP: tl.constexpr):
    """Load ``cap(logits[o_v]) / T`` as float32, ``-inf`` past the end of the vocabulary."""
    m_v = o_v < V
    b_z = tl.load(p_row + o_v, mask=m_v, other=float("-inf")).to(tl.float32)  # [BV]
    if SOFTCAP:
        b_z = softcap_block(b_z, softcap)
    return b_z * inv_temperature, m_v


@triton.jit
def finite_or_zero(b_m):
    """The running max as an exp offset: ``-inf`` (nothing finite seen yet) becomes 0.

    A first block of ``-inf`` logits (vocabulary masking) would otherwise give
    ``exp(-inf - -inf) = NaN``; with offset 0 those entries add ``exp(-inf) = 0``.
    """
    return tl.where(b_m == float("-inf"), 0.0, b_m)


@triton.jit
def online_lse_update(b_m, b_s, b_x):
    """One step of the streaming log-sum-exp: running max ``b_m`` and ``b_s = sum exp(x - b_m)``."""
    b_m_new = tl.maximum(b_m, tl.max(b_x, axis=0))
    b_off = finite_or_zero(b_m_new)
    # exp(-inf - finite) = 0 wipes the empty initial state; no special case needed.
    b_s = b_s * tl.exp(b_m - b_off) + tl.sum(tl.exp(b_x - b_off), axis=0)
    return b_m_new, b_s


@triton.jit
def online_lse_entropy_update(b_m, b_s, b_t, b_x):
    """Streaming log-sum-exp plus ``b_t = sum exp(x - b_m) * (x - b_m)`` for the entropy.

    When the max moves from ``m`` to ``m'`` every ``(x - m)`` gains ``m - m'`` and every weight is
    scaled by ``alpha = exp(m - m')``, hence ``t' = alpha * (t + s * (m - m'))``. Then
    ``entropy = log(s) - t / s``.
    """
    b_m_new = tl.maximum(b_m, tl.max(b_x, axis=0))
    b_off = finite_or_zero(b_m_new)
    b_alpha = tl.exp(b_m - b_off)
    b_e = tl.exp(b_x - b_off)  # [BV], 0 past the vocabulary and at -inf logits
    b_d = tl.where(b_e > 0, b_x - b_off, 0.0)  # [BV], p log p -> 0: never 0 * -inf
    b_dm = tl.where(b_s > 0, b_m - b_off, 0.0)  # s = 0 while m = -inf: avoid 0 * -inf
    b_t = b_alpha * (b_t + b_s * b_dm) + tl.sum(b_e * b_d, axis=0)
    b_s = b_s * b_alpha + tl.sum(b_e, axis=0)
    return b_m_new, b_s, b_t


@triton.jit
def lse_block_update(b_m, b_s, b_t, b_x, WITH_ENTROPY: tl.constexpr):
    """One vocabulary block of a row's streaming ``(max, s, t)``; ``t`` stays 0 without entropy.

    The loop over blocks stays in the kernels: Triton 3.6's interpreter passes a runtime ``V`` into
    a helper as a 1-element array, which ``range()`` cannot take.
    """
    if WITH_ENTROPY:
        b_m, b_s, b_t = online_lse_entropy_update(b_m, b_s, b_t, b_x)
    else:
        b_m, b_s = online_lse_update(b_m, b_s, b_x)
    return b_m, b_s, b_t


@triton.jit
def softmax_grad_block(b_x, b_lse, m_target, b_g):
    """``-b_g * softmax`` on one vocabulary block, and the block's softmax mass off the target.

    ``b_g`` already holds 1/T. The target's own entry, ``b_g * (1 - p_target)``, is the caller's to
    write once the row is done, from the summed off-target masses: ``1 - exp(x_t - lse)`` cancels
    for a confident target (``lse``'s rounding, ~1e-7 of ``|lse|``, against ``1 - p_t`` ~ 1e-5),
    while a sum of the other probabilities keeps float32's relative precision.
    """
    b_p = tl.exp(b_x - b_lse)  # [BV]
    return -b_p * b_g, tl.sum(tl.where(m_target, 0.0, b_p), axis=0)


@triton.jit
def entropy_grad_block(b_x, b_lse, b_mu, b_gh):
    """``b_gh * p * (x - E_p[x])`` on one vocabulary block: minus the entropy's share of ``dL/dx``.

    ``dH/dx = -p (x - E_p[x])``; ``b_gh`` already holds 1/T. ``p = 0`` (a ``-inf`` logit, or past
    the vocabulary) gives 0, never ``0 * -inf``.
    """
    b_p = tl.exp(b_x - b_lse)  # [BV]
    b_d = tl.where(b_p > 0, b_x - b_mu, 0.0)  # select before multiplying: 0 * -inf is never formed
    return b_p * b_d * b_gh
