"""Estimator quality: variance (and bias) of the policy-gradient estimate, in the style of PKPO's Figure 4.

A categorical policy ``pi = softmax(theta)`` over ``m`` actions with fixed rewards ``r[a]``. One group
of ``n`` i.i.d. responses gives the gradient estimate (library scale, docs/math.md)

    g_hat = (1/n) sum_i w_i grad_theta log pi(y_i),     grad_theta log pi(a) = e_a - pi,

whose expectation is ``grad Max@k`` (``grad Pass@k`` for binary rewards) for the unbiased estimators.
For each estimator we report ``tr Cov[g_hat]``, the bias ``||E g_hat - grad||`` and the scale
``alpha = <E g_hat, grad> / |grad|^2`` (1 for the unbiased ones). Chen et al.'s std-normalised
``passk_training_std`` (Pass@k only) is on another scale: with binary rewards its expectation is
``alpha * grad``, so the table also gives its variance at matched scale, ``tr Cov / alpha^2``:

- exactly, by enumerating the multisets of actions: every estimator but hitchhiking gives tied
  rewards one weight and commutes with reordering a group, so ``g_hat`` depends only on the counts
  ``(c_1, ..., c_m)``, whose law is multinomial: ``C(n+m-1, m-1)`` cases (969 for m = 4, n = 16)
  instead of ``m^n``. Hitchhiking depends on the order, but its ``g_hat`` is the mean of ``n/k``
  independent one-block estimates, so its mean is the block's and its ``tr Cov`` is ``k/n`` times
  the block's, enumerated over the ``m^k`` ordered blocks. (:func:`exact_moments_ordered`, all
  ``m^n`` ordered groups, is the cross-check the tests use);
- by Monte Carlo for larger n, with a 95% confidence interval from the CLT on the per-sample
  squared deviations. All estimators see the same samples (common random numbers).

OrderGrad / MaxPO (``"ordergrad"``, exactly centred and unbiased) sits beside RSPO in every row, and
:func:`markdown_table` ends each row with the unbiased estimator of lowest variance. RS-GRPO
(:func:`rspo_kernels.risk_sensitive_weights`) estimates another objective, ``J_beta = (1/beta) log
E exp(beta R)``, and has no k: its rows (:func:`run_risk_sensitive`, one per beta) give its
``tr Cov``, its scale ``alpha`` and bias relative to ``grad J_beta``, and the figure draws it as a
horizontal line on each panel.

The MaxRL family (:func:`rspo_kernels.maxrl_weights`) gets its own rows, table and figure: the
target is ``grad J_T`` with ``J_T = sum_{k<=T} (1/k) pass@k`` (the ``k`` column holds the order
T), on binary policies; ``vr_cond`` (no order; its expectation is ``grad J_n``) is compared at
matched scale, ``tr Cov / alpha^2``.

Run ``python -m benchmarks.variance`` (or ``rspo-kernels bench --variance``): it prints a table and
writes ``benchmarks/results/variance-<date>.json``, ``.md`` and, if matplotlib is installed, ``.png``.
The default run (exact n = 4, 8, 16, Monte Carlo n = 64) takes about 2 minutes of CPU time (5.5 minutes
wall on a 2-core machine shared with other jobs, 2026-12-07); the exact rows alone take seconds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "Policy",
    "POLICIES",
    "MAXRL_POLICIES",
    "true_gradient",
    "exact_moments",
    "monte_carlo_moments",
    "run_maxrl",
    "run_risk_sensitive",
    "exact_moments_ordered",
    "winners",
    "main",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ESTIMATORS = ("rspo", "ordergrad", "pkpo", "pkpo_loo", "hitchhiking", "plugin", "passk_training_std")
BIASED = ("plugin", "passk_training_std")
UNBIASED = tuple(e for e in ESTIMATORS if e not in BIASED)
RISK_BETAS = (1.0, 4.0)  # RS-GRPO's risk parameters in the variance rows
EXACT_MAX_GROUPS = 1 << 17  # enumerate m^n ordered groups up to this many
MAXRL_ESTIMATORS = ("rspo", "rloo", "maclaurin", "cross_fitted", "vr_cond")
MAXRL_BIASED = ("vr_cond",)  # for J_T with T < n (it estimates J_n)


@dataclass(frozen=True)
class Policy:
    name: str
    objective: str  # "pass@k" or "max@k"
    probs: tuple[float, ...]
    rewards: tuple[float, ...]


POLICIES = (
    # Bernoulli policies: one correct and one wrong answer (the wrong one's score is minus the correct one's).
    Policy("pass@k, Bernoulli p=0.1", "pass@k", (0.9, 0.1), (0.0, 1.0)),
    Policy("pass@k, Bernoulli p=0.5", "pass@k", (0.5, 0.5), (0.0, 1.0)),
    # One correct answer of four, found 10% of the time: the regime Pass@k training targets.
    Policy("pass@k, p(correct)=0.1", "pass@k", (0.4, 0.3, 0.2, 0.1), (0.0, 0.0, 0.0, 1.0)),
    # Graded rewards; the best response is the rarest.
    Policy("max@k, graded rewards", "max@k", (0.4, 0.3, 0.2, 0.1), (0.0, 0.3, 0.6, 1.0)),
)
MAXRL_POLICIES = (
    # The Pass@k policy above: three wrong answers, each with its own score direction.
    Policy("maxrl, p(correct)=0.1", "maxrl", (0.4, 0.3, 0.2, 0.1), (0.0, 0.0, 0.0, 1.0)),
    # A Bernoulli policy: one wrong answer, whose score is minus the correct one's.
    Policy("maxrl, Bernoulli p=0.1", "maxrl", (0.9, 0.1), (0.0, 1.0)),
)


def true_gradient(policy: Policy, k: int) -> np.ndarray:
    """``grad_theta`` of ``sum_a r_a [F<=(a)^k - F<(a)^k]`` at ``theta = log probs`` (autograd, float64).

    For a MaxRL policy, of ``J_k = sum_{j<=k} (1/j) (1 - (1-p)^j)``, ``p`` the probability of reward 1.
    """
    theta = torch.tensor(np.log(policy.probs), dtype=torch.float64, requires_grad=True)
    pi = torch.softmax(theta, 0)
    r = torch.tensor(policy.rewards, dtype=torch.float64)
    if policy.objective == "maxrl":
        p = pi[r == 1].sum()
        (grad,) = torch.autograd.grad(sum((1 - (1 - p) ** j) / j for j in range(1, k + 1)), theta)
        return grad.numpy()
    below_eq = torch.stack([pi[r <= x].sum() for x in r])
    below = torch.stack([pi[r < x].sum() for x in r])
    objective = (r * (below_eq.pow(k) - below.pow(k))).sum()
    (grad,) = torch.autograd.grad(objective, theta)
    return grad.numpy()


def risk_sensitive_gradient(policy: Policy, beta: float) -> np.ndarray:
    """``grad_theta`` of RS-GRPO's ``J_beta = (1/beta) log sum_a pi_a exp(beta r_a)`` (autograd, float64)."""
    theta = torch.tensor(np.log(policy.probs), dtype=torch.float64, requires_grad=True)
    r = torch.tensor(policy.rewards, dtype=torch.float64)
    objective = torch.logsumexp(torch.log_softmax(theta, 0) + beta * r, 0) / beta
    (grad,) = torch.autograd.grad(objective, theta)
    return grad.numpy()


