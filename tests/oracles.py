"""Brute-force oracles, written independently of the library's formulas.

Each one follows a definition (subset enumeration, the paper's Algorithm 2, exact expectation
over a categorical policy) rather than a closed form, so agreement with the specification is
evidence, not tautology. Everything here is plain Python/numpy on one group.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def subset_rspo(r: list[float], k: int) -> list[float]:
    """docs/math.md fact 2: ``w_i = k E_S[max(R_i - max S, 0)]``, S a (k-1)-subset of the others."""
    n = len(r)
    out = []
    for i in range(n):
        others = [r[j] for j in range(n) if j != i]
        if k == 1:
            out.append(float(r[i]))
            continue
        out.append(k * _mean(max(r[i] - max(s), 0.0) for s in itertools.combinations(others, k - 1)))
    return out


def subset_pkpo(r: list[float], k: int) -> list[float]:
    """``w_i = k E_S[max(R_i, max S)]`` (PKPO's unbaselined s_i times n)."""
    n = len(r)
    out = []
    for i in range(n):
        others = [r[j] for j in range(n) if j != i]
        out.append(k * _mean(max([r[i], *s]) for s in itertools.combinations(others, k - 1)))
    return out


def subset_max_at_k(r: list[float], k: int) -> float:
    """Mean of ``max`` over all k-subsets: the unbiased max@k."""
    return _mean(max(s) for s in itertools.combinations(r, k))


def subset_pass_at_k(r: list[float], k: int) -> float:
    return _mean(float(any(x == 1 for x in s)) for s in itertools.combinations(r, k))


def subset_pkpo_loo(r: list[float], k: int) -> list[float]:
    """pkpo minus ``n/(n-1) k M_i`` with ``M_i`` the max@k of the n-1 other rewards."""
    n = len(r)
    base = subset_pkpo(r, k)
    return [base[i] - n / (n - 1) * k * subset_max_at_k([r[j] for j in range(n) if j != i], k) for i in range(n)]


def hitchhiking(r: list[float], k: int) -> list[float]:
    return [k * max(r[(i // k) * k : (i // k) * k + k]) for i in range(len(r))]


def plugin_max(r: list[float], k: int) -> list[float]:
    """Paper eq. 11 written from its definitions (O(n^2))."""
    n = len(r)
    p = [sum(1 for x in r if x <= y) / n for y in r]
    out = []
    for i in range(n):
        g = sum(r[j] * p[j] ** (k - 2) for j in range(n) if r[j] < r[i]) / n if k > 1 else 0.0
        out.append(k * (r[i] * p[i] ** (k - 1) - (k - 1) * g))
    return out


def plugin_pass(r: list[float], k: int) -> list[float]:
    n, c = len(r), sum(r)
    return [k * (1 - c / n) ** (k - 1) * x for x in r]


def theorem_4_4(r: list[float], k: int) -> list[float]:
    """Section 4.3 / Theorem 4.4: sorted index ``i-1`` in place of ``c_<[i]``, exact fractions."""
    n = len(r)
    order = sorted(range(n), key=lambda i: r[i])
    rs = [Fraction(r[i]) for i in order]
    out = [0.0] * n
    for pos, i in enumerate(order, start=1):
        second = sum(rs[j - 1] * math.comb(j - 1, k - 2) for j in range(1, pos)) if k >= 2 else 0
        w = Fraction(k, math.comb(n - 1, k - 1)) * (rs[pos - 1] * math.comb(pos - 1, k - 1) - second)
        out[i] = float(w)
    return out


def theorem_c4(r: list[float], k: int) -> list[float]:
    """Theorem C.4 verbatim with ``c_<[i]``, exact fractions."""
    n = len(r)
    rs = sorted(Fraction(x) for x in r)
    out = []
    for x in r:
        c = sum(1 for y in r if y < x)
        second = sum(rs[j - 1] * math.comb(j - 1, k - 2) for j in range(1, c + 1)) if k >= 2 else 0
        out.append(float(Fraction(k, math.comb(n - 1, k - 1)) * (Fraction(x) * math.comb(c, k - 1) - second)))
    return out


def _e_hat(c_less: int, c_eq: int, a: int, b: int, n0: int) -> Fraction:
    """Unbiased estimate of ``P_<^a P_<=^b`` from ``n0`` samples (Lemma C.1 with its C(a+b, a))."""
    if a + b == 0:
        return Fraction(1)
    num = math.comb(c_less, a) * math.comb(c_less + c_eq - a, b) if c_less + c_eq - a >= 0 else 0
    return Fraction(num, math.comb(n0, a + b) * math.comb(a + b, a))


def algorithm_2(r: list[float], k: int) -> list[float]:
    """The paper's Algorithm 2 (Appendix C), per-response weights on the library's scale.

    The printed algorithm is garbled in extraction; this is its sample form: lines 17/19 apply to
    ``r' = r`` (second term, factor t) and ``r' < r`` (third term, factor k), and the sample mean
    over ``j != i`` with ``1/(n-1)`` replaces the ``pi(y'|x)`` weighting of the derivation.
    """
    n = len(r)
    out = []
    for i in range(n):
        ri = Fraction(r[i])
        others = [Fraction(r[j]) for j in range(n) if j != i]
        c_less = sum(1 for y in others if y < ri)
        c_eq = sum(1 for y in others if y == ri)
        w = sum(ri * _e_hat(c_less, c_eq, t - 1, k - t, n - 1) for t in range(1, k + 1))
        for j in range(n):
            if j == i or r[j] > r[i]:
                continue
            rj = Fraction(r[j])
            rest = [Fraction(r[m]) for m in range(n) if m not in (i, j)]
            cl = sum(1 for y in rest if y < rj)
            ce = sum(1 for y in rest if y == rj)
            factor = (lambda t: t) if r[j] == r[i] else (lambda t: k)
            for t in range(1, k):
                w -= rj * Fraction(factor(t), n - 1) * _e_hat(cl, ce, t - 1, k - t - 1, n - 2)
        out.append(float(w))
    return out


def passk_training_std(r: list[float], k: int) -> list[float]:
    """Chen et al.'s advantage from its definition, by enumeration in exact fractions.

    Before centring, a response is worth ``E_S[max(R_i, max S)]`` over the (k-1)-subsets S of the
    others (PKPO's unbaselined value); the group's pass@k ``rho`` is the mean of ``max`` over its
    k-subsets; the advantage is ``(value - rho) / (sqrt(rho (1 - rho)) + 1e-6)``.
    """
    n = len(r)
    rs = [Fraction(x) for x in r]
    subsets = list(itertools.combinations(rs, k))
    rho = sum((max(s) for s in subsets), Fraction(0)) / len(subsets)
    sigma = math.sqrt(rho * (1 - rho))
    out = []
    for i in range(n):
        others = rs[:i] + rs[i + 1 :]
        combos = list(itertools.combinations(others, k - 1))
        value = sum((max([rs[i], *s]) for s in combos), Fraction(0)) / len(combos)
        out.append(float(value - rho) / (sigma + 1e-6))
    return out


def passk_training_std_formula(r: list[float], k: int) -> list[float]:
    """Chen et al.'s released closed form as printed (docs/math.md § Other estimators), with math.comb."""
    n, c = len(r), int(sum(r))

    def comb(a: int, b: int) -> int:
        return math.comb(a, b) if 0 <= b <= a else 0

    rho = 1 - Fraction(comb(n - c, k), comb(n, k))
    sigma = math.sqrt(rho * (1 - rho))
    correct = float(1 - rho) / (sigma + 1e-6)
    wrong = float(1 - rho - Fraction(comb(n - c - 1, k - 1), comb(n - 1, k - 1))) / (sigma + 1e-6)
    return [correct if x == 1 else wrong for x in r]


def subset_ordergrad(r: list, k: int) -> list:
    """OrderGrad / MaxPO by definition: ``A_i = k (q_i - M_i)``, by subset enumeration.

    ``q_i``: the mean over the (k-1)-subsets S of the others of ``max(R_i, max S)``; ``M_i``: the
    mean over the k-subsets of the others of their max. Exact when the rewards are Fractions
    (or ints); needs ``k <= n - 1``.
    """
    n = len(r)
    out = []
    for i in range(n):
        others = [r[j] for j in range(n) if j != i]
        include = [max([r[i], *s]) for s in itertools.combinations(others, k - 1)]
        leave = [max(s) for s in itertools.combinations(others, k)]
        out.append(k * (sum(include, Fraction(0)) / len(include) - sum(leave, Fraction(0)) / len(leave)))
    return out if isinstance(r[0], (Fraction, int)) else [float(x) for x in out]


def ordergrad_binary_formula(r: list, k: int) -> list[Fraction]:
    """The authors' closed form for 0/1 rewards, ``c`` correct (issue 29), in exact fractions.

    Correct: ``k C(n-c, k) / C(n-1, k)``; wrong: ``-k c/(n-k) C(n-1-c, k-1) / C(n-1, k-1)``.
    """
    n, c = len(r), int(sum(1 for x in r if x))

    def comb(a: int, b: int) -> int:
        return math.comb(a, b) if 0 <= b <= a else 0

    correct = Fraction(k * comb(n - c, k), comb(n - 1, k))
    wrong = -Fraction(k * c, n - k) * Fraction(comb(n - 1 - c, k - 1), comb(n - 1, k - 1))
    return [correct if x else wrong for x in r]


def _rspo_exact(r: list[Fraction], k: int) -> list[Fraction]:
    """docs/math.md fact 2 in exact fractions: ``w_i = k E_S[max(R_i - max S, 0)]``."""
    n = len(r)
    if k == 1:
        return list(r)
    out = []
    for i in range(n):
        others = r[:i] + r[i + 1 :]
        gains = [max(r[i] - max(s), Fraction(0)) for s in itertools.combinations(others, k - 1)]
        out.append(k * sum(gains, Fraction(0)) / len(gains))
    return out


def ordergrad_leave_two_out(r: list, k: int) -> list[Fraction]:
    """OrderGrad as "RSPO minus a leave-two-out baseline" (issue 29), in exact fractions.

    ``A_i = w_i - mean_{j != i} w_j^(-i)``, where ``w`` are RSPO's weights of the whole group and
    ``w_j^(-i)`` RSPO's weight of ``j`` recomputed in the group without ``i`` (so ``j``'s own
    subsets leave out both i and j). A second, differently built route to the same numbers.
    """
    rs = [Fraction(x) for x in r]
    n = len(rs)
    w = _rspo_exact(rs, k)
    out = []
    for i in range(n):
        without_i = _rspo_exact(rs[:i] + rs[i + 1 :], k)
        out.append(w[i] - sum(without_i, Fraction(0)) / (n - 1))
    return out


def risk_sensitive(r: list[float], beta: float, digits: int = 50) -> list[float]:
    """RS-GRPO's advantage from its printed definition, in ``digits``-digit arithmetic (mpmath).

    ``S = (1/beta) log mean_j exp(beta R_j)``, ``A_i = (exp(beta (R_i - S)) - 1) / beta``; the
    limit ``beta -> 0`` is ``R_i - mean R``.
    """
    import mpmath

    with mpmath.workdps(digits):
        rs = [mpmath.mpf(x) for x in r]
        if beta == 0:
            mean = sum(rs) / len(rs)
            return [float(x - mean) for x in rs]
        b = mpmath.mpf(beta)
        s = mpmath.log(sum(mpmath.exp(b * x) for x in rs) / len(rs)) / b
        return [float((mpmath.exp(b * (x - s)) - 1) / b) for x in rs]


ORACLES = {
    ("max@k", "rspo"): subset_rspo,
    ("max@k", "plugin"): plugin_max,
    ("max@k", "hitchhiking"): hitchhiking,
    ("max@k", "pkpo"): subset_pkpo,
    ("max@k", "pkpo_loo"): subset_pkpo_loo,
    ("pass@k", "rspo"): subset_rspo,
    ("pass@k", "plugin"): plugin_pass,
    ("pass@k", "hitchhiking"): hitchhiking,
    ("pass@k", "pkpo"): subset_pkpo,
    ("pass@k", "pkpo_loo"): subset_pkpo_loo,
    ("pass@k", "passk_training_std"): passk_training_std,
    ("max@k", "ordergrad"): subset_ordergrad,
    ("pass@k", "ordergrad"): subset_ordergrad,
}


# ----------------------------------------------------------------- exact expectations over a policy
def all_samples(m: int, n: int) -> np.ndarray:
    """Every ordered sample of n draws from m responses, ``(m**n, n)`` int64."""
    return np.array(list(itertools.product(range(m), repeat=n)), dtype=np.int64).reshape(-1, n)


def expected_gradient(probs: np.ndarray, rewards: np.ndarray, n: int, weight_fn) -> np.ndarray:
    """``E[(1/n) sum_i w_i grad_logits log pi(y_i)]`` by exhaustive enumeration, float64 ``(m,)``.

    ``weight_fn`` maps a ``(S, n)`` float64 reward matrix (one sample set per row) to weights of
    the same shape; ``grad_logits log pi(y) = onehot(y) - pi`` for a softmax policy.
    """
    m = probs.shape[0]
    samples = all_samples(m, n)
    p_sample = np.prod(probs[samples], axis=1)  # (S,)
    w = np.asarray(weight_fn(rewards[samples].astype(np.float64)))  # (S, n)
    onehot = np.eye(m)[samples]  # (S, n, m)
    score = onehot - probs  # grad log pi, (S, n, m)
    per_sample = (w[:, :, None] * score).mean(axis=1)  # (S, m)
    return (p_sample[:, None] * per_sample).sum(axis=0)
