"""Baselines the benchmarks compare with: what a user would write, and the paper's Algorithm 2.

- :func:`numpy_loop_max_at_k` / :func:`numpy_loop_pass_at_k`: a straightforward per-group Python
  loop over numpy, with log-factorials from ``scipy.special.gammaln`` (Theorem C.4 / 4.3 as printed).
- :func:`algorithm_2`: the paper's Algorithm 2 for one group, O(n^2 k), with the two misprints of the
  printed version fixed (see its docstring). It is checked against Theorem C.4 in the smoke tests.
"""

from __future__ import annotations

from math import comb

import numpy as np
from scipy.special import gammaln

__all__ = ["numpy_loop_max_at_k", "numpy_loop_pass_at_k", "algorithm_2", "algorithm_2_batch"]


def _log_comb(n, r):
    n = np.asarray(n, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    ok = (r >= 0) & (r <= n)
    safe_n, safe_r = np.where(ok, n, 0.0), np.where(ok, r, 0.0)
    return np.where(ok, gammaln(safe_n + 1) - gammaln(safe_r + 1) - gammaln(safe_n - safe_r + 1), -np.inf)


def _comb_ratio(top, r_top, bottom, r_bottom):
    """C(top, r_top) / C(bottom, r_bottom) via log-factorials (0 where C(top, r_top) = 0)."""
    return np.exp(_log_comb(top, r_top) - _log_comb(bottom, r_bottom))


def _rspo_max_one_group(r: np.ndarray, k: int) -> np.ndarray:
    n = r.shape[0]
    s = np.sort(r)
    c_less = np.searchsorted(s, r, side="left")  # responses strictly below each one
    j = np.arange(1, n + 1)
    # term_j = R_(j) C(j-1, k-2) / C(n-1, k-1), summed over j <= c_less
    prefix = np.concatenate([[0.0], np.cumsum(s * _comb_ratio(j - 1, k - 2, n - 1, k - 1))])
    return k * (r * _comb_ratio(c_less, k - 1, n - 1, k - 1) - prefix[c_less])


def _rspo_pass_one_group(r: np.ndarray, k: int) -> np.ndarray:
    n = r.shape[0]
    return k * _comb_ratio(n - r.sum(), k - 1, n - 1, k - 1) * r


def _per_group(rewards, k, one_group):
    """Apply ``one_group`` to each row of a 2-D array, or to each array of a list (ragged groups)."""
    if isinstance(rewards, np.ndarray) and rewards.ndim == 2:
        return np.stack([one_group(r.astype(np.float64), k) for r in rewards])
    return [one_group(np.asarray(r, dtype=np.float64), k) for r in rewards]


def numpy_loop_max_at_k(rewards, k: int):
    """RSPO Max@k weights (Theorem C.4), one numpy pass per group: rows of a 2-D array or a list."""
    return _per_group(rewards, k, _rspo_max_one_group)


def numpy_loop_pass_at_k(rewards, k: int):
    """RSPO Pass@k weights (Theorem 4.3), one numpy pass per group: rows of a 2-D array or a list."""
    return _per_group(rewards, k, _rspo_pass_one_group)


def _c(n: int, r: int) -> int:
    """C(n, r), and 0 outside 0 <= r <= n (Lemma C.1's counts can go negative)."""
    return comb(n, r) if 0 <= r <= n else 0


def algorithm_2(rewards, k: int) -> list[float]:
    """The paper's Algorithm 2 (Appendix C) for one group: per-response weights, O(n^2 k).

    The printed algorithm is garbled in two places; this is the version that matches Theorem C.4:
    the sample estimator has no ``pi(y'|x)`` factor in lines 17 and 19 (the ``1/(n-1)`` sum over
    ``j != i`` replaces it), line 17 applies when ``r' = r`` and line 19 when ``r' < r``.
    The result is on the library's scale (k = 1 gives ``w_i = R_i``).
    """
    r = [float(x) for x in rewards]
    n = len(r)
    denom1 = _c(n - 1, k - 1)
    denom2 = _c(n - 2, k - 2) if k >= 2 else 1
    out = []
    for i in range(n):
        ri = r[i]
        others = [r[j] for j in range(n) if j != i]
        c_lt = sum(x < ri for x in others)
        c_eq = sum(x == ri for x in others)
        w = 0.0
        for t in range(1, k + 1):  # first term
            e1 = _c(c_lt, t - 1) * _c(c_lt + c_eq - (t - 1), k - t) / (denom1 * _c(k - 1, t - 1))
            w += ri * e1
        for j in range(n):  # second (r' = r) and third (r' < r) terms
            if j == i or r[j] > ri:
                continue
            rj = r[j]
            rest = [r[l] for l in range(n) if l != i and l != j]
            c2_lt = sum(x < rj for x in rest)
            c2_eq = sum(x == rj for x in rest)
            for t in range(1, k):
                e23 = _c(c2_lt, t - 1) * _c(c2_lt + c2_eq - (t - 1), k - t - 1) / (denom2 * _c(k - 2, t - 1))
                w -= rj * (t if rj == ri else k) / (n - 1) * e23
        out.append(w)
    return out


def algorithm_2_batch(rewards: np.ndarray, k: int) -> np.ndarray:
    """:func:`algorithm_2` on every row of a ``(B, n)`` array."""
    rewards = np.atleast_2d(np.asarray(rewards, dtype=np.float64))
    return np.array([algorithm_2(row, k) for row in rewards])
