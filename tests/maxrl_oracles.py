"""Oracles for the MaxRL weights, written from definitions, in exact fractions.

``released_*`` transcribe what the functions of the authors' released code compute
(``verl/trainer/ppo/maclaurin.py`` in github.com/tajwarfahim/maxrl, Tajwar et al., arXiv
2602.02710): for a group of ``n`` with ``c`` successes, a success weight and a failure weight,
the advantage of sample i being the one matching its outcome. They are re-derived here term by
term from that file's loops (sums over k, and over t for the cross-fitted baseline, eq. 84-85),
with ``math.comb`` and ``Fraction`` instead of its log-space arithmetic, and used only as test
oracles. They are on the authors' scale (advantages summed over samples); the library's weights
are ``n`` times them.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction


def comb(a: int, b: int) -> int:
    return math.comb(a, b) if 0 <= b <= a else 0


def released_maclaurin(c: int, n: int, t: int) -> tuple[Fraction, Fraction]:
    """``maclaurin_weights``: success 1/n; failure ``-(1/n) sum_{k=2}^{min(T, f)} C(f-1,k-1)/C(n-1,k-1)``."""
    f = n - c
    fail = -sum((Fraction(comb(f - 1, k - 1), comb(n - 1, k - 1)) for k in range(2, min(t, f) + 1)), Fraction(0))
    return Fraction(1, n), (fail / n if n >= 2 else Fraction(0))


def released_maclaurin_loo(c: int, n: int, t: int) -> tuple[Fraction, Fraction]:
    """``maclaurin_weights_loo``: for k = 2..min(T, n-1), ``ratio = C(f,k)/(C(n,k)-1)``; success
    ``+= ratio/n``, failure ``+= ratio (1/n - 1/f)``; when ``T >= n``, failure ``-= 1/n`` if all fail."""
    f = n - c
    succ, fail = Fraction(1, n), Fraction(0)
    if t < 2 or n < 2:
        return succ, fail
    for k in range(2, min(t, n - 1) + 1):
        if f < k:
            continue
        ratio = Fraction(comb(f, k), comb(n, k) - 1)
        succ += ratio / n
        fail += ratio * (Fraction(1, n) - Fraction(1, f))
    if t >= n and f == n:
        fail -= Fraction(1, n)
    return succ, fail


def released_cross_fitted(c: int, n: int, t: int) -> tuple[Fraction, Fraction]:
    """``maclaurin_weights_cross_fitted``, with the t-sums of eq. 84-85 written out.

    For k = 2..min(T, n): failure ``-= C(f-1,k-1)/(k C(n,k))``; when ``n >= 2k`` also
    failure ``+= A_F/(k C(n,k))`` and success ``+= A_S/(k C(n,k))`` with
    ``A_F = sum_t C(f-1,t) C(s,k-1-t) C(f-1-t,k) / C(n-k,k)`` and
    ``A_S = sum_t C(f,t) C(s-1,k-1-t) C(f-t,k) / C(n-k,k)``.
    """
    f, s = n - c, c
    succ, fail = Fraction(1, n), Fraction(0)
    for k in range(2, min(t, n) + 1):
        denom = k * comb(n, k)
        fail -= Fraction(comb(f - 1, k - 1), denom)
        if n >= 2 * k:
            den = comb(n - k, k)
            a_f = sum(Fraction(comb(f - 1, u) * comb(s, k - 1 - u) * comb(f - 1 - u, k), den) for u in range(k))
            a_s = sum(Fraction(comb(f, u) * comb(s - 1, k - 1 - u) * comb(f - u, k), den) for u in range(k))
            fail += a_f / denom
            succ += a_s / denom
    return succ, fail


def released_vr_cond(c: int, n: int) -> tuple[Fraction, Fraction]:
    """``vr_cond_weights``: success ``b/(a n)`` (0 when a = 0), failure ``-1/n``; a successes, b failures."""
    succ = Fraction(n - c, c * n) if c > 0 else Fraction(0)
    return succ, Fraction(-1, n)


def released_weights(name: str, rewards: list[int], t: int) -> list[float]:
    """Per-sample weights on the library's scale: ``n`` times the released advantage."""
    n, c = len(rewards), int(sum(rewards))
    if name == "vr_cond":
        succ, fail = released_vr_cond(c, n)
    else:
        succ, fail = {"maclaurin": released_maclaurin, "cross_fitted": released_cross_fitted}[name](c, n, t)
    return [float(n * (succ if r else fail)) for r in rewards]


def subset_maxrl_rspo(rewards: list[int], t: int) -> list[Fraction]:
    """``sum_{k=1}^{T} (1/k) w^(k)`` with ``w^(k)_i = k E_S[max(R_i - max S, 0)]`` by enumeration
    (S over the (k-1)-subsets of the others, docs/math.md fact 2), in fractions."""
    n = len(rewards)
    out = []
    for i in range(n):
        others = [rewards[j] for j in range(n) if j != i]
        total = Fraction(0)
        for k in range(1, t + 1):
            subsets = list(itertools.combinations(others, k - 1))
            gain = sum((Fraction(max(rewards[i] - max(s, default=0), 0)) for s in subsets), Fraction(0))
            total += gain / len(subsets)  # (1/k) * k E_S[...]
        out.append(total)
    return out