def _target(policy: Policy, k: float, estimator: str) -> np.ndarray:
    """The gradient an estimator aims at: ``grad J_beta`` for RS-GRPO (``k`` holds beta), else :func:`true_gradient`."""
    return risk_sensitive_gradient(policy, k) if estimator == "risk_sensitive" else true_gradient(policy, int(k))


def _weights(policy: Policy, rewards: np.ndarray, k: float, estimator: str) -> np.ndarray:
    from rspo_kernels.weights import api

    if estimator == "risk_sensitive":  # no k: the slot holds RS-GRPO's beta
        return np.asarray(api.risk_sensitive_weights(rewards, k, validate=False))
    if policy.objective == "maxrl":
        order = None if estimator == "vr_cond" else k
        return np.asarray(api.maxrl_weights(rewards, order, estimator=estimator, validate=False))
    fn = api.pass_at_k_weights if policy.objective == "pass@k" else api.max_at_k_weights
    return np.asarray(fn(rewards, k, estimator=estimator, validate=False))


def _estimates(policy: Policy, actions: np.ndarray, k: float, estimator: str) -> np.ndarray:
    """``(T, m)`` gradient estimates of the groups ``actions`` (``(T, n)`` action indices)."""
    m = len(policy.probs)
    n = actions.shape[1]
    rewards = np.asarray(policy.rewards)[actions]
    w = _weights(policy, rewards, k, estimator)  # (T, n)
    g = np.zeros((actions.shape[0], m))
    for a in range(m):  # sum_i w_i e_{y_i}, one action at a time (m is small)
        g[:, a] = (w * (actions == a)).sum(1)
    g -= w.sum(1, keepdims=True) * np.asarray(policy.probs)[None, :]
    return g / n


def valid(estimator: str, n: int, k: int, objective: str = "pass@k") -> bool:
    if estimator == "passk_training_std":
        return objective == "pass@k"
    if estimator == "hitchhiking":
        return n % k == 0
    if estimator in ("pkpo_loo", "ordergrad"):
        return k < n
    return True


def _compositions(n: int, m: int) -> np.ndarray:
    """Every ``(c_1, ..., c_m)`` of non-negative counts summing to ``n``, ``(C(n+m-1, m-1), m)`` int64."""
    rows = []
    for bars in itertools.combinations(range(n + m - 1), m - 1):  # stars and bars
        edges = (-1, *bars, n + m - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(m)])
    return np.array(rows, dtype=np.int64).reshape(-1, m)


def _moments(prob: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, float]:
    mean = prob @ g
    return mean, float(prob @ ((g - mean) ** 2).sum(1))


def exact_moments_ordered(policy: Policy, n: int, k: float, estimator: str) -> tuple[np.ndarray, float]:
    """``(E g_hat, tr Cov g_hat)`` by enumerating all ``m^n`` ordered groups (any estimator, small n)."""
    m = len(policy.probs)
    if m**n > EXACT_MAX_GROUPS:
        raise ValueError(f"{m}^{n} ordered groups are too many to enumerate")
    actions = np.array(list(itertools.product(range(m), repeat=n)), dtype=np.int64).reshape(-1, n)
    prob = np.prod(np.asarray(policy.probs)[actions], axis=1)
    return _moments(prob, _estimates(policy, actions, k, estimator))


