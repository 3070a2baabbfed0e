"""The exact scale of ``passk_training_std``'s expected gradient, ``E[g] = alpha * grad Pass@k``.

Chen et al.'s std-normalised advantage (``estimator="passk_training_std"``) is biased: on one
prompt with binary rewards its expected gradient is parallel to the true one, but scaled by a
factor ``alpha`` that depends on the group size ``n``, on ``k`` and on the prompt's pass rate ``p``
(so across prompts it reweights them, and no learning rate undoes it). This module computes
``alpha`` exactly and writes the table that docs/math.md quotes.

Derivation. One prompt, pass probability ``p = sum_{y correct} pi(y)``, ``n`` i.i.d. responses, and
weights that depend only on which responses are correct. By exchangeability

    E[(1/n) sum_i w_i grad log pi(y_i)] = E[w_1 grad log pi(y_1)]
                                        = sum_y grad pi(y) E[w_1 | y_1 = y]
                                        = (a_1 - a_0) grad p,

where ``a_r = E[w_1 | R_1 = r]`` averages the weight of a response with reward ``r`` over the
number ``j ~ Binomial(n - 1, p)`` of correct responses among the other ``n - 1``. The target is
``grad Pass@k = grad(1 - (1 - p)^k) = k (1 - p)^(k - 1) grad p``, hence

    alpha = (a_1 - a_0) / (k (1 - p)^(k - 1)).

The weights come from the library itself, one group per count of correct responses;
tests/test_audit_regressions.py checks this formula against brute-force enumeration of every
sample set of small categorical policies, and that it gives ``alpha = 1`` for the unbiased
estimators.

Run ``python -m benchmarks.passk_alpha`` to print the table.
"""

from __future__ import annotations

from math import comb

import numpy as np

import rspo_kernels as rk

__all__ = ["TABLE_KS", "TABLE_NS", "TABLE_PS", "alpha", "alpha_table_markdown", "main"]

TABLE_NS = (4, 8, 16, 64)
TABLE_KS = (1, 2, 4, 8, 16)
TABLE_PS = (0.01, 0.1, 0.3, 0.5, 0.9)


def alpha(n: int, k: int, p: float, estimator: str = "passk_training_std") -> float:
    """``alpha`` with ``E[g] = alpha * grad Pass@k`` for groups of ``n``, exact (module docstring).

    Parameters
    ----------
    n, k : int
        Group size and the k of Pass@k, ``1 <= k <= n``.
    p : float
        The prompt's pass rate, ``0 < p < 1``.
    estimator : str, default "passk_training_std"
        Any Pass@k estimator whose weights depend only on the rewards (1 for the unbiased ones).

    Returns
    -------
    float
        The scale, in float64.
    """
    # Row c holds c correct responses first: w[c, 0] is a correct one's weight (c >= 1), w[c, -1] a
    # wrong one's (c <= n - 1).
    groups = np.array([[1.0] * c + [0.0] * (n - c) for c in range(n + 1)])
    w = np.asarray(rk.pass_at_k_weights(groups, k, estimator=estimator), dtype=np.float64)
    j = np.arange(n)  # correct responses among the other n - 1
    pmf = np.array([comb(n - 1, int(i)) * p**i * (1 - p) ** (n - 1 - i) for i in j])
    a_correct = float(pmf @ w[j + 1, 0])
    a_wrong = float(pmf @ w[j, n - 1])
    return (a_correct - a_wrong) / (k * (1 - p) ** (k - 1))


def alpha_table_markdown() -> str:
    """The table of ``alpha`` over :data:`TABLE_NS` x :data:`TABLE_KS` (k <= n) x :data:`TABLE_PS`."""
    lines = [
        "| n | k | " + " | ".join(f"p = {p}" for p in TABLE_PS) + " |",
        "|---|---|" + "---|" * len(TABLE_PS),
    ]
    for n in TABLE_NS:
        for k in TABLE_KS:
            if k <= n:
                cells = " | ".join(f"{alpha(n, k, p):.3g}" for p in TABLE_PS)
                lines.append(f"| {n} | {k} | {cells} |")
    return "\n".join(lines)


def main() -> int:
    print(alpha_table_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
