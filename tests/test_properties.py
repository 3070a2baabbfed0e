"""The identities of docs/math.md as hypothesis properties of the public API (any backend)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import reward_groups
from hypothesis import assume, given
from hypothesis import strategies as st

import rspo_kernels as rk


def _w(r, k, objective="max@k", estimator="rspo"):
    fn = rk.max_at_k_weights if objective == "max@k" else rk.pass_at_k_weights
    return fn(np.asarray([r], dtype=np.float64), k, estimator=estimator)[0]


def _atol(r, k):
    return 1e-11 * k * len(r) * max(1.0, float(np.max(np.abs(r))))


@given(r=reward_groups(1, 12, binary=True), data=st.data())
def test_binary_max_equals_pass(r, data):
    """docs/math.md fact 5."""
    k = data.draw(st.integers(1, len(r)))
    np.testing.assert_allclose(_w(r, k, "max@k"), _w(r, k, "pass@k"), rtol=1e-12, atol=1e-12)


@given(r=reward_groups(1, 12), shift=st.floats(-100, 100), scale=st.floats(0.01, 100), data=st.data())
def test_shift_invariant_and_scale_equivariant(r, shift, scale, data):
    """docs/math.md fact 4."""
    k = data.draw(st.integers(2, max(2, len(r))))
    assume(k <= len(r))
    base = _w(r, k)
    shifted = _w([x + shift for x in r], k)
    # Shifting by s rounds each reward to the precision of |R| + |s|.
    np.testing.assert_allclose(shifted, base, rtol=1e-9, atol=_atol(r, k) + 1e-12 * k * len(r) * abs(shift))
    np.testing.assert_allclose(_w([x * scale for x in r], k), scale * base, rtol=1e-10, atol=_atol(r, k) * scale)


@given(r=reward_groups(1, 12), data=st.data())
def test_nonnegative_and_lowest_get_zero(r, data):
    """docs/math.md fact 3: non-negative whatever the sign; the lowest k-1 sorted responses get 0."""
    k = data.draw(st.integers(1, len(r)))
    w = _w(r, k)
    if k == 1:
        np.testing.assert_allclose(w, r, rtol=1e-12, atol=1e-12)  # plain policy gradient
        return
    assert (w >= 0).all()
    lowest = np.argsort(r, kind="stable")[: k - 1]
    assert (w[lowest] == 0).all()


@given(r=reward_groups(2, 12), data=st.data())
def test_k_equals_n(r, data):
    """docs/math.md fact 6: only the top response gets ``n (R_max - R_second)``; a tied top gets 0."""
    n = len(r)
    w = _w(r, n)
    order = np.argsort(r, kind="stable")
    top, second = r[order[-1]], r[order[-2]]
    expected = np.zeros(n)
    if top > second:
        expected[order[-1]] = n * (top - second)
    np.testing.assert_allclose(w, expected, rtol=1e-12, atol=_atol(r, n))


@given(n=st.integers(1, 12), data=st.data())
def test_pass_at_k_zero_when_group_nearly_sure(n, data):
    r = data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
    k = data.draw(st.integers(1, n))
    c = int(sum(r))
    if n - c < k - 1:
        assert (_w(r, k, "pass@k") == 0).all()


@pytest.mark.parametrize("objective", ["pass@k", "max@k"])
@pytest.mark.parametrize("estimator", ["rspo", "plugin", "pkpo", "pkpo_loo", "ordergrad"])
@given(data=st.data())
def test_permutation_equivariant(objective, estimator, data):
    """Every order-free estimator commutes with shuffling a group (hitchhiking is order-based)."""
    r = data.draw(reward_groups(2, 10, binary=objective == "pass@k"))
    k = data.draw(st.integers(1, len(r) - 1))
    perm = np.array(data.draw(st.permutations(range(len(r)))))
    w = _w(r, k, objective, estimator)
    w_perm = _w([r[i] for i in perm], k, objective, estimator)
    np.testing.assert_allclose(w_perm, w[perm], rtol=1e-12, atol=_atol(r, k))


@pytest.mark.parametrize("estimator", ["rspo", "plugin", "pkpo", "pkpo_loo", "ordergrad"])
@given(r=reward_groups(2, 10), data=st.data())
def test_tied_rewards_share_a_weight(estimator, r, data):
    k = data.draw(st.integers(1, len(r) - 1))
    w = _w(r, k, "max@k", estimator)
    for value in set(r):
        tied = w[np.asarray(r) == value]
        np.testing.assert_allclose(tied, np.full_like(tied, tied[0]), rtol=1e-12, atol=_atol(r, k))


def test_hitchhiking_uses_the_given_order():
    r = np.array([[0.0, 1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(rk.max_at_k_weights(r, 2, estimator="hitchhiking"), [[2, 2, 0, 0]])
    np.testing.assert_array_equal(rk.max_at_k_weights(r[:, ::-1].copy(), 2, estimator="hitchhiking"), [[0, 0, 2, 2]])


@given(r=reward_groups(1, 12, binary=True), data=st.data())
def test_passk_training_std_is_centred_and_shares_sign_with_grpo(r, data):
    """Chen et al.'s advantages are centred by their group mean: they sum to 0, correct ones >= 0."""
    k = data.draw(st.integers(1, len(r)))
    w = _w(r, k, "pass@k", "passk_training_std")
    assert abs(w.sum()) <= 1e-9 * max(1.0, np.abs(w).max()) * len(r)
    r = np.asarray(r)
    assert np.all(w[r == 1] >= 0) and np.all(w[r == 0] <= 0)
