"""Maximum-likelihood RL (MaxRL) weights in plain torch: the specification.

MaxRL (Tajwar et al., arXiv 2602.02710) trains on ``log p`` with ``p`` the probability that one
response is correct. Its Maclaurin series ``log p = -sum_{k>=1} (1-p)^k / k`` gives

    grad log p = sum_{k>=1} (1/k) grad pass@k,      J_T = sum_{k=1}^{T} (1/k) pass@k,

and the truncation ``J_T`` (order ``T``) has unbiased estimators from ``n >= T`` samples. Every
estimator here is on the library's scale, ``E[(1/n) sum_i w_i grad log pi(y_i)] = grad J_T``, and
depends on a response only through its reward ``R_i`` and the number ``c_i`` of correct responses
among the ``n - 1`` others (docs/math.md § MaxRL). Each one is ``w_i = d(c_i) R_i + b(c_i)`` with

    d(c') = sum_{j=0}^{T-1} C(n-1-c', j) / C(n-1, j),

the unique unbiased estimator (from ``n - 1`` Bernoulli draws) of ``sum_{k=1}^{T} (1-p)^{k-1}``,
and a baseline ``b`` that depends on the others only (so it adds nothing to the expectation).
The partial sums close (:func:`_ratio_sums`):

    sum_{j=0}^{J} C(F, j) / C(m, j) = (m+1)/(m+1-F) * (1 - C(F, J+1) / C(m+1, J+1)),

so ``d(c') = n / (c'+1) * pass@T(n, c'+1)``, one expression per response whatever ``T``.

Works on the canonical layout :class:`~rspo_kernels.weights._layout.Groups`; the public API
(:func:`rspo_kernels.maxrl_weights`) validates the input first. Arithmetic is float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rspo_kernels.weights._layout import Groups
from rspo_kernels.weights.estimators import _segment_sum

__all__ = ["MAXRL_ESTIMATORS", "grouped_maxrl_weights", "group_orders"]

# "rspo" (default): sum of (1/k) RSPO Pass@k weights, zero for failures. "maclaurin",
# "cross_fitted", "vr_cond": the authors' released estimators (n times their advantages).
# "rloo": our leave-one-out baseline on top of "rspo" (unbiased).
MAXRL_ESTIMATORS = ("rspo", "rloo", "maclaurin", "cross_fitted", "vr_cond")

_F64 = torch.float64


def _log_miss(groups: Groups, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per group ``log(C(n-a, T) / C(n, T))`` (``-inf`` when ``n - a < T``), ``(G,)`` float64.

    ``a`` and ``t`` are ``(G,)`` with ``1 <= a, T <= n``. The product form with ``min(a, T)``
    factors, summed as ``log1p`` (docs/math.md § Evaluation metrics): a difference of
    log-factorials would lose the relative precision of ``1 - ratio`` when it is small (``1/n``).
    Factor ``j`` lives in slot ``j`` of its group, so one segment sum serves every group.
    """
    seg = groups.segment_ids()
    n_g = (groups.offsets[1:] - groups.offsets[:-1]).to(_F64)
    n, a_s, t_s = n_g[seg], a[seg], t[seg]
    j = (torch.arange(seg.numel(), device=seg.device) - groups.offsets[:-1][seg]).to(_F64)
    # prod_{j<a} (1 - T/(n-j)) when a <= T, else prod_{j<T} (1 - a/(n-j)); all factors in (0, 1].
    factor = torch.where(a_s <= t_s, torch.log1p(-t_s / (n - j)), torch.log1p(-a_s / (n - j)))
    active = (j < torch.minimum(a_s, t_s)) & (n - a_s >= t_s)
    out = _segment_sum(torch.where(active, factor, torch.zeros_like(factor)), groups, seg)
    return torch.where(n_g - a < t, torch.full_like(out, -torch.inf), out)


