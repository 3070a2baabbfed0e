"""The torch specification against brute force on single groups (hypothesis, ties on purpose)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import oracles
import pytest
from conftest import reward_groups
from hypothesis import assume, given
from hypothesis import strategies as st

import rspo_kernels as rk
from rspo_kernels._dispatch import BACKEND_ENV

ESTIMATORS = ["rspo", "plugin", "hitchhiking", "pkpo", "pkpo_loo", "ordergrad"]
WEIGHTS = {"pass@k": rk.pass_at_k_weights, "max@k": rk.max_at_k_weights}


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    # This module checks the specification itself, whatever backend the machine prefers.
    monkeypatch.setenv(BACKEND_ENV, "reference")


def _valid(estimator: str, n: int, k: int) -> bool:
    if estimator == "hitchhiking":
        return n % k == 0
    if estimator in ("pkpo_loo", "ordergrad"):
        return k < n
    return True


def _spec(objective: str, r: list[float], k: int, estimator: str) -> np.ndarray:
    return WEIGHTS[objective](np.array([r], dtype=np.float64), k, estimator=estimator)[0]


def _tol(r: list[float], k: int) -> float:
    # Weights are sums of O(n) terms of size up to k * max|R|; float64 rounding of log-factorial
    # ratios is ~1e-13 relative at these n.
    return 1e-11 * k * max(1.0, max(abs(x) for x in r)) * len(r)


@pytest.mark.parametrize("objective", ["pass@k", "max@k"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@given(data=st.data())
def test_weights_match_oracle(objective, estimator, data):
    r = data.draw(reward_groups(1, 8, binary=objective == "pass@k"))
    k = data.draw(st.integers(1, len(r)))
    assume(_valid(estimator, len(r), k))
    expected = oracles.ORACLES[(objective, estimator)](r, k)
    np.testing.assert_allclose(_spec(objective, r, k, estimator), expected, rtol=1e-11, atol=_tol(r, k))


@given(r=reward_groups(1, 9, binary=True), data=st.data())
def test_passk_training_std_matches_enumeration_and_the_released_formula(r, data):
    """Issue 15 §2: Chen et al.'s estimator == its definition (exact fractions) == their closed form."""
    k = data.draw(st.integers(1, len(r)))
    by_definition = oracles.passk_training_std(r, k)
    np.testing.assert_allclose(oracles.passk_training_std_formula(r, k), by_definition, rtol=1e-12, atol=1e-12)
    got = _spec("pass@k", r, k, "passk_training_std")
    np.testing.assert_allclose(got, by_definition, rtol=1e-11, atol=1e-12)


def test_passk_training_std_worked_values():
    """n=8, c=2, k=3: rho = 1 - C(6,3)/C(8,3) = 9/14; a wrong one's pre-centring value is 1 - C(5,2)/C(7,2) = 11/21."""
    rho = 9 / 14
    denom = math.sqrt(rho * (1 - rho)) + 1e-6
    w = _spec("pass@k", [1, 0, 0, 1, 0, 0, 0, 0], 3, "passk_training_std")
    np.testing.assert_allclose(
        w, [(1 - rho) / denom if x else (11 / 21 - rho) / denom for x in [1, 0, 0, 1, 0, 0, 0, 0]], rtol=1e-13
    )
    # All wrong or all correct: sigma = 0, and every advantage is exactly 0 (not 0/eps noise).
    assert not np.any(_spec("pass@k", [0] * 6, 2, "passk_training_std"))
    assert not np.any(_spec("pass@k", [1] * 6, 2, "passk_training_std"))


@given(r=reward_groups(1, 7), data=st.data())
def test_rspo_max_matches_algorithm_2(r, data):
    k = data.draw(st.integers(1, len(r)))
    np.testing.assert_allclose(_spec("max@k", r, k, "rspo"), oracles.algorithm_2(r, k), rtol=1e-11, atol=_tol(r, k))


