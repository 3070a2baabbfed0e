"""The exact bias of RS-GRPO's advantage (:func:`rspo_kernels.risk_sensitive_weights`) for its objective.

RS-GRPO (Jiang et al., arXiv 2509.24261) trains on ``J_beta = (1/beta) log E[exp(beta R)]`` with the
advantage ``A_i = (exp(beta (R_i - S)) - 1) / beta``, ``S = (1/beta) log mean_j exp(beta R_j)``. The
group's own ``S`` replaces the true ``J_beta``, so the estimate is biased. For a binary reward the
bias is a single factor, computed here exactly and tabulated in docs/math.md.

Derivation. One prompt with pass rate ``p``, ``n`` i.i.d. responses, and weights that depend only
on which responses are correct. As in benchmarks/passk_alpha.py, by exchangeability

    E[(1/n) sum_i A_i grad log pi(y_i)] = (a_1 - a_0) grad p,

where ``a_r`` is the expected weight of a response with reward ``r`` over the
``Binomial(n - 1, p)`` correct responses among the others. The target is

    grad J_beta = (1/beta) grad log(1 - p + p e^beta) = (e^beta - 1) / (beta (1 - p + p e^beta)) grad p,

(``grad p`` at ``beta = 0``), so ``E[g] = alpha grad J_beta`` with
``alpha = (a_1 - a_0) beta (1 - p + p e^beta) / (e^beta - 1)``; unbiased would be ``alpha = 1``. The
weights come from the library itself, one group per count of correct responses;
tests/test_estimators_v3.py checks ``alpha`` against brute-force enumeration of every sample set.

Run ``python -m benchmarks.risk_sensitive_bias`` to print the table (a second or so).
"""

from __future__ import annotations

import math
from math import comb

import numpy as np

import rspo_kernels as rk

__all__ = ["TABLE_NS", "TABLE_BETAS", "TABLE_PS", "alpha", "table_markdown", "main"]

TABLE_NS = (4, 8, 16, 64)
TABLE_BETAS = (0.5, 1.0, 2.0, 4.0, 8.0)
TABLE_PS = (0.01, 0.1, 0.3, 0.5, 0.9)


def alpha(n: int, beta: float, p: float) -> float:
    """``alpha`` with ``E[g] = alpha * grad J_beta`` for groups of ``n`` binary rewards, exact.

    Parameters
    ----------
    n : int
        Group size, ``n >= 1``.
    beta : float
        RS-GRPO's risk parameter (finite; 0 is the mean-reward limit).
    p : float
        The prompt's pass rate, ``0 < p < 1``.

    Returns
    -------
    float
        The scale, in float64 (1 for an unbiased estimator).
    """
    groups = np.array([[1.0] * c + [0.0] * (n - c) for c in range(n + 1)])
    w = np.asarray(rk.risk_sensitive_weights(groups, beta), dtype=np.float64)
    j = np.arange(n)  # correct responses among the other n - 1
    pmf = np.array([comb(n - 1, int(i)) * p**i * (1 - p) ** (n - 1 - i) for i in j])
    a_correct = float(pmf @ w[j + 1, 0])
    a_wrong = float(pmf @ w[j, n - 1])
    slope = 1.0 if beta == 0 else math.expm1(beta) / (beta * (1 - p + p * math.exp(beta)))
    return (a_correct - a_wrong) / slope


def table_markdown() -> str:
    """``alpha`` over :data:`TABLE_NS` x :data:`TABLE_BETAS` (rows) and :data:`TABLE_PS` (columns)."""
    lines = [
        "| n | beta | " + " | ".join(f"p = {p}" for p in TABLE_PS) + " |",
        "|---|---|" + "---|" * len(TABLE_PS),
    ]
    for n in TABLE_NS:
        for beta in TABLE_BETAS:
            cells = " | ".join(f"{alpha(n, beta, p):.3g}" for p in TABLE_PS)
            lines.append(f"| {n} | {beta:g} | {cells} |")
    return "\n".join(lines)


def main() -> int:
    print(table_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