def _ratio_sums(groups: Groups, r: torch.Tensor, c_others: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """``sum_{j=0}^{top} C(F, j) / C(n-1, j)`` per sample, ``F = n-1-c'`` failures among the others.

    ``top`` is ``(G,)``. Closed form (it telescopes by Pascal's rule):
    ``sum_{j=0}^{J} C(F, j)/C(m, j) = (m+1)/(m+1-F) (1 - C(F, J+1)/C(m+1, J+1))``; with ``m = n-1``
    and ``a = c'+1`` the ratio is ``C(n-a, J+1)/C(n, J+1)``, the chance that J+1 of the n responses
    miss ``a`` given ones. ``a`` is the group's ``c`` for a correct response and ``c+1`` for a
    wrong one, so two :func:`_log_miss` per group cover every sample.
    """
    seg = groups.segment_ids()
    n_g = (groups.offsets[1:] - groups.offsets[:-1]).to(_F64)
    c_g = _segment_sum(r, groups, seg)
    t_g = top + 1
    lm_correct = _log_miss(groups, c_g.clamp(min=1), t_g)
    lm_wrong = _log_miss(groups, torch.minimum(c_g + 1, n_g), t_g)
    log_ratio = torch.where(r != 0, lm_correct[seg], lm_wrong[seg])
    return n_g[seg] / (c_others + 1) * -torch.expm1(log_ratio)


def group_orders(groups: Groups, order: int | None) -> torch.Tensor:
    """Per-group order ``T`` (float64 ``(G,)``): ``order``, or each group's size when None."""
    n = (groups.offsets[1:] - groups.offsets[:-1]).to(_F64)
    return n if order is None else torch.full_like(n, float(order))


@dataclass(frozen=True)
class _Batch:
    """Per-sample reward ``r`` (0/1), group size ``n`` and correct others ``c`` (``(N,)`` float64),
    with the per-group order ``t`` (``(G,)``)."""

    groups: Groups
    r: torch.Tensor
    n: torch.Tensor
    c: torch.Tensor
    t: torch.Tensor

    @classmethod
    def of(cls, groups: Groups, order: int | None) -> _Batch:
        r = (groups.values != 0).to(_F64)
        seg = groups.segment_ids()
        c = _segment_sum(r, groups, seg)[seg]
        n = (groups.offsets[1:] - groups.offsets[:-1]).to(_F64)[seg]
        return cls(groups, r, n, c - r, group_orders(groups, order))

    def signal(self) -> torch.Tensor:
        """``d(c') = sum_{k=1}^{T} C(n-1-c', k-1) / C(n-1, k-1)``: the weight ``"rspo"`` gives a success."""
        return _ratio_sums(self.groups, self.r, self.c, self.t - 1)


def _rspo(b: _Batch) -> torch.Tensor:
    """``sum_{k=1}^{T} (1/k) w^(k)`` with RSPO's Pass@k weights ``w^(k) = k C(n-c, k-1)/C(n-1, k-1) R``.

    In closed form ``R_i * n * pass@T / c``, with ``pass@T = 1 - C(n-c, T)/C(n, T)`` the unbiased
    pass@T of the group; 0 for failures, and ``n / c`` for successes at ``T = n``.
    """
    return b.r * b.signal()


def _rloo(b: _Batch) -> torch.Tensor:
    """``d(c_i) (R_i - c_i / (n-1))``: ``"rspo"`` minus the leave-one-out baseline ``d(c_i) c_i / (n-1)``.

    ``c_i / (n-1)`` is the others' success rate, so the baseline is the others' estimate of the
    expected weight ``d R``; built from the others only, it keeps the estimator unbiased. A group
    of one has no others: its baseline is 0. ``T = 1`` gives RLOO, ``n/(n-1) (R_i - mean R)``.
    """
    rate = torch.where(b.n > 1, b.c / (b.n - 1).clamp(min=1), torch.zeros_like(b.c))
    return b.signal() * (b.r - rate)


def _maclaurin(b: _Batch) -> torch.Tensor:
    """The authors' ``maclaurin_weights`` times n: success 1, failure ``1 - d(c_i)``.

    Their failure weight is ``-(1/n) sum_{k=2}^{T} C(f-1, k-1)/C(n-1, k-1)`` (f failures in the
    group), i.e. ``"rspo"`` plus the baseline ``1 - d(c_i)``: unbiased.
    """
    return torch.where(b.r != 0, torch.ones_like(b.r), 1 - b.signal())


def _cross_fitted(b: _Batch) -> torch.Tensor:
    """The authors' ``maclaurin_weights_cross_fitted`` times n.

    ``"maclaurin"`` plus, for each order ``k = 2 .. min(T, n // 2)``, the baseline
    ``C(F_i, k) / C(n-1, k)`` (``F_i`` failures among the others: the others' unbiased estimate of
    ``(1-p)^k``). Their code averages it over disjoint (k-1)- and k-subsets (eq. 84-85), which
    is this ratio (Vandermonde), and leaves it out when ``n < 2k``. Unbiased.
    """
    n_g = (b.groups.offsets[1:] - b.groups.offsets[:-1]).to(_F64)
    top = torch.minimum(b.t, torch.div(n_g, 2, rounding_mode="floor"))
    f_others = b.n - 1 - b.c
    # sum_{k=2}^{top} is sum_{k=0}^{top} minus the k = 0, 1 terms (1 and F/(n-1)).
    full = _ratio_sums(b.groups, b.r, b.c, top.clamp(min=1))
    baseline = full - 1 - f_others / (b.n - 1).clamp(min=1)
    return _maclaurin(b) + torch.where(top[b.groups.segment_ids()] >= 2, baseline, torch.zeros_like(full))


def _vr_cond(b: _Batch) -> torch.Tensor:
    """The authors' ``vr_cond_weights`` times n: success ``(n - a)/a``, failure -1 (``a`` successes).

    It equals ``"rspo"`` at ``T = n`` (``n/a`` for a success) minus the constant 1: unbiased for
    ``grad J_n``, and the ratio estimator (consistent, biased) of ``grad log p``.
    """
    a = b.c + b.r
    return torch.where(b.r != 0, (b.n - a) / a.clamp(min=1), -torch.ones_like(b.r))


_TABLE: dict[str, Callable[[_Batch], torch.Tensor]] = {
    "rspo": _rspo,
    "rloo": _rloo,
    "maclaurin": _maclaurin,
    "cross_fitted": _cross_fitted,
    "vr_cond": _vr_cond,
}


def grouped_maxrl_weights(groups: Groups, order: int | None, estimator: str) -> torch.Tensor:
    """Per-sample MaxRL weights for validated, grouped binary rewards.

    Parameters
    ----------
    groups : Groups
        Canonical layout; ``values`` ``(N,)`` float32 or float64, any non-zero value counts as
        correct.
    order : int or None
        Truncation order ``T``, ``1 <= T <= n`` for every group (checked by the caller); None
        means each group's own size.
    estimator : {"rspo", "rloo", "maclaurin", "cross_fitted", "vr_cond"}

    Returns
    -------
    torch.Tensor
        ``(N,)`` weights in the grouped order, dtype of ``groups.values``.
    """
    if groups.values.numel() == 0:
        return groups.values.clone()
    w = _TABLE[estimator](_Batch.of(groups, order))
    return w.to(groups.values.dtype)
