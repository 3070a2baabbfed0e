"""Exact unbiasedness: expectation over every sample set of a small softmax policy.

For a categorical policy over m responses with logits theta, enumerate all m**n ordered sample
sets, weigh each by its probability, and compare ``E[(1/n) sum_i w_i grad log pi(y_i)]`` with the
analytic gradient of Pass@k / Max@k (autograd through the exact metric) to 1e-10 in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import expected_gradient

import rspo_kernels as rk
from rspo_kernels._dispatch import BACKEND_ENV

UNBIASED = ["rspo", "hitchhiking", "pkpo", "pkpo_loo", "ordergrad"]

# (rewards per response, logits): ties among rewards on purpose.
MAX_POLICIES = [
    (np.array([0.2, 0.7, 0.7, -0.5]), np.array([0.3, -0.2, 0.5, 0.1])),
    (np.array([0.3, 0.3, 1.0, -1.0, 2.0]), np.array([0.0, 0.4, -0.3, 0.2, -0.6])),
    (np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.0, -0.5])),
]
PASS_POLICIES = [
    (np.array([0.0, 1.0, 1.0]), np.array([0.4, -0.1, -0.6])),
    (np.array([1.0, 0.0, 0.0, 1.0, 0.0]), np.array([-0.5, 0.3, 0.1, -0.2, 0.6])),
]


def exact_max_at_k(logits: torch.Tensor, rewards: np.ndarray, k: int) -> torch.Tensor:
    """E[max of k i.i.d. draws] = sum over distinct values v of v (F(v)^k - F(v-)^k)."""
    pi = torch.softmax(logits, dim=0)
    total = logits.new_zeros(())
    for v in np.unique(rewards):
        at_or_below = pi[torch.from_numpy(rewards <= v)].sum()
        below = pi[torch.from_numpy(rewards < v)].sum()
        total = total + float(v) * (at_or_below**k - below**k)
    return total


def exact_pass_at_k(logits: torch.Tensor, rewards: np.ndarray, k: int) -> torch.Tensor:
    pi = torch.softmax(logits, dim=0)
    return 1 - (1 - pi[torch.from_numpy(rewards == 1)].sum()) ** k


def analytic_gradient(metric, logits: np.ndarray, rewards: np.ndarray, k: int) -> np.ndarray:
    theta = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    metric(theta, rewards, k).backward()
    return theta.grad.numpy()


def _cases(policies):
    for p_idx, (rewards, logits) in enumerate(policies):
        for n in range(1, 7):
            if len(rewards) ** n > 16000:
                continue
            for k in range(1, n + 1):
                yield pytest.param(rewards, logits, n, k, id=f"policy{p_idx}-n{n}-k{k}")


def _applicable(estimator: str, n: int, k: int) -> bool:
    return not ((estimator == "hitchhiking" and n % k) or (estimator in ("pkpo_loo", "ordergrad") and k >= n))


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "reference")


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


@pytest.mark.parametrize("rewards,logits,n,k", list(_cases(MAX_POLICIES)))
def test_max_at_k_estimators_are_unbiased(rewards, logits, n, k):
    target = analytic_gradient(exact_max_at_k, logits, rewards, k)
    for estimator in UNBIASED:
        if not _applicable(estimator, n, k):
            continue
        got = expected_gradient(
            _softmax(logits),
            rewards,
            n,
            lambda r, k=k, estimator=estimator: rk.max_at_k_weights(r, k, estimator=estimator),
        )
        np.testing.assert_allclose(got, target, rtol=0, atol=1e-10, err_msg=estimator)


@pytest.mark.parametrize("rewards,logits,n,k", list(_cases(PASS_POLICIES)))
def test_pass_at_k_estimators_are_unbiased(rewards, logits, n, k):
    target = analytic_gradient(exact_pass_at_k, logits, rewards, k)
    for estimator in UNBIASED:
        if not _applicable(estimator, n, k):
            continue
        got = expected_gradient(
            _softmax(logits),
            rewards,
            n,
            lambda r, k=k, estimator=estimator: rk.pass_at_k_weights(r, k, estimator=estimator),
        )
        np.testing.assert_allclose(got, target, rtol=0, atol=1e-10, err_msg=estimator)


@pytest.mark.parametrize("objective", ["pass@k", "max@k"])
def test_plugin_is_biased(objective):
    rewards, logits = (PASS_POLICIES if objective == "pass@k" else MAX_POLICIES)[1]
    metric = exact_pass_at_k if objective == "pass@k" else exact_max_at_k
    weights = rk.pass_at_k_weights if objective == "pass@k" else rk.max_at_k_weights
    n, k = 4, 3
    target = analytic_gradient(metric, logits, rewards, k)
    got = expected_gradient(_softmax(logits), rewards, n, lambda r: weights(r, k, estimator="plugin"))
    assert np.abs(got - target).max() > 1e-3  # a real bias, far above rounding
    # ... while the same enumeration confirms RSPO on the identical policy.
    rspo = expected_gradient(_softmax(logits), rewards, n, lambda r: weights(r, k))
    np.testing.assert_allclose(rspo, target, rtol=0, atol=1e-10)


def test_plugin_is_unbiased_at_k_1():
    rewards, logits = MAX_POLICIES[0]
    target = analytic_gradient(exact_max_at_k, logits, rewards, 1)
    got = expected_gradient(_softmax(logits), rewards, 3, lambda r: rk.max_at_k_weights(r, 1, estimator="plugin"))
    np.testing.assert_allclose(got, target, rtol=0, atol=1e-12)


def test_passk_training_std_is_biased():
    """Issue 15 §2: Chen et al.'s std-normalised estimator, by exact enumeration.

    With binary rewards on one prompt, every estimator whose weights depend only on which
    samples are correct has an expectation parallel to grad Pass@k, so the bias is a factor
    ``alpha``: E[g] = alpha grad. For this estimator ``alpha`` is far from 1, changes with the
    policy's pass rate (so across prompts it reweights them: no learning rate undoes it), and is
    exactly 0 at k = n, where every advantage is 0. Measured (n = 4, k = 1..4): alpha = 1.616,
    0.584, 0.192, 0 on the first policy and 1.645, 0.543, 0.192, 0 on the second (the 2-decimal
    values are reported, not asserted).
    """
    n = 4
    alphas = {}
    for p_idx, (rewards, logits) in enumerate(PASS_POLICIES):
        for k in range(1, n + 1):
            target = analytic_gradient(exact_pass_at_k, logits, rewards, k)
            got = expected_gradient(
                _softmax(logits), rewards, n, lambda r, k=k: rk.pass_at_k_weights(r, k, estimator="passk_training_std")
            )
            alpha = float(got @ target / (target @ target))
            np.testing.assert_allclose(got, alpha * target, rtol=0, atol=1e-12)
            alphas[p_idx, k] = alpha
            rspo = expected_gradient(_softmax(logits), rewards, n, lambda r, k=k: rk.pass_at_k_weights(r, k))
            np.testing.assert_allclose(rspo, target, rtol=0, atol=1e-10)  # same policy, unbiased
    for k in range(1, n):
        assert all(abs(alphas[p, k] - 1) > 0.15 for p in range(len(PASS_POLICIES))), alphas
    for k in range(1, n - 1):  # (at k = n - 1 the factor happens to be the same for both policies)
        assert abs(alphas[0, k] - alphas[1, k]) > 0.01, alphas  # depends on the policy
    assert alphas[0, n] == alphas[1, n] == 0.0