@given(r=reward_groups(1, 9), data=st.data())
def test_rspo_max_matches_theorem_c4_and_4_4(r, data):
    """docs/math.md fact 1: the 'approximate' Theorem 4.4 formula equals the tie-aware C.4, ties included."""
    k = data.draw(st.integers(1, len(r)))
    c4 = oracles.theorem_c4(r, k)
    np.testing.assert_allclose(oracles.theorem_4_4(r, k), c4, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_spec("max@k", r, k, "rspo"), c4, rtol=1e-11, atol=_tol(r, k))


@given(r=reward_groups(1, 9), data=st.data())
def test_max_at_k_metric_matches_subsets(r, data):
    k = data.draw(st.integers(1, len(r)))
    got = rk.max_at_k(np.array([r], dtype=np.float64), k)[0]
    assert got == pytest.approx(oracles.subset_max_at_k(r, k), rel=1e-12, abs=1e-12 * max(1, max(map(abs, r))))


@given(r=reward_groups(1, 10, binary=True), data=st.data())
def test_pass_at_k_metric_matches_subsets(r, data):
    k = data.draw(st.integers(1, len(r)))
    got = rk.pass_at_k(np.array([r], dtype=np.float64), k)[0]
    assert got == pytest.approx(oracles.subset_pass_at_k(r, k), rel=1e-12, abs=1e-14)


def test_worked_values_from_math_md():
    w = rk.pass_at_k_weights(np.array([[1, 0, 0, 1, 0, 0, 0, 0]], dtype=np.float64), 4)[0]
    np.testing.assert_allclose(w, [16 / 7, 0, 0, 16 / 7, 0, 0, 0, 0], rtol=1e-14)
    w = rk.max_at_k_weights(np.array([[0.1, 0.5, 0.5, 0.9]]), 2)[0]
    np.testing.assert_allclose(w, [0, 4 / 15, 4 / 15, 16 / 15], rtol=1e-14, atol=1e-16)
    w = rk.max_at_k_weights(np.array([[3.0, 1.0, 2.0, 5.0]]), 4)[0]
    np.testing.assert_allclose(w, [0, 0, 0, 8], rtol=1e-14, atol=1e-15)


def test_plugin_pass_is_not_plugin_max_on_binary():
    """Eq. 7 uses P_< (others all wrong); eq. 11 approximates P_< by P_<=, so they differ."""
    r = np.array([[1.0, 0.0, 0.0, 1.0]])
    assert not np.allclose(
        rk.pass_at_k_weights(r, 2, estimator="plugin"), rk.max_at_k_weights(r, 2, estimator="plugin")
    )


@pytest.mark.parametrize("big_first", [True, False])
@pytest.mark.parametrize("estimator", ["rspo", "plugin", "pkpo", "pkpo_loo", "ordergrad"])
def test_ragged_scans_keep_each_groups_precision(estimator, big_first):
    """Issue 14 §3.1: a 3e15 reward in one group must not round another group's scans away."""
    big, small = [0.0, 3e15, 1.0], [0.1, 0.2, 0.3, 0.0]
    r = big + small if big_first else small + big
    ids = [0] * 3 + [1] * 4 if big_first else [1] * 4 + [0] * 3
    w = rk.max_at_k_weights(np.array(r), 2, group_ids=ids, estimator=estimator)
    got = w[3:] if big_first else w[:4]
    want = oracles.ORACLES[("max@k", estimator)](small, 2)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_ragged_scan_example_from_issue_14():
    w = rk.max_at_k_weights(np.array([0, 3e15, 0.1, 0.2, 0.3, 0]), 2, group_ids=[0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(w[2:], [1 / 15, 1 / 5, 2 / 5, 0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("n, c, k", [(2**20, 1, 1), (2**20, 3, 5), (2**20, 9, 4), (10**6, 10**6 - 3, 2), (7, 2, 6)])
def test_pass_at_k_metric_keeps_relative_precision_at_huge_n(n, c, k):
    """Issue 14 §3.2: the reference metric (what CUDA tensors get) at n = 2^20, vs exact fractions."""
    r = np.zeros((1, n))
    r[0, :c] = 1
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    got = rk.pass_at_k(r, k)[0]
    assert abs(got - float(exact)) <= 4 * np.finfo(np.float64).eps * float(exact)
