"""Pass@k / Max@k weights and metrics in plain torch: the readable specification.

Every function here takes the canonical layout :class:`~rspo_kernels.weights._layout.Groups` (values
stored group after group) and trusts that the public API validated it. All arithmetic is float64
whatever the input dtype; results come back in ``groups.values.dtype``. Every fast backend (C++,
Triton) is tested against this module, and this module is tested against brute force (subset
enumeration, the paper's Algorithm 2, exact expectations over small categorical policies).

Notation (docs/math.md): a group has ``n`` rewards, sorted ascending ``v[0] <= ... <= v[n-1]``
(0-based). For a sample size ``k`` the binomial ratio

    q(j) = C(j, k-1) / C(n-1, k-1),        j = 0 .. n-1,

is the probability that a uniformly random (k-1)-subset of the n-1 other samples lies entirely
among ``j`` given ones. All estimators are on the library's scale: for every group
``E[(1/n) sum_i w_i grad log pi(y_i)]`` equals the gradient of Pass@k (Max@k).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from rspo_kernels.weights._layout import Groups, sort_within_groups

__all__ = [
    "ESTIMATORS",
    "BINARY_ONLY_ESTIMATORS",
    "PASSK_TRAINING_EPS",
    "OBJECTIVES",
    "grouped_weights",
    "grouped_pass_at_k",
    "grouped_max_at_k",
    "segment_cumsum",
    "grouped_risk_sensitive_weights",
]

OBJECTIVES = ("pass@k", "max@k")
ESTIMATORS = ("rspo", "plugin", "hitchhiking", "pkpo", "pkpo_loo", "passk_training_std", "ordergrad")
# Estimators whose formula exists only for binary rewards (no Max@k form).
BINARY_ONLY_ESTIMATORS = ("passk_training_std",)
# Chen et al.'s released code adds this to the group std before dividing.
PASSK_TRAINING_EPS = 1e-6

_F64 = torch.float64


# --------------------------------------------------------------------------- segment helpers
def _log_binom(top: torch.Tensor, r: torch.Tensor | int) -> torch.Tensor:
    """``log C(top, r)`` in float64; ``-inf`` where ``r < 0`` or ``r > top`` (C is 0 there)."""
    top = top.to(_F64)
    r = torch.as_tensor(r, dtype=_F64, device=top.device)
    valid = (r >= 0) & (r <= top)
    safe_r = torch.where(valid, r, torch.zeros_like(r))
    safe_top = torch.where(valid, top, torch.zeros_like(top))
    out = torch.lgamma(safe_top + 1) - torch.lgamma(safe_r + 1) - torch.lgamma(safe_top - safe_r + 1)
    return torch.where(valid, out, torch.full_like(out, -torch.inf))


def _binom_ratio(top: torch.Tensor, r_top: int, bottom: torch.Tensor, r_bottom: int) -> torch.Tensor:
    """``C(top, r_top) / C(bottom, r_bottom)`` without forming either coefficient (docs/math.md § Numerics)."""
    return torch.exp(_log_binom(top, r_top) - _log_binom(bottom, r_bottom))


def _scan_rows(m: torch.Tensor, exclusive: bool, reverse: bool) -> torch.Tensor:
    """Cumulative sum along each row of ``m`` ``[R, W]``; exclusive scans shift instead of subtracting."""
    if reverse:
        m = m.flip(1)
    c = m.cumsum(dim=1)
    if exclusive:
        c = torch.cat([c.new_zeros(c.shape[0], 1), c[:, :-1]], dim=1)
    return c.flip(1) if reverse else c


def segment_cumsum(x: torch.Tensor, groups: Groups, *, exclusive: bool = False, reverse: bool = False) -> torch.Tensor:
    """Cumulative sum of ``x`` ``(N,)`` restarted at every group boundary of ``groups``, ``(N,)``.

    Each group is scanned on its own: a global cumsum minus each group's start would make a
    group's rounding error scale with the magnitude of every group before it (``3e15`` in one
    group wipes out ``0.1`` in the next). Ragged groups are padded to rows of the next power of
    two, one ``cumsum`` per width, so padding costs at most ``N`` extra slots and
    ``log2(n_max)`` launches; all sizes come from the host, so there is no device sync.

    Parameters
    ----------
    x : torch.Tensor
        ``(N,)`` values laid out like ``groups.values``.
    groups : Groups
        Only ``offsets``, ``sizes`` and ``group_size`` are read.
    exclusive : bool
        Leave out each slot's own value (by shifting, never by subtracting it).
    reverse : bool
        Scan from the end of each group (suffix sums).
    """
    n_total = x.numel()
    if n_total == 0:
        return x.clone()
    if groups.group_size is not None:
        return _scan_rows(x.view(-1, groups.group_size), exclusive, reverse).reshape(-1)
    device = x.device
    sizes = groups.sizes
    widths = np.left_shift(1, np.ceil(np.log2(np.maximum(sizes, 1))).astype(np.int64))
    padded = torch.cat([x, x.new_zeros(1)])  # slot N reads as 0 and collects padding writes
    out = torch.empty_like(padded)
    starts = groups.offsets[:-1]
    for width in np.unique(widths):
        rows_np = np.flatnonzero(widths == width)
        rows = torch.from_numpy(rows_np).to(device)
        cols = torch.arange(int(width), device=device)
        size = torch.from_numpy(sizes[rows_np]).to(device)
        idx = torch.where(cols < size[:, None], starts[rows][:, None] + cols, n_total)  # [R, W]
        out[idx.reshape(-1)] = _scan_rows(padded[idx], exclusive, reverse).reshape(-1)
    return out[:n_total]


def _segment_sum(x: torch.Tensor, groups: Groups, seg: torch.Tensor) -> torch.Tensor:
    """Sum of each group, ``(G,)``."""
    if groups.group_size is not None:
        return x.view(-1, groups.group_size).sum(dim=1)
    return torch.zeros(groups.num_groups, dtype=x.dtype, device=x.device).index_add_(0, seg, x)


class _SortedGroups:
    """Each group's rewards sorted ascending (stable), with the bookkeeping every estimator needs.

    Attributes (all ``(N,)``, indexed by sorted slot)
    ----------
    v : float64 sorted rewards.
    order : int64, the grouped index each sorted slot came from.
    seg : int64 group index.  n : float64 group size.  pos : int64 position within the group.
    at_or_below : int64, the number of group members ``<=`` this reward.
    """

    def __init__(self, groups: Groups):
        values = groups.values.to(_F64)
        device = values.device
        n_total = values.numel()
        self.groups = groups
        self.seg = groups.segment_ids()
        self.v, self.order = sort_within_groups(groups, values)
        start = groups.offsets[:-1][self.seg]
        sizes = groups.offsets[1:][self.seg] - start
        self.n = sizes.to(_F64)
        index = torch.arange(n_total, device=device)
        self.pos = index - start
        first_of_run = (self.pos == 0) | torch.cat([index[:1] == 0, self.v[1:] != self.v[:-1]])
        last_of_run = (self.pos == sizes - 1) | torch.cat([self.v[:-1] != self.v[1:], index[:1] == 0])
        run_start = torch.cummax(torch.where(first_of_run, index, torch.zeros_like(index)), dim=0).values
        run_end_rev = torch.where(last_of_run, index, torch.full_like(index, n_total)).flip(0)
        run_end = torch.cummin(run_end_rev, dim=0).values.flip(0)
        self.at_or_below = run_end - start + 1
        self._run_start_global = run_start  # first slot of the tie run: c_< slots into the group

    def q(self, j: torch.Tensor, k: int) -> torch.Tensor:
        """``q(j) = C(j, k-1) / C(n-1, k-1)`` for each slot's own group size."""
        return _binom_ratio(j, k - 1, self.n - 1, k - 1)

    def cumsum(self, x: torch.Tensor, *, exclusive: bool = False, reverse: bool = False) -> torch.Tensor:
        return segment_cumsum(x, self.groups, exclusive=exclusive, reverse=reverse)

    def at_run_start(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` read at the first slot of each slot's tie run."""
        return x[self._run_start_global]

    def unsort(self, w_sorted: torch.Tensor) -> torch.Tensor:
        """Back to the grouped (caller's within-group) order."""
        out = torch.empty_like(w_sorted)
        out[self.order] = w_sorted
        return out


def _leave_one_out_max_at(s: _SortedGroups, m: int) -> torch.Tensor:
    """Unbiased max@m of the ``n-1`` rewards other than each slot's, ``(N,)`` (sorted slots).

    With the others sorted ``o_1 <= ... <= o_{n-1}``, max@m is ``sum_j o_j C(j-1, m-1) / C(n-1, m)``.
    Removing sorted slot ``p`` shifts the rewards above it down by one place, so the sum splits into
    a prefix over ``v[u], u < p`` with coefficient ``a(u+1)`` and a suffix over ``v[u], u > p`` with
    coefficient ``a(u)``.
    """
    pos = s.pos.to(_F64)
    prefix_terms = s.v * _binom_ratio(pos, m - 1, s.n - 1, m)  # slot u < p is o_(u+1)
    suffix_terms = s.v * _binom_ratio(pos - 1, m - 1, s.n - 1, m)  # slot u > p is o_(u)
    prefix = s.cumsum(prefix_terms, exclusive=True)  # u < p
    suffix = s.cumsum(suffix_terms, exclusive=True, reverse=True)  # u > p
    return prefix + suffix


# --------------------------------------------------------------------------- Max@k estimators
def _max_rspo(s: _SortedGroups, k: int) -> torch.Tensor:
    """RSPO, Theorem C.4 (tie-aware), summed by parts.

    ``w_i = k/C(n-1,k-1) [R_i C(c_<, k-1) - sum_{j<=c_<} R_(j) C(j-1, k-2)]``. Pascal's rule
    ``C(j-1,k-2) = C(j,k-1) - C(j-1,k-1)`` and summation by parts turn it into
    ``w_i = k [q(0) R_(1) + sum_{j=1..c_<} q(j) (R_(j+1) - R_(j))]``: a prefix sum of
    non-negative terms, so it is shift-invariant and non-negative by construction. The gaps
    vanish inside a tie run, so summing to the slot's own sorted index instead of ``c_<`` gives
    the same number: tied rewards share one weight (Theorem 4.4 == C.4, docs/math.md fact 1).
    ``q(0)`` is 1 only for k = 1, where the weight is the reward itself.
    """
    gaps = torch.zeros_like(s.v)
    not_first = s.pos > 0
    gaps[not_first] = (s.v[1:] - s.v[:-1])[not_first[1:]]
    terms = s.q(s.pos, k) * gaps  # q(j) (R_(j+1) - R_(j)) in 0-based slots j
    lowest = s.v[s.groups.offsets[:-1]][s.seg]
    q0 = 1.0 if k == 1 else 0.0
    return k * (q0 * lowest + s.cumsum(terms))


def _max_plugin(s: _SortedGroups, k: int) -> torch.Tensor:
    """Plug-in estimator, paper eq. 11 (biased).

    ``w_i = k [R_i P(y_i)^(k-1) - (k-1) g(y_i)]`` with the empirical ``P(y) = #{R_j <= R(y)}/n``
    and ``g(y) = (1/n) sum_{R_j < R(y)} R_j P(y_j)^(k-2)``.
    """
    p = s.at_or_below.to(_F64) / s.n
    w = s.v * p.pow(k - 1)
    if k > 1:
        terms = s.v * p.pow(k - 2) / s.n
        below_sum = s.at_run_start(s.cumsum(terms, exclusive=True))  # slots strictly below the run
        w = w - (k - 1) * below_sum
    return k * w


def _max_pkpo(s: _SortedGroups, k: int) -> torch.Tensor:
    """PKPO's unbaselined estimator times n: ``w_i = k E_S[max(R_i, max S)]`` (arXiv 2505.15201).

    ``max(R_i, max S) = max S + max(R_i - max S, 0)``, so this is RSPO plus ``k`` times the
    leave-one-out max@(k-1) of the other rewards (zero for k = 1, where S is empty).
    """
    w = _max_rspo(s, k)
    if k > 1:
        w = w + k * _leave_one_out_max_at(s, k - 1)
    return w


def _max_pkpo_loo(s: _SortedGroups, k: int) -> torch.Tensor:
    """PKPO's ``s^(loo)`` (Eq. 29) times n: pkpo minus ``n/(n-1) k M_i``.

    ``M_i`` is the unbiased max@k of the other ``n-1`` rewards; it does not depend on ``y_i``, so
    the estimator stays unbiased. Needs ``k < n``.
    """
    return _max_pkpo(s, k) - s.n / (s.n - 1) * k * _leave_one_out_max_at(s, k)


def _max_ordergrad(s: _SortedGroups, k: int) -> torch.Tensor:
    """OrderGrad / MaxPO (arXiv 2606.06096, 2606.06080): ``A_i = k (q_i - M_i)``, needs ``k <= n-1``.

    ``q_i = E_S[max(R_i, max S)]`` (S a uniform (k-1)-subset of the others) and ``M_i`` the
    unbiased max@k of the other ``n-1``: pkpo minus ``k M_i``. Unbiased (``M_i`` does not depend on
    ``y_i``) and exactly centred (both sums are ``n`` times the group's max@k).

    Computed in gap form, so shift-invariant and tie-exact: write ``max T = v[0] + sum_j
    gap_j 1[T reaches slot j]`` with ``gap_j = v[j] - v[j-1]``. For the sample at sorted slot
    ``p``, a gap ``j <= p`` is always reached by ``{i} + S`` and by a k-subset of the others with
    probability ``1 - C(j, k)/C(n-1, k)``; a gap ``j > p`` is reached by S with probability
    ``1 - C(j-1, k-1)/C(n-1, k-1)`` and by the k-subset with ``1 - C(j-1, k)/C(n-1, k)``. So

        A_p = k [ sum_{j=1..p} a(j) gap_j  -  sum_{j=p+1..n-1} b(j) gap_j ],
        a(j) = C(j, k) / C(n-1, k),    b(j) = C(j-1, k-1) / C(n-1, k-1) * (n-j)/(n-k),

    a prefix and a suffix sum of non-negative terms. Gaps vanish inside a tie run, so tied
    rewards get identical weights. ``k = 1`` gives RLOO, ``R_i - mean_{j != i} R_j``.
    """
    pos = s.pos.to(_F64)
    gaps = torch.zeros_like(s.v)
    not_first = s.pos > 0
    gaps[not_first] = (s.v[1:] - s.v[:-1])[not_first[1:]]
    up = _binom_ratio(pos, k, s.n - 1, k) * gaps  # a(j) gap_j
    down = _binom_ratio(pos - 1, k - 1, s.n - 1, k - 1) * (s.n - pos) / (s.n - k) * gaps  # b(j) gap_j
    return k * (s.cumsum(up) - s.cumsum(down, exclusive=True, reverse=True))


def _hitchhiking(groups: Groups, k: int) -> torch.Tensor:
    """The paper's Section 3 baseline: blocks of k in the given order, each gets ``k * max(block)``.

    Every group size is a multiple of k (validated), so block boundaries never cross groups and
    the flat grouped buffer splits into blocks directly.
    """
    values = groups.values.to(_F64)
    return k * values.view(-1, k).amax(dim=1).repeat_interleave(k)


# --------------------------------------------------------------------------- Pass@k estimators
def _correct_counts(groups: Groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (rewards, n, c) in float64 for binary rewards; no sort needed."""
    values = groups.values.to(_F64)
    seg = groups.segment_ids()
    c = _segment_sum(values, groups, seg)[seg]
    n = (groups.offsets[1:] - groups.offsets[:-1]).to(_F64)[seg]
    return values, n, c


def _pass_rspo(groups: Groups, k: int) -> torch.Tensor:
    """RSPO, Theorem 4.3: ``w_i = k C(n-c, k-1) / C(n-1, k-1) R_i``, O(n) per group."""
    r, n, c = _correct_counts(groups)
    return k * _binom_ratio(n - c, k - 1, n - 1, k - 1) * r


def _pass_ordergrad(groups: Groups, k: int) -> torch.Tensor:
    """OrderGrad / MaxPO for binary rewards, ``c`` correct of ``n`` (needs ``k <= n-1``), O(n) per group.

    A correct response gets ``k C(n-c, k)/C(n-1, k)`` (k times the chance that k of the others all
    fail), a wrong one ``-k c/(n-k) C(n-1-c, k-1)/C(n-1, k-1)``: :func:`_max_ordergrad` with the
    single gap at sorted slot ``n - c``.
    """
    r, n, c = _correct_counts(groups)
    correct = k * _binom_ratio(n - c, k, n - 1, k)
    wrong = 0.0 - k * c / (n - k) * _binom_ratio(n - 1 - c, k - 1, n - 1, k - 1)  # 0.0 - : no -0.0 at c = 0
    return torch.where(r != 0, correct, wrong)


def _pass_plugin(groups: Groups, k: int) -> torch.Tensor:
    """Plug-in estimator, paper eq. 7 (biased): ``w_i = k (1 - c/n)^(k-1) R_i``."""
    r, n, c = _correct_counts(groups)
    return k * (1 - c / n).pow(k - 1) * r


def _pass_passk_training_std(groups: Groups, k: int) -> torch.Tensor:
    """Chen et al., "Pass@k Training" (arXiv 2508.10751): the analytic, std-normalised advantage.

    Their released code, for a group of n with c correct: ``rho = 1 - C(n-c, k)/C(n, k)``,
    ``sigma = sqrt(rho (1 - rho))``; a correct response gets ``(1 - rho)/(sigma + 1e-6)``, a wrong
    one ``(1 - rho - C(n-c-1, k-1)/C(n-1, k-1))/(sigma + 1e-6)``. These are PKPO's unbaselined
    binary values (1, and the chance that k-1 others hold a correct one) centred by their group
    mean ``rho`` and divided by the group std, GRPO-style: biased. ``C(n-c, k)/C(n, k)`` equals
    ``(n-c)/n C(n-c-1, k-1)/C(n-1, k-1)``, so the wrong value is ``-c/(n-c) (1 - rho)``: computed
    so, without the cancellation of the printed form. Not on the library's scale: k = 1 gives
    GRPO's ``(R - c/n)/(sigma + 1e-6)``, not ``R``.
    """
    log_miss, c_group, n_group = _log_miss(groups, k)
    miss = torch.exp(log_miss)
    denom = torch.sqrt(-torch.expm1(log_miss) * miss) + PASSK_TRAINING_EPS
    correct = miss / denom
    wrong = torch.where(c_group < n_group, 0.0 - c_group / (n_group - c_group).clamp(min=1) * correct, 0.0)
    seg = groups.segment_ids()
    return torch.where(groups.values != 0, correct[seg], wrong[seg]).to(_F64)


def _sorted(fn: Callable[[_SortedGroups, int], torch.Tensor]) -> Callable[[Groups, int], torch.Tensor]:
    def run(groups: Groups, k: int) -> torch.Tensor:
        s = _SortedGroups(groups)
        return s.unsort(fn(s, k))

    run.__doc__ = fn.__doc__
    return run


# One table per objective: name -> implementation on Groups. Binary rewards make the Max@k
# formulas of hitchhiking, pkpo and pkpo_loo the Pass@k ones; plugin and rspo have their own.
_MAX_AT_K: dict[str, Callable[[Groups, int], torch.Tensor]] = {
    "rspo": _sorted(_max_rspo),
    "plugin": _sorted(_max_plugin),
    "hitchhiking": _hitchhiking,
    "pkpo": _sorted(_max_pkpo),
    "pkpo_loo": _sorted(_max_pkpo_loo),
    "ordergrad": _sorted(_max_ordergrad),
}
_PASS_AT_K: dict[str, Callable[[Groups, int], torch.Tensor]] = {
    **_MAX_AT_K,
    "rspo": _pass_rspo,
    "plugin": _pass_plugin,
    "passk_training_std": _pass_passk_training_std,
    "ordergrad": _pass_ordergrad,
}
_TABLES = {"pass@k": _PASS_AT_K, "max@k": _MAX_AT_K}


def grouped_weights(groups: Groups, k: int, objective: str, estimator: str) -> torch.Tensor:
    """Per-sample weights for validated, grouped rewards.

    Parameters
    ----------
    groups : Groups
        Canonical layout; ``values`` is ``(N,)`` float32 or float64.
    k : int
        Sample size of the objective, ``1 <= k <= n`` for every group.
    objective : {"pass@k", "max@k"}
    estimator : {"rspo", "plugin", "hitchhiking", "pkpo", "pkpo_loo", "passk_training_std", "ordergrad"}
        ``"passk_training_std"`` exists for ``"pass@k"`` only; ``"pkpo_loo"`` and ``"ordergrad"``
        need ``k < n``.

    Returns
    -------
    torch.Tensor
        ``(N,)`` weights in the grouped order, dtype of ``groups.values``.
    """
    if groups.values.numel() == 0:
        return groups.values.clone()
    if objective == "pass@k":
        # Unvalidated Pass@k rewards count as correct when non-zero, in every backend.
        groups = groups.with_values((groups.values != 0).to(groups.values.dtype))
    w = _TABLES[objective][estimator](groups, k)
    return w.to(groups.values.dtype)


def _log_miss(groups: Groups, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group ``log(C(n-c, k) / C(n, k))`` (``-inf`` when ``n - c < k``), with ``c`` and ``n``, ``(G,)`` each.

    Uses the product form (docs/math.md § Evaluation metrics) with ``m = min(c, k)`` factors,
    ``C(n-c, k)/C(n, k) = prod_{j=n-c+1..n} (1 - k/j)`` (c <= k) or ``prod_{t<k} (1 - c/(n-t))``
    (c > k), summed as ``log1p``: a difference of log-factorials near ``1e7`` would lose the
    relative precision of a pass rate near 0. Factor ``t`` lives in slot ``t`` of its group
    (``m <= n``), so one segment sum does every group at once, with no device sync. Any non-zero
    reward counts as correct.
    """
    values = groups.values
    seg = groups.segment_ids()
    c_group = _segment_sum((values != 0).to(_F64), groups, seg)
    n_group = (groups.offsets[1:] - groups.offsets[:-1]).to(_F64)
    n, c = n_group[seg], c_group[seg]
    t = (torch.arange(values.numel(), device=values.device) - groups.offsets[:-1][seg]).to(_F64)
    factor = torch.where(c <= k, torch.log1p(-k / (n - c + 1 + t)), torch.log1p(-c / (n - t)))
    active = (t < torch.clamp(c, max=k)) & (n - c >= k)
    log_miss = _segment_sum(torch.where(active, factor, torch.zeros_like(factor)), groups, seg)
    log_miss = torch.where(n_group - c_group < k, torch.full_like(log_miss, -torch.inf), log_miss)
    return log_miss, c_group, n_group


def grouped_pass_at_k(groups: Groups, k: int) -> torch.Tensor:
    """Unbiased pass@k per group: ``1 - C(n-c, k) / C(n, k)`` (1 when ``n - c < k``), ``(G,)``.

    ``-expm1`` of the product form's ``log1p`` sum (:func:`_log_miss`): full relative precision
    for pass rates near 0 (n = 2^20, one correct, k = 1 gives 2^-20 to 1 ulp). Any non-zero
    reward counts as correct (the contract of ``validate=False``).
    """
    values = groups.values
    if values.numel() == 0:
        return torch.zeros(groups.num_groups, dtype=values.dtype, device=values.device)
    log_miss, _, _ = _log_miss(groups, k)
    return (-torch.expm1(log_miss)).to(values.dtype)


def grouped_max_at_k(groups: Groups, k: int) -> torch.Tensor:
    """Unbiased max@k per group: ``sum_i R_(i) C(i-1, k-1) / C(n, k)`` over the ascending sort, ``(G,)``.

    ``C(i-1, k-1)/C(n, k) = (k/n) q(i-1)``; ties need no care because tied values are equal.
    """
    if groups.values.numel() == 0:
        return torch.zeros(groups.num_groups, dtype=groups.values.dtype, device=groups.values.device)
    s = _SortedGroups(groups)
    terms = s.v * (k / s.n) * s.q(s.pos, k)
    return _segment_sum(terms, groups, s.seg).to(groups.values.dtype)


# --------------------------------------------------------------------------- risk-sensitive (RS-GRPO)
# Below this |beta| * (group range) the second-order expansion is exact to float64 (the next term is
# beta^2 range^3 / 6 < 1e-16 range), and the direct formula would lose beta * R to underflow.
RISK_SENSITIVE_TAYLOR_BELOW = 1e-8


def grouped_risk_sensitive_weights(groups: Groups, beta: float) -> torch.Tensor:
    """RS-GRPO's advantage (Jiang et al., arXiv 2509.24261) for validated, grouped rewards, ``(N,)``.

    ``A_i = (exp(beta (R_i - S)) - 1) / beta`` with ``S = (1/beta) log mean_j exp(beta R_j)``, i.e.
    ``A_i = (n softmax(beta R)_i - 1) / beta``: centred in every group, and a biased estimate of the
    gradient of ``(1/beta) log E exp(beta R)`` (S is estimated from the same samples).

    Evaluated without overflow or cancellation: with ``c`` the group's max (``beta > 0``) or min
    (``beta < 0``), every ``beta (R_j - c) <= 0``, and

        R_i - S = (R_i - c) - (1/beta) log1p(mean_j expm1(beta (R_j - c))),   A_i = expm1(beta (R_i - S)) / beta.

    When ``|beta| * (max - min)`` is below :data:`RISK_SENSITIVE_TAYLOR_BELOW` (``beta = 0``
    included) the expansion ``A_i = x_i + (beta/2) (x_i^2 - mean x^2)``, ``x = R - mean R``, is used:
    the limit ``beta -> 0`` is ``R_i - mean R`` (GRPO's advantage without the std).

    Parameters
    ----------
    groups : Groups
        Canonical layout, finite values.
    beta : float
        Finite risk parameter (``> 0`` risk-seeking, ``< 0`` risk-averse, ``0`` the limit).
    """
    values = groups.values
    if values.numel() == 0:
        return values.clone()
    r = values.to(_F64)
    seg = groups.segment_ids()
    n = (groups.offsets[1:] - groups.offsets[:-1]).to(_F64)
    top = torch.full_like(n, -torch.inf).scatter_reduce(0, seg, r, "amax")
    bottom = torch.full_like(n, torch.inf).scatter_reduce(0, seg, r, "amin")
    x = r - (_segment_sum(r, groups, seg) / n)[seg]
    var = (_segment_sum(x * x, groups, seg) / n)[seg]
    taylor = x + (beta / 2) * (x * x - var)
    if beta == 0:
        return taylor.to(values.dtype)
    ref = (top if beta > 0 else bottom)[seg]
    shifted = r - ref  # beta * shifted <= 0
    log_mean = torch.log1p(_segment_sum(torch.expm1(beta * shifted), groups, seg) / n)[seg]
    direct = torch.expm1(beta * shifted - log_mean) / beta  # beta (R_i - S) <= log n: no overflow
    small = (abs(beta) * (top - bottom) < RISK_SENSITIVE_TAYLOR_BELOW)[seg]
    return torch.where(small, taylor, direct).to(values.dtype)