def exact_moments(policy: Policy, n: int, k: float, estimator: str) -> dict:
    """Exact ``tr Cov`` and bias (module docstring: multisets, or blocks for hitchhiking)."""
    m = len(policy.probs)
    if estimator == "hitchhiking":
        # n/k independent blocks, each the hitchhiking estimate of a group of k: same mean, k/n the trace.
        mean, block_trace = exact_moments_ordered(policy, int(k), k, estimator)
        trace, cases = block_trace * k / n, m ** int(k)
    else:
        counts = _compositions(n, m)
        log_coef = math.lgamma(n + 1) - np.array([sum(math.lgamma(c + 1) for c in row) for row in counts])
        prob = np.exp(log_coef + (counts * np.log(np.asarray(policy.probs))[None, :]).sum(1))
        actions = np.stack([np.repeat(np.arange(m), row) for row in counts])  # one ordering per multiset
        mean, trace = _moments(prob, _estimates(policy, actions, k, estimator))
        cases = counts.shape[0]
    grad = _target(policy, k, estimator)
    return {
        "method": "exact",
        "trace_cov": trace,
        "ci95": 0.0,
        "bias": float(np.linalg.norm(mean - grad)),
        "scale": _scale(mean, grad),
        "samples": int(cases),
    }


def _scale(mean: np.ndarray, grad: np.ndarray) -> float:
    """``<E g, grad> / |grad|^2``: the factor by which an estimator's expectation scales the gradient."""
    norm2 = float(grad @ grad)
    return float(mean @ grad) / norm2 if norm2 > 0 else float("nan")


def monte_carlo_moments(policy: Policy, n: int, k: int, estimator: str, actions: np.ndarray) -> dict:
    """Monte Carlo ``tr Cov`` (95% CI half-width from the CLT) and bias from sampled groups."""
    g = _estimates(policy, actions, k, estimator)
    t = g.shape[0]
    mean = g.mean(0)
    sq = ((g - mean) ** 2).sum(1) * t / (t - 1)
    trace = float(sq.mean())
    ci = float(1.96 * sq.std(ddof=1) / math.sqrt(t))
    grad = _target(policy, k, estimator)
    bias = float(np.linalg.norm(mean - grad))
    # The bias estimate includes sampling noise of size about sqrt(trace / T).
    return {
        "method": "monte-carlo",
        "trace_cov": trace,
        "ci95": ci,
        "bias": bias,
        "scale": _scale(mean, grad),
        "bias_noise": math.sqrt(trace / t),
        "samples": int(t),
    }


EXACT_KS = (1, 2, 4)  # and n/2: the exact grid of issue 29


