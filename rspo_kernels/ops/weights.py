"""Triton kernels for the RSPO weights (Pass@k and Max@k) on the canonical grouped layout.

One pair of kernels serves the dense ``(B, n)`` layout and ragged groups alike: the groups are
described by ``offsets`` and cut into chunks of ``BLOCK`` slots (``prepare_chunks``), and a 1-D
grid runs over chunks, so one huge group and many small ones both fill the device.

* pass 1 (``_rspo_chunk_sums_kernel``): each chunk reduces its terms to one float64 sum;
* glue (torch, O(#chunks)): per-group totals and exclusive per-group carries of those sums;
* pass 2 (``_rspo_weights_kernel``): each chunk rebuilds its terms and writes the weights.

Max@k uses Theorem C.4 summed by parts (see :mod:`rspo_kernels.weights.estimators`): on the ascending
sort ``w = k * cumsum_j q(j) (v[j] - v[j-1])`` with ``q(j) = C(j, k-1) / C(n-1, k-1)``; gaps
vanish inside tie runs, so ties need no extra pass. Pass@k (Theorem 4.3) needs no sort:
``w = k q(n - c) R`` with ``c`` the group's total. ``q`` comes from a host-computed float64
log-factorial table (no libdevice, so the kernels also run under ``TRITON_INTERPRET=1``).
OrderGrad / MaxPO (``"ordergrad"``) has its own kernels of the same two-pass shape: its sorted gap
form (``estimators._max_ordergrad``) needs a prefix sum of ``a(j) gap_j`` and a suffix sum of
``b(j) gap_j``, the latter as the group total minus the inclusive prefix; its Pass@k form needs only
the per-group count. The other estimators are not kernel-worthy hot paths; this backend hands them
to the specification on the same device.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

import rspo_kernels.weights.estimators as estimators
from rspo_kernels.ops._grid import row_grid
from rspo_kernels.weights._layout import Groups, sort_within_groups

__all__ = ["grouped_weights", "prepare_chunks"]


@triton.jit
def _q_ratio(j, n, k, p_lf, m_valid):
    """``q(j) = C(j, k-1) / C(n-1, k-1)`` in float64 from the log-factorial table; 0 where j < k-1."""
    ok = m_valid & (j >= k - 1)
    jj = tl.where(ok, j, k - 1)
    log_num = tl.load(p_lf + jj, mask=ok, other=0.0) - tl.load(p_lf + jj - k + 1, mask=ok, other=0.0)
    log_den = tl.load(p_lf + n - 1) - tl.load(p_lf + n - k)
    return tl.where(ok, tl.exp(log_num - log_den), 0.0)


@triton.jit
def _chunk_slots(i_c, p_offsets, p_chunks, BLOCK: tl.constexpr):
    """Group, its first slot and size, and the ``[BLOCK]`` slot offsets and mask of chunk ``i_c``."""
    i_g = tl.load(p_chunks + 2 * i_c)
    i_b = tl.load(p_chunks + 2 * i_c + 1)
    start = tl.load(p_offsets + i_g)
    n = tl.load(p_offsets + i_g + 1) - start
    o_slot = i_b * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    return i_g, start, n, o_slot, o_slot < n


@triton.jit
def _chunk_terms(p_v, start, o_slot, n, k, p_lf, m_slot, IS_PASS: tl.constexpr):
    """The summands of one chunk, float64 ``[BLOCK]``: ``R != 0`` (Pass@k) or ``q(j) * gap_j`` (Max@k)."""
    b_v = tl.load(p_v + start + o_slot, mask=m_slot, other=0.0).to(tl.float64)
    if IS_PASS:
        return tl.where(b_v != 0.0, 1.0, 0.0).to(tl.float64)  # non-zero counts as correct
    b_prev = tl.load(p_v + start + o_slot - 1, mask=m_slot & (o_slot > 0), other=0.0).to(tl.float64)
    b_gap = tl.where(o_slot > 0, b_v - b_prev, 0.0)
    return _q_ratio(o_slot, n, k, p_lf, m_slot) * b_gap


@triton.jit
def _rspo_chunk_sums_kernel(p_v, p_offsets, p_chunks, p_sums, p_lf, k, IS_PASS: tl.constexpr, BLOCK: tl.constexpr):
    i_c = tl.program_id(0)
    i_g, start, n, o_slot, m_slot = _chunk_slots(i_c, p_offsets, p_chunks, BLOCK)
    b_t = _chunk_terms(p_v, start, o_slot, n, k, p_lf, m_slot, IS_PASS)  # [BLOCK]
    tl.store(p_sums + i_c, tl.sum(tl.where(m_slot, b_t, 0.0), axis=0))


@triton.jit
def _rspo_weights_kernel(
    p_v,
    p_order,
    p_out,
    p_offsets,
    p_chunks,
    p_carry,
    p_total,
    p_lf,
    k,
    IS_PASS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_g, start, n, o_slot, m_slot = _chunk_slots(i_c, p_offsets, p_chunks, BLOCK)
    b_t = _chunk_terms(p_v, start, o_slot, n, k, p_lf, m_slot, IS_PASS)  # [BLOCK]
    if IS_PASS:
        # c is the group's number of correct answers; q(n - c) is one scalar per group.
        n_wrong = n - tl.load(p_total + i_g).to(tl.int64)
        b_q = _q_ratio(n_wrong + 0 * o_slot, n, k, p_lf, m_slot)
        b_w = k * b_q * b_t
        tl.store(p_out + start + o_slot, b_w.to(p_out.dtype.element_ty), mask=m_slot)
    else:
        b_w = k * (tl.cumsum(b_t, axis=0) + tl.load(p_carry + i_c))
        o_dst = tl.load(p_order + start + o_slot, mask=m_slot, other=0)
        tl.store(p_out + o_dst, b_w.to(p_out.dtype.element_ty), mask=m_slot)


@triton.jit
def _ordergrad_terms(p_v, start, o_slot, n, k, p_lf, m_slot):
    """``(a(j) gap_j, b(j) gap_j)`` of one chunk of a sorted group, float64 ``[BLOCK]`` each.

    ``a(j) = C(j, k)/C(n-1, k)`` and ``b(j) = C(j-1, k-1)/C(n-1, k-1) (n-j)/(n-k)`` are ``q`` ratios
    of ``k + 1`` and ``k``; ``gap_j = v[j] - v[j-1]`` (0 at the group's first slot).
    """
    b_v = tl.load(p_v + start + o_slot, mask=m_slot, other=0.0).to(tl.float64)
    b_prev = tl.load(p_v + start + o_slot - 1, mask=m_slot & (o_slot > 0), other=0.0).to(tl.float64)
    b_gap = tl.where(o_slot > 0, b_v - b_prev, 0.0)
    b_up = _q_ratio(o_slot, n, k + 1, p_lf, m_slot) * b_gap
    b_share = (n - o_slot).to(tl.float64) / (n - k).to(tl.float64)
    b_down = _q_ratio(o_slot - 1, n, k, p_lf, m_slot & (o_slot > 0)) * b_share * b_gap
    return b_up, b_down


@triton.jit
def _ordergrad_chunk_sums_kernel(p_v, p_offsets, p_chunks, p_up, p_down, p_lf, k, BLOCK: tl.constexpr):
    i_c = tl.program_id(0)
    i_g, start, n, o_slot, m_slot = _chunk_slots(i_c, p_offsets, p_chunks, BLOCK)
    b_up, b_down = _ordergrad_terms(p_v, start, o_slot, n, k, p_lf, m_slot)  # [BLOCK] each
    tl.store(p_up + i_c, tl.sum(tl.where(m_slot, b_up, 0.0), axis=0))
    tl.store(p_down + i_c, tl.sum(tl.where(m_slot, b_down, 0.0), axis=0))


@triton.jit
def _ordergrad_weights_kernel(
    p_v,
    p_order,
    p_out,
    p_offsets,
    p_chunks,
    p_carry_up,
    p_carry_down,
    p_total_down,
    p_lf,
    k,
    BLOCK: tl.constexpr,
):
    """``A = k [prefix of a gap  -  (group total - inclusive prefix) of b gap]`` on sorted slots."""
    i_c = tl.program_id(0)
    i_g, start, n, o_slot, m_slot = _chunk_slots(i_c, p_offsets, p_chunks, BLOCK)
    b_up, b_down = _ordergrad_terms(p_v, start, o_slot, n, k, p_lf, m_slot)
    b_prefix_up = tl.cumsum(b_up, axis=0) + tl.load(p_carry_up + i_c)
    b_prefix_down = tl.cumsum(b_down, axis=0) + tl.load(p_carry_down + i_c)
    b_w = k * (b_prefix_up - (tl.load(p_total_down + i_g) - b_prefix_down))
    o_dst = tl.load(p_order + start + o_slot, mask=m_slot, other=0)
    tl.store(p_out + o_dst, b_w.to(p_out.dtype.element_ty), mask=m_slot)


@triton.jit
def _ordergrad_pass_kernel(p_v, p_out, p_offsets, p_chunks, p_total, p_lf, k, BLOCK: tl.constexpr):
    """Binary rewards, ``c`` correct: ``k C(n-c, k)/C(n-1, k)`` or ``-k c/(n-k) C(n-1-c, k-1)/C(n-1, k-1)``."""
    i_c = tl.program_id(0)
    i_g, start, n, o_slot, m_slot = _chunk_slots(i_c, p_offsets, p_chunks, BLOCK)
    b_r = tl.load(p_v + start + o_slot, mask=m_slot, other=0.0)
    c = tl.load(p_total + i_g).to(tl.int64)
    n_wrong = n - c + 0 * o_slot  # [BLOCK]
    b_correct = k * _q_ratio(n_wrong, n, k + 1, p_lf, m_slot)
    b_scale = c.to(tl.float64) / (n - k).to(tl.float64)
    b_wrong = 0.0 - k * b_scale * _q_ratio(n_wrong - 1, n, k, p_lf, m_slot)
    b_w = tl.where(b_r != 0.0, b_correct, b_wrong)  # non-zero counts as correct
    tl.store(p_out + start + o_slot, b_w.to(p_out.dtype.element_ty), mask=m_slot)


def prepare_chunks(sizes: np.ndarray, block: int, device: torch.device, uniform: int | None = None) -> torch.Tensor:
    """``(C, 2)`` int64 ``[group, chunk-in-group]`` for every ``block``-slot chunk of every group.

    Equal-size groups get their chunks built on the device (no host-to-device copy in a training
    step); ragged groups, whose sizes live on the host anyway, build them with numpy.
    """
    if uniform is not None:
        per = -(-uniform // block)
        index = torch.arange(sizes.shape[0] * per, dtype=torch.int64, device=device)
        return torch.stack([index // per, index % per], dim=1)
    per_group = -(-sizes // block)
    groups = np.repeat(np.arange(sizes.shape[0], dtype=np.int64), per_group)
    first = np.repeat(np.cumsum(per_group) - per_group, per_group)
    chunks = np.stack([groups, np.arange(groups.shape[0], dtype=np.int64) - first], axis=1)
    return torch.from_numpy(np.ascontiguousarray(chunks)).to(device, non_blocking=True)


def chunk_offsets(sizes: np.ndarray, block: int, device: torch.device, uniform: int | None = None) -> torch.Tensor:
    """``(G + 1,)`` int64 offsets of each group's run of chunks in :func:`prepare_chunks`' order."""
    if uniform is not None:
        per = -(-uniform // block)
        return torch.arange(0, (sizes.shape[0] + 1) * per, per, dtype=torch.int64, device=device)
    offsets = np.zeros(sizes.shape[0] + 1, dtype=np.int64)
    np.cumsum(-(-sizes // block), out=offsets[1:])
    return torch.from_numpy(offsets).to(device, non_blocking=True)


def _block_size(n_max: int) -> int:
    # The interpreter runs blocks as numpy arrays: keep them small there.
    cap = 256 if os.environ.get("TRITON_INTERPRET") == "1" else 1024
    return max(16, min(cap, triton.next_power_of_2(max(int(n_max), 1))))


def _rspo_weights(groups: Groups, k: int, objective: str) -> torch.Tensor:
    values = groups.values
    device = values.device
    sizes = groups.sizes
    is_pass = objective == "pass@k"
    if k == 1:  # plain policy gradient: w = R (R != 0 for Pass@k)
        return (values != 0).to(values.dtype) if is_pass else values.clone()
    block = _block_size(int(sizes.max()))
    chunks = prepare_chunks(sizes, block, device, groups.group_size)
    n_chunks = chunks.shape[0]
    if is_pass:
        v, order = values, values.new_empty(0, dtype=torch.int64)  # no sort: order unused
    else:
        v, order = sort_within_groups(groups)
    v = v.contiguous()
    log_factorial = torch.lgamma(torch.arange(int(sizes.max()) + 2, dtype=torch.float64, device=device) + 1)
    sums = torch.empty(n_chunks, dtype=torch.float64, device=device)
    _rspo_chunk_sums_kernel[row_grid(n_chunks, "chunks")](
        v, groups.offsets, chunks, sums, log_factorial, k, IS_PASS=is_pass, BLOCK=block
    )
    # Chunks are stored group after group, so per-group scans of `sums` are segment scans.
    chunk_group = chunks[:, 0]
    total = torch.zeros(groups.num_groups, dtype=torch.float64, device=device).index_add_(0, chunk_group, sums)
    if is_pass:
        carry = sums  # unused: Pass@k needs only the group totals
    else:
        # Exclusive per-group prefix of the chunk sums, scanned group by group: a global prefix
        # minus the groups before would round each group's carry at the scale of earlier groups.
        per_group = -(-sizes // block)
        uniform = int(per_group[0]) if groups.group_size is not None else None
        chunk_groups = Groups(sums, chunk_offsets(sizes, block, device, groups.group_size), uniform, per_group)
        carry = estimators.segment_cumsum(sums, chunk_groups, exclusive=True)
    out = torch.empty_like(values)
    _rspo_weights_kernel[row_grid(n_chunks, "chunks")](
        v, order, out, groups.offsets, chunks, carry, total, log_factorial, k, IS_PASS=is_pass, BLOCK=block
    )
    return out


def _ordergrad_weights(groups: Groups, k: int, objective: str) -> torch.Tensor:
    """OrderGrad / MaxPO on the grouped layout (every group has ``n > k``, validated)."""
    values = groups.values
    device = values.device
    sizes = groups.sizes
    block = _block_size(int(sizes.max()))
    chunks = prepare_chunks(sizes, block, device, groups.group_size)
    n_chunks = chunks.shape[0]
    log_factorial = torch.lgamma(torch.arange(int(sizes.max()) + 2, dtype=torch.float64, device=device) + 1)
    chunk_group = chunks[:, 0]
    out = torch.empty_like(values)
    v = values.contiguous()
    if objective == "pass@k":
        counts = torch.empty(n_chunks, dtype=torch.float64, device=device)
        _rspo_chunk_sums_kernel[row_grid(n_chunks, "chunks")](
            v, groups.offsets, chunks, counts, log_factorial, k, IS_PASS=True, BLOCK=block
        )
        total = torch.zeros(groups.num_groups, dtype=torch.float64, device=device).index_add_(0, chunk_group, counts)
        _ordergrad_pass_kernel[row_grid(n_chunks, "chunks")](
            v, out, groups.offsets, chunks, total, log_factorial, k, BLOCK=block
        )
        return out
    v, order = sort_within_groups(groups)
    v = v.contiguous()
    up = torch.empty(n_chunks, dtype=torch.float64, device=device)
    down = torch.empty_like(up)
    _ordergrad_chunk_sums_kernel[row_grid(n_chunks, "chunks")](
        v, groups.offsets, chunks, up, down, log_factorial, k, BLOCK=block
    )
    per_group = -(-sizes // block)
    uniform = int(per_group[0]) if groups.group_size is not None else None
    chunk_groups = Groups(up, chunk_offsets(sizes, block, device, groups.group_size), uniform, per_group)
    carry_up = estimators.segment_cumsum(up, chunk_groups, exclusive=True)
    carry_down = estimators.segment_cumsum(down, chunk_groups, exclusive=True)
    total_down = torch.zeros(groups.num_groups, dtype=torch.float64, device=device).index_add_(0, chunk_group, down)
    _ordergrad_weights_kernel[row_grid(n_chunks, "chunks")](
        v, order, out, groups.offsets, chunks, carry_up, carry_down, total_down, log_factorial, k, BLOCK=block
    )
    return out


def grouped_weights(groups: Groups, k: int, objective: str, estimator: str) -> torch.Tensor:
    """Backend entry point with the specification's signature (see ``estimators.grouped_weights``).

    Parameters
    ----------
    groups : Groups
        Canonical layout on a CUDA device (or CPU under ``TRITON_INTERPRET=1``).
    k : int
    objective : {"pass@k", "max@k"}
    estimator : str
        ``"rspo"`` and ``"ordergrad"`` run the kernels; other estimators run the specification on
        the same device.

    Returns
    -------
    torch.Tensor
        ``(N,)`` weights in the grouped order, dtype of ``groups.values``.
    """
    if estimator not in ("rspo", "ordergrad") or groups.values.numel() == 0:
        return estimators.grouped_weights(groups, k, objective, estimator)
    if estimator == "ordergrad":
        return _ordergrad_weights(groups, k, objective)
    return _rspo_weights(groups, k, objective)