def k_values(n: int, exact: bool = False) -> list[int]:
    """The ks of a row: ``{1, 2, 4, n/2}`` for exact n, a wider spread for Monte Carlo n."""
    if exact:
        return sorted(k for k in {*EXACT_KS, n // 2} if 1 <= k <= n)
    if n <= 8:
        return list(range(1, n + 1))
    ks = {1, 2, 4, n // 4, n // 2, 3 * n // 4, n - 1, n}
    ks |= {2**j for j in range(int(math.log2(n)) + 1)}
    return sorted(k for k in ks if 1 <= k <= n)


def run(ns_exact, ns_mc, samples: int, seed: int = 0) -> list[dict]:
    return _run(POLICIES, ESTIMATORS, ns_exact, ns_mc, samples, seed, k_values)


def run_maxrl(ns_exact, ns_mc, samples: int, seed: int = 0) -> list[dict]:
    """The MaxRL rows: ``k`` is the order T, the target ``grad J_T``; ``"matched"`` is
    ``tr Cov / alpha^2`` (the biased ``vr_cond`` at the scale of the unbiased ones)."""
    rows = _run(MAXRL_POLICIES, MAXRL_ESTIMATORS, ns_exact, ns_mc, samples, seed, lambda n, exact: k_values(n))
    for r in rows:
        r["matched"] = r["trace_cov"] / r["scale"] ** 2 if r["scale"] ** 2 else float("inf")
    return rows


def run_risk_sensitive(ns_exact, ns_mc, samples: int, seed: int = 0, betas=RISK_BETAS) -> list[dict]:
    """RS-GRPO's rows on :data:`POLICIES`: ``k`` is None and ``beta`` set; the target is ``grad J_beta``.

    ``scale`` is ``alpha`` with ``E g = alpha grad J_beta`` along the gradient (exactly parallel for
    binary rewards), ``bias`` its distance from ``grad J_beta``; ``ratio_to_rspo`` compares its
    ``tr Cov`` with RSPO's at k = 1 (plain policy gradient, the beta -> 0 end) on the same groups.
    """
    rows = []
    for policy in POLICIES:
        m = len(policy.probs)
        for n in list(ns_exact) + list(ns_mc):
            exact = n in ns_exact
            actions = None
            if not exact:
                rng = np.random.default_rng([seed, n])
                actions = rng.choice(m, size=(samples, n), p=policy.probs)
            base = exact_moments(policy, n, 1, "rspo") if exact else monte_carlo_moments(policy, n, 1, "rspo", actions)
            for beta in betas:
                res = (
                    exact_moments(policy, n, beta, "risk_sensitive")
                    if exact
                    else monte_carlo_moments(policy, n, beta, "risk_sensitive", actions)
                )
                rows.append(
                    {
                        "policy": policy.name,
                        "objective": "risk-sensitive",
                        "n": n,
                        "k": None,
                        "beta": beta,
                        "estimator": "risk_sensitive",
                        **res,
                        "ratio_to_rspo": res["trace_cov"] / base["trace_cov"],
                    }
                )
    return rows


def _run(policies, estimators, ns_exact, ns_mc, samples: int, seed: int, grid) -> list[dict]:
    rows = []
    for policy in policies:
        m = len(policy.probs)
        for n in list(ns_exact) + list(ns_mc):
            exact = n in ns_exact
            actions = None
            if not exact:
                rng = np.random.default_rng([seed, n])
                actions = rng.choice(m, size=(samples, n), p=policy.probs)
            for k in grid(n, exact):
                for estimator in estimators:
                    if not valid(estimator, n, k, policy.objective):
                        continue
                    res = (
                        exact_moments(policy, n, k, estimator)
                        if exact
                        else monte_carlo_moments(policy, n, k, estimator, actions)
                    )
                    rows.append(
                        {
                            "policy": policy.name,
                            "objective": policy.objective,
                            "n": n,
                            "k": k,
                            "estimator": estimator,
                            **res,
                        }
                    )
    # Variance relative to RSPO at the same (policy, n, k).
    ref = {(r["policy"], r["n"], r["k"]): r["trace_cov"] for r in rows if r["estimator"] == "rspo"}
    for r in rows:
        base = ref[(r["policy"], r["n"], r["k"])]
        r["ratio_to_rspo"] = r["trace_cov"] / base if base > 0 else float("nan")
    return rows


_KINDS = ("pass@k", "max@k")  # the rows of the main table (MaxRL and RS-GRPO have their own)


def _order(policy: str) -> int:
    names = [p.name for p in POLICIES + MAXRL_POLICIES]
    return names.index(policy) if policy in names else len(names)


def _percent(bias: float, grad: float) -> str:
    """``bias`` as a percentage of ``|grad|``; "grad = 0" where the gradient underflows (p = 0.5, k near 64)."""
    return f"{100 * bias / grad:.0f}%" if grad > 0 else "grad = 0"


def _lowest(by: dict, p: str, n: int, k: int) -> list[str]:
    """The unbiased estimators of lowest tr Cov at (policy, n, k); several when they tie (to 1e-12)."""
    cands = [(by[(p, n, k, e)]["trace_cov"], e) for e in UNBIASED if (p, n, k, e) in by]
    best = min(t for t, _ in cands)
    return [e for t, e in cands if t <= best * (1 + 1e-12) + 1e-300]


def markdown_table(rows: list[dict]) -> str:
    """One row per (policy, n, k): tr Cov of each estimator (x RSPO), the biased ones' bias, and the
    unbiased estimator(s) of lowest variance.

    ``passk_training_std`` also shows ``[x RSPO at matched scale]``: its tr Cov divided by
    ``alpha^2`` (``[E g = 0]`` at k = n, where it is identically 0). MaxRL rows: :func:`maxrl_table`;
    RS-GRPO rows: :func:`risk_sensitive_table`.
    """
    rows = [r for r in rows if r["objective"] in _KINDS]
    lines = [
        "| policy | n | k | method | "
        + " | ".join(f"{e} tr Cov (x rspo)" for e in ESTIMATORS)
        + " | "
        + " | ".join(f"{e} bias (% of grad)" for e in BIASED)
        + " | lowest (unbiased) |",
        "|---|---|---|---|" + "---|" * (len(ESTIMATORS) + len(BIASED) + 1),
    ]
    keys = sorted({(r["policy"], r["n"], r["k"]) for r in rows}, key=lambda t: (_order(t[0]), t[1], t[2]))
    by = {(r["policy"], r["n"], r["k"], r["estimator"]): r for r in rows}
    for p, n, k in keys:
        cells = []
        method = by[(p, n, k, "rspo")]["method"]
        grad = float(np.linalg.norm(true_gradient(_policy(p), k)))
        for e in ESTIMATORS:
            r = by.get((p, n, k, e))
            if r is None:
                cells.append("-")
            elif e == "rspo":
                ci = f" ± {r['ci95']:.2g}" if r["ci95"] else ""
                cells.append(f"{r['trace_cov']:.4g}{ci}")
            elif e == "passk_training_std":
                # alpha^2 underflows to 0 where E g vanishes to float precision (k near n)
                matched = f"[{r['ratio_to_rspo'] / r['scale'] ** 2:.2f}x]" if r["scale"] ** 2 else "[E g = 0]"
                cells.append(f"{r['trace_cov']:.4g} ({r['ratio_to_rspo']:.2f}x) {matched}")
            else:
                cells.append(f"{r['trace_cov']:.4g} ({r['ratio_to_rspo']:.2f}x)")
        for e in BIASED:
            r = by.get((p, n, k, e))
            cells.append("-" if r is None else f"{r['bias']:.3g} ({_percent(r['bias'], grad)})")
        cells.append(" = ".join(_lowest(by, p, n, k)) if method == "exact" else "(Monte Carlo)")
        lines.append(f"| {p} | {n} | {k} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DOCS_NS = (4, 8, 16)  # the exact table of docs/weights.md


def exact_docs_table(rows: list[dict]) -> str:
    """The compact exact table docs/weights.md embeds: tr Cov of the unbiased estimators (x RSPO)
    and the lowest, one row per (policy, n, k) of the exact rows."""
    rows = [r for r in rows if r["objective"] in _KINDS and r["method"] == "exact"]
    by = {(r["policy"], r["n"], r["k"], r["estimator"]): r for r in rows}
    lines = [
        "| policy | n | k | " + " | ".join(UNBIASED) + " | lowest |",
        "|---|---|---|" + "---|" * (len(UNBIASED) + 1),
    ]
    keys = sorted({(r["policy"], r["n"], r["k"]) for r in rows}, key=lambda t: (_order(t[0]), t[1], t[2]))
    for p, n, k in keys:
        cells = []
        for e in UNBIASED:
            r = by.get((p, n, k, e))
            if r is None:
                cells.append("-")
            elif e == "rspo":
                cells.append(f"{r['trace_cov']:.3g}")
            else:
                cells.append(f"{r['trace_cov']:.3g} ({r['ratio_to_rspo']:.2f}x)")
        cells.append(" = ".join(_lowest(by, p, n, k)))
        lines.append(f"| {p} | {n} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def winners(rows: list[dict]) -> str:
    """Which unbiased estimator has the lowest exact variance where, and OrderGrad against RSPO.

    One bullet per policy: the ks (per n) at which each estimator is lowest, and the range of
    ``tr Cov(ordergrad) / tr Cov(rspo)`` over the exact rows where both exist.
    """
    rows = [r for r in rows if r["objective"] in _KINDS and r["method"] == "exact"]
    by = {(r["policy"], r["n"], r["k"], r["estimator"]): r for r in rows}
    lines = []
    for p in POLICIES:
        keys = sorted({(r["n"], r["k"]) for r in rows if r["policy"] == p.name})
        if not keys:
            continue
        wins: dict[str, dict[int, list[int]]] = {}
        for n, k in keys:
            for e in _lowest(by, p.name, n, k):
                wins.setdefault(e, {}).setdefault(n, []).append(k)
        parts = []
        for e, per_n in sorted(wins.items(), key=lambda item: -sum(map(len, item[1].values()))):
            where = "; ".join(f"n={n}: k={','.join(map(str, ks))}" for n, ks in sorted(per_n.items()))
            parts.append(f"{e} ({where})")
        ratios = [
            by[(p.name, n, k, "ordergrad")]["ratio_to_rspo"] for n, k in keys if (p.name, n, k, "ordergrad") in by
        ]
        span = f"; ordergrad / rspo tr Cov {min(ratios):.2f}x to {max(ratios):.2f}x" if ratios else ""
        lines.append(f"- {p.name}: lowest is " + ", ".join(parts) + span)
    return "\n".join(lines)


def headline(rows: list[dict]) -> str:
    """Variance ratios to RSPO at the largest exact n (k = n/2) and the largest Monte Carlo n (k = n/4)."""
    rows = [r for r in rows if r["objective"] in _KINDS]
    sentences = []
    for method, frac in (("exact", 2), ("monte-carlo", 4)):
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        n = max(r["n"] for r in sel)
        k = max(1, n // frac)
        parts = []
        for p in POLICIES:
            by = {r["estimator"]: r for r in sel if r["policy"] == p.name and r["n"] == n and r["k"] == k}
            if "rspo" not in by:
                continue
            grad = float(np.linalg.norm(true_gradient(p, k)))
            ratios = ", ".join(
                f"{e} {by[e]['ratio_to_rspo']:.2f}x"
                for e in ("ordergrad", "pkpo", "pkpo_loo", "hitchhiking")
                if e in by
            )
            plugin = by["plugin"]
            part = (
                f"{p.name}: {ratios}; plugin {plugin['ratio_to_rspo']:.2f}x with bias "
                f"{100 * plugin['bias'] / grad:.0f}% of |grad|"
            )
            if "passk_training_std" in by:
                chen = by["passk_training_std"]
                part += (
                    f"; passk_training_std (Chen et al.) E[g] = {chen['scale']:.2f} grad, bias "
                    f"{100 * chen['bias'] / grad:.0f}% of |grad|, tr Cov at matched scale "
                    f"{chen['ratio_to_rspo'] / chen['scale'] ** 2:.2f}x"
                )
            parts.append(part)
        sentences.append(f"n={n}, k={k} ({method}), tr Cov relative to RSPO -- " + " | ".join(parts) + ".")
    return " ".join(sentences)


def risk_sensitive_table(rows: list[dict]) -> str:
    """RS-GRPO's rows: tr Cov (x RSPO at k = 1 on the same groups), ``alpha`` and bias for ``grad J_beta``."""
    rows = [r for r in rows if r["objective"] == "risk-sensitive"]
    lines = [
        "| policy | n | beta | method | risk_sensitive tr Cov (x rspo at k=1) | E[g] = alpha grad J_beta: alpha "
        "| bias (% of grad J_beta) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (_order(r["policy"]), r["n"], r["beta"])):
        grad = float(np.linalg.norm(risk_sensitive_gradient(_policy(r["policy"]), r["beta"])))
        ci = f" ± {r['ci95']:.2g}" if r["ci95"] else ""
        lines.append(
            f"| {r['policy']} | {r['n']} | {r['beta']:g} | {r['method']} | {r['trace_cov']:.4g}{ci} "
            f"({r['ratio_to_rspo']:.2f}x) | {r['scale']:.3f} | {r['bias']:.3g} ({100 * r['bias'] / grad:.0f}%) |"
        )
    return "\n".join(lines)


def _policy(name: str) -> Policy:
    return next(p for p in POLICIES + MAXRL_POLICIES if p.name == name)


def maxrl_table(rows: list[dict]) -> str:
    """One row per (policy, n, T): tr Cov of each MaxRL estimator (x ``"rspo"``); ``vr_cond`` also
    at matched scale ``[tr Cov / alpha^2, x rspo]`` and its bias relative to ``grad J_T``."""
    rows = [r for r in rows if r["objective"] == "maxrl"]
    lines = [
        "| policy | n | T | method | "
        + " | ".join(f"{e} tr Cov (x rspo)" for e in MAXRL_ESTIMATORS)
        + " | vr_cond bias (% of grad J_T) |",
        "|---|---|---|---|" + "---|" * (len(MAXRL_ESTIMATORS) + 1),
    ]
    by = {(r["policy"], r["n"], r["k"], r["estimator"]): r for r in rows}
    for p, n, t in sorted({(r["policy"], r["n"], r["k"]) for r in rows}):
        base = by[(p, n, t, "rspo")]
        cells = []
        for e in MAXRL_ESTIMATORS:
            r = by[(p, n, t, e)]
            if e == "rspo":
                cells.append(f"{r['trace_cov']:.4g}" + (f" ± {r['ci95']:.2g}" if r["ci95"] else ""))
            elif e in MAXRL_BIASED:
                cells.append(
                    f"{r['trace_cov']:.4g} ({r['ratio_to_rspo']:.2f}x) [{r['matched'] / base['trace_cov']:.2f}x]"
                )
            else:
                cells.append(f"{r['trace_cov']:.4g} ({r['ratio_to_rspo']:.2f}x)")
        grad = float(np.linalg.norm(true_gradient(_policy(p), t)))
        vr = by[(p, n, t, "vr_cond")]
        cells.append(f"{vr['bias']:.3g} ({100 * vr['bias'] / grad:.0f}%)")
        lines.append(f"| {p} | {n} | {t} | {base['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def maxrl_headline(rows: list[dict]) -> str:
    """MaxRL variance ratios to ``"rspo"`` at the largest exact n (T = n/2) and Monte Carlo n (T = n/4)."""
    rows = [r for r in rows if r["objective"] == "maxrl"]
    sentences = []
    for method, frac in (("exact", 2), ("monte-carlo", 4)):
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        n = max(r["n"] for r in sel)
        t = max(1, n // frac)
        parts = []
        for p in MAXRL_POLICIES:
            by = {r["estimator"]: r for r in sel if r["policy"] == p.name and r["n"] == n and r["k"] == t}
            ratios = ", ".join(f"{e} {by[e]['ratio_to_rspo']:.2f}x" for e in MAXRL_ESTIMATORS[1:-1])
            vr = by["vr_cond"]
            parts.append(
                f"{p.name}: {ratios}; vr_cond E[g] = {vr['scale']:.2f} grad J_T, "
                f"tr Cov at matched scale {vr['matched'] / by['rspo']['trace_cov']:.2f}x"
            )
        sentences.append(f"MaxRL n={n}, T={t} ({method}), tr Cov relative to 'rspo' -- " + " | ".join(parts) + ".")
    return " ".join(sentences)


def plot_maxrl(rows: list[dict], path: Path) -> bool:
    """tr Cov against the order T for each MaxRL estimator (``vr_cond`` at matched scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if r["objective"] == "maxrl"]
    ns = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(
        len(MAXRL_POLICIES), len(ns), figsize=(3.2 * len(ns), 3.0 * len(MAXRL_POLICIES)), squeeze=False
    )
    for i, p in enumerate(MAXRL_POLICIES):
        for j, n in enumerate(ns):
            ax = axes[i][j]
            for c, e in enumerate(MAXRL_ESTIMATORS):
                sel = sorted(
                    (r for r in rows if r["policy"] == p.name and r["n"] == n and r["estimator"] == e),
                    key=lambda r: r["k"],
                )
                key = "matched" if e in MAXRL_BIASED else "trace_cov"
                sel = [r for r in sel if r[key] > 0]
                if sel:
                    label = f"{e} (matched scale)" if e in MAXRL_BIASED else e
                    ax.errorbar(
                        [r["k"] for r in sel],
                        [r[key] for r in sel],
                        yerr=[r["ci95"] for r in sel],
                        color=f"C{c}",
                        marker="os^Dv"[c],
                        ms=4,
                        lw=1.2,
                        capsize=2,
                        label=label,
                    )
            method = next(r["method"] for r in rows if r["n"] == n)
            ax.set_yscale("log")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{p.name}\nn={n} ({method})", fontsize=8)
            ax.set_xlabel("order T", fontsize=8)
            if j == 0:
                ax.set_ylabel("tr Cov[g_hat]", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# Colour and marker per estimator; an estimator not listed here still gets a distinct style.
_STYLES = {
    "rspo": ("#b2182b", "o"),
    "ordergrad": ("#e7298a", "*"),
    "pkpo": ("#ef8a62", "s"),
    "pkpo_loo": ("#1b7837", "^"),
    "hitchhiking": ("#2166ac", "D"),
    "plugin": ("#762a83", "v"),
    "passk_training_std": ("#7f7f7f", "P"),
}
_MATCHED = "passk_training_std"  # plotted at matched scale, tr Cov / alpha^2


def _style(estimator: str, index: int) -> tuple[str, str]:
    return _STYLES.get(estimator, (f"C{index % 10}", "XhpH*<>"[index % 7]))


def _series(panel: list[dict], estimator: str) -> tuple[list[dict], list[float], list[float], list[int]]:
    """One estimator's points of a panel: rows, plotted tr Cov, 95% CI half-widths, and the ks
    where its gradient vanishes (alpha = 0: nothing to plot on a log axis).

    ``passk_training_std`` is put at matched scale, ``tr Cov / alpha^2``: the variance of
    ``g / alpha``, whose expectation is the true gradient. Zero-variance points of the others are
    left out (a log axis cannot show them).
    """
    sel = sorted((r for r in panel if r["estimator"] == estimator), key=lambda r: r["k"])
    if estimator == _MATCHED:
        vanished = [r["k"] for r in sel if not (r["scale"] ** 2)]  # 0, or so small that alpha^2 underflows
        sel = [r for r in sel if r["scale"] ** 2]
        return (
            sel,
            [r["trace_cov"] / r["scale"] ** 2 for r in sel],
            [r["ci95"] / r["scale"] ** 2 for r in sel],
            vanished,
        )
    sel = [r for r in sel if r["trace_cov"] > 0]
    return sel, [r["trace_cov"] for r in sel], [r["ci95"] for r in sel], []


def plot(rows: list[dict], path: Path) -> bool:
    """Write the variance figure: tr Cov of each estimator against k, one panel per (policy, n).

    Lower is better. Error bars are 95% confidence intervals (Monte Carlo panels; the exact panels
    have none). ``passk_training_std`` is biased with ``E[g] = alpha grad`` for a binary reward, so
    it is drawn at matched scale, ``tr Cov / alpha^2``: at its raw scale it would look best only
    because its gradient is shrunk. At k = n its advantages are all 0 (alpha = 0), which a log axis
    cannot show: that point is marked on the panel's lower edge instead. RS-GRPO has no k: each
    beta is a horizontal dotted line (its raw tr Cov; it estimates ``grad J_beta``, not this k's
    gradient, and is biased for it: :func:`risk_sensitive_table`).
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        print("matplotlib is not installed; skipping the plot (pip install matplotlib)", file=sys.stderr)
        return False
    risk = [r for r in rows if r["objective"] == "risk-sensitive"]
    rows = [r for r in rows if r["objective"] != "risk-sensitive"]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    estimators = list(dict.fromkeys(r["estimator"] for r in rows))
    ns = sorted({r["n"] for r in rows})
    height = 3.3 * len(policies) + 1.5  # inches; the bottom 0.8 hold the legend
    fig = Figure(figsize=(3.6 * len(ns), height))
    axes = fig.subplots(len(policies), len(ns), squeeze=False)
    labels = {
        "plugin": "plugin (biased: variance)",
        _MATCHED: "passk_training_std at matched scale, tr Cov / alpha² (biased; alpha depends on n, k, p)",
    }
    handles: dict[str, Any] = {}
    for i, policy in enumerate(policies):
        for j, n in enumerate(ns):
            ax = axes[i][j]
            panel = [r for r in rows if r["policy"] == policy and r["n"] == n]
            if not panel:
                ax.set_visible(False)
                continue
            zero_at: list[int] = []  # k where an estimator's gradient vanishes (alpha = 0)
            for index, estimator in enumerate(estimators):
                sel, values, errors, vanished = _series(panel, estimator)
                zero_at += vanished
                if not sel:
                    continue
                color, marker = _style(estimator, index)
                dashed = estimator in BIASED
                handles[estimator] = ax.errorbar(
                    [r["k"] for r in sel],
                    values,
                    yerr=errors,
                    color=color,
                    marker=marker,
                    ms=4.5,
                    lw=1.6,
                    ls="--" if dashed else "-",
                    elinewidth=1.4,
                    capsize=3.5,
                    label=labels.get(estimator, estimator),
                )
                if estimator == "plugin":
                    mse = ax.plot(
                        [r["k"] for r in sel],
                        [r["trace_cov"] + r["bias"] ** 2 for r in sel],
                        color=color,
                        ls=":",
                        lw=1.4,
                        label="plugin (biased: variance + bias², the MSE)",
                    )
                    handles["plugin (MSE)"] = mse[0]
            for b, r in enumerate(
                sorted((r for r in risk if r["policy"] == policy and r["n"] == n), key=lambda r: r["beta"])
            ):
                if r["trace_cov"] > 0:
                    line = ax.axhline(r["trace_cov"], color=("#666666", "#111111")[b % 2], ls=":", lw=1.3)
                    handles[f"risk_sensitive beta={r['beta']:g}"] = line
            ax.set_yscale("log")
            ax.set_xscale("log", base=2)
            ks = sorted({r["k"] for r in panel})
            ax.set_xticks(ks, [str(k) if k in (1, n) or k & (k - 1) == 0 else "" for k in ks])
            for k in zero_at:  # on the lower edge, in axes coordinates, so it never leaves the panel
                ax.plot(k, 0.03, marker="P", ms=7, color=_style(_MATCHED, 0)[0], transform=ax.get_xaxis_transform())
                ax.annotate(
                    "k = n: all\nadvantages 0",
                    (k, 0.03),
                    xycoords=ax.get_xaxis_transform(),
                    xytext=(-4, 10),
                    textcoords="offset points",
                    ha="right",
                    fontsize=7,
                    color="#555555",
                )
            method = panel[0]["method"]
            rel = [r["ci95"] / r["trace_cov"] for r in panel if r["trace_cov"] > 0 and r["ci95"] > 0]
            detail = f"Monte Carlo, 95% CI up to ±{100 * max(rel):.0f}%" if rel else "exact"
            ax.set_title(f"{policy}\nn = {n} ({detail})", fontsize=9)
            ax.set_xlabel("order T" if str(policy).startswith("maxrl") else "k", fontsize=9)
            if j == 0:
                ax.set_ylabel("tr Cov of the gradient estimate", fontsize=9)
            ax.grid(alpha=0.3, which="major")
            ax.tick_params(labelsize=8)
            del method
    order = [e for e in estimators if e in handles] + sorted(h for h in handles if h.startswith("risk_sensitive"))
    if "plugin (MSE)" in handles:
        order.insert(order.index("plugin") + 1 if "plugin" in order else len(order), "plugin (MSE)")
    legend_handles = []
    for e in order:
        if e.startswith("risk_sensitive"):
            handles[e].set_label(f"RS-GRPO {e.split()[1]} (no k; biased for its own objective J_beta)")
        legend_handles.append(handles[e])
    legend_handles.append(
        Line2D([], [], color=_style(_MATCHED, 0)[0], marker="P", ls="", label="passk_training_std at k = n (alpha = 0)")
    )
    fig.legend(
        handles=legend_handles,
        loc="lower center",
        ncol=3,
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(
        "Variance of the Pass@k / Max@k policy-gradient estimate per estimator: lower is better\n"
        "(Bernoulli and 4-action categorical policies; unbiased estimators solid, biased dashed)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.8 / height, 1, 1))
    fig.savefig(path, dpi=120)
    return True


def _replot(json_path: Path) -> Path:
    """Redraw the figure of a results file without recomputing it (``--replot``)."""
    rows = json.loads(json_path.read_text())["rows"]
    out = json_path.with_suffix(".png")
    if not plot(rows, out):
        raise SystemExit(1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.variance", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--samples", type=int, default=None, help="Monte Carlo groups per n (default 40000)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output directory")
    parser.add_argument(
        "--replot", type=Path, metavar="JSON", help="only redraw the figure of a results file (writes JSON's .png)"
    )
    args = parser.parse_args(argv)
    if args.replot:
        print(f"wrote {_replot(args.replot)}")
        return 0
    if args.quick:
        ns_exact, ns_mc, samples = (2, 4), (8,), args.samples or 2000
    else:
        ns_exact, ns_mc, samples = (4, 8, 16), (64,), args.samples or 40000
    rows = (
        run(ns_exact, ns_mc, samples)
        + run_risk_sensitive(ns_exact, ns_mc, samples)
        + run_maxrl(ns_exact, ns_mc, samples)
    )
    table = markdown_table(rows)
    head = headline(rows)
    best = winners(rows)
    risk = risk_sensitive_table(rows)
    maxrl, maxrl_head = maxrl_table(rows), maxrl_headline(rows)
    print(table)
    print()
    print(head)
    print()
    print(best)
    print()
    print(risk)
    print()
    print(maxrl)
    print()
    print(maxrl_head)
    date = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    stem = f"variance-{date}{'-quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    import rspo_kernels

    report = {
        "kind": "variance",
        "date": date,
        "policies": [p.__dict__ for p in POLICIES + MAXRL_POLICIES],
        "monte_carlo_samples": samples,
        "versions": {"rspo_kernels": rspo_kernels.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "headline": head,
        "winners": best,
        "maxrl_headline": maxrl_head,
        "rows": rows,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    maxrl_md = f"## MaxRL (target: grad J_T)\n\n{maxrl_head}\n\n{maxrl}\n"
    risk_md = f"## RS-GRPO (target: grad J_beta, biased)\n\n{risk}\n"
    (args.out / f"{stem}.md").write_text(
        f"# Estimator variance ({date})\n\n{head}\n\nLowest exact variance among the unbiased estimators:\n\n"
        f"{best}\n\n{table}\n\n{risk_md}\n{maxrl_md}"
    )
    wrote = [f"{stem}.json", f"{stem}.md"]
    if plot(rows, args.out / f"{stem}.png"):
        wrote.append(f"{stem}.png")
    if plot_maxrl(rows, args.out / f"{stem}-maxrl.png"):
        wrote.append(f"{stem}-maxrl.png")
    print("wrote " + ", ".join(str(args.out / w) for w in wrote))
    return 0


if __name__ == "__main__":
    sys.exit(main())
