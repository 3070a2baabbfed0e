"""MaxRL weights (rspo_kernels.maxrl_weights): oracles, exact unbiasedness, layouts and errors.

Three independent checks of the specification: the authors' released estimators transcribed
in exact fractions (tests/maxrl_oracles.py) at every c = 0..n; subset enumeration of the sum of
RSPO Pass@k weights; and exact expectations over every sample set of small softmax policies
against autograd through ``J_T = sum_{k<=T} (1/k) pass@k``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from maxrl_oracles import released_maclaurin_loo, released_weights, subset_maxrl_rspo
from oracles import expected_gradient

import rspo_kernels as rk

UNBIASED = ("rspo", "rloo", "maclaurin", "cross_fitted")


def _group(n: int, c: int) -> np.ndarray:
    return np.array([1.0] * c + [0.0] * (n - c))


# ----------------------------------------------------------------------- oracles
@pytest.mark.parametrize("name", ["maclaurin", "cross_fitted", "vr_cond"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 16])
def test_equals_n_times_the_released_advantages(name, n):
    orders = [n] if name == "vr_cond" else range(1, n + 1)
    for t in orders:
        rewards = np.stack([_group(n, c) for c in range(n + 1)])  # every c = 0..n, one row each
        got = rk.maxrl_weights(rewards, None if name == "vr_cond" else t, estimator=name)
        want = np.array([released_weights(name, list(row.astype(int)), t) for row in rewards])
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-6, atol=1e-6, err_msg=f"T={t}")
        got64 = rk.maxrl_weights(rewards.astype(np.float64), None if name == "vr_cond" else t, estimator=name)
        np.testing.assert_allclose(got64, want, rtol=1e-12, atol=1e-12, err_msg=f"T={t}")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_rspo_is_the_sum_of_subset_enumerated_pass_at_k_weights(n):
    for t in range(1, n + 1):
        for c in range(n + 1):
            r = _group(n, c)
            np.random.default_rng(n * 31 + c).shuffle(r)
            want = [float(x) for x in subset_maxrl_rspo(list(r.astype(int)), t)]
            np.testing.assert_allclose(rk.maxrl_weights(r[None], t)[0], want, rtol=1e-12, atol=1e-12)


def test_rspo_is_the_harmonic_sum_of_pass_at_k_weights():
    rng = np.random.default_rng(0)
    rewards = (rng.random((64, 12)) < rng.random((64, 1))).astype(np.float64)
    for t in range(1, 13):
        want = sum(rk.pass_at_k_weights(rewards, k) / k for k in range(1, t + 1))
        np.testing.assert_allclose(rk.maxrl_weights(rewards, t), want, rtol=1e-12, atol=1e-12)


def test_rspo_closed_form_is_n_pass_at_t_over_c_and_n_over_c_at_full_order():
    rewards = np.array([[1, 0, 0, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], dtype=np.float64)
    for t in range(1, 9):
        c = rewards.sum(1, keepdims=True)
        want = rewards * 8 * rk.pass_at_k(rewards, t)[:, None] / c
        np.testing.assert_allclose(rk.maxrl_weights(rewards, t), want, rtol=1e-12)
    np.testing.assert_allclose(rk.maxrl_weights(rewards), rewards * 8 / rewards.sum(1, keepdims=True), rtol=1e-12)


def test_large_groups_keep_precision():
    """The closed form against the term-by-term sum in exact fractions (n = 300, few successes)."""
    n = 300
    for c, t in [(1, 300), (1, 7), (3, 150), (299, 2), (150, 300)]:
        f = n - c
        want = float(sum(Fraction(math.comb(f, j), math.comb(n - 1, j)) for j in range(t)))
        got = rk.maxrl_weights(_group(n, c)[None], t)[0, 0]
        assert got == pytest.approx(want, rel=1e-12), (c, t)


# ----------------------------------------------------------------------- exact unbiasedness
def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _grad_log_series(logits: np.ndarray, correct: np.ndarray, t: int | None) -> np.ndarray:
    """Autograd of ``J_T = sum_{k<=T} (1/k) (1 - (1-p)^k)`` (``log p`` when ``t`` is None)."""
    theta = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(theta, 0)[torch.from_numpy(correct == 1)].sum()
    objective = torch.log(p) if t is None else sum((1 - (1 - p) ** k) / k for k in range(1, t + 1))
    objective.backward()
    return theta.grad.numpy()


# (rewards of each response, logits): a Bernoulli policy (one wrong, one right) and categorical ones.
POLICIES = [
    (np.array([0.0, 1.0]), np.array([0.9, -0.8])),
    (np.array([0.0, 1.0]), np.array([-0.3, 0.2])),
    (np.array([0.0, 0.0, 1.0]), np.array([0.4, -0.1, -0.6])),
]


def _cases():
    for p_idx, (rewards, _) in enumerate(POLICIES):
        for n in (1, 2, 3, 4, 5, 8):
            if len(rewards) ** n > 3000:
                continue
            yield pytest.param(p_idx, n, id=f"policy{p_idx}-n{n}")


@pytest.mark.parametrize("p_idx,n", list(_cases()))
def test_unbiased_for_grad_j_t_by_exact_enumeration(p_idx, n):
    rewards, logits = POLICIES[p_idx]
    for t in range(1, n + 1):
        target = _grad_log_series(logits, rewards, t)
        for estimator in UNBIASED:
            got = expected_gradient(
                _softmax(logits), rewards, n, lambda r, t=t, e=estimator: rk.maxrl_weights(r, t, estimator=e)
            )
            np.testing.assert_allclose(got, target, rtol=0, atol=1e-12, err_msg=f"{estimator} T={t}")


@pytest.mark.parametrize("p_idx", [0, 2])
def test_vr_cond_is_unbiased_for_j_n_and_biased_for_log_p(p_idx):
    rewards, logits = POLICIES[p_idx]
    for n in (2, 4):
        got = expected_gradient(_softmax(logits), rewards, n, lambda r: rk.maxrl_weights(r, estimator="vr_cond"))
        np.testing.assert_allclose(got, _grad_log_series(logits, rewards, n), rtol=0, atol=1e-12)
        log_p = _grad_log_series(logits, rewards, None)
        assert np.abs(got - log_p).max() > 1e-3 * np.abs(log_p).max()


def test_the_released_loo_estimator_is_biased_and_ours_is_not():
    """The released ``maclaurin_weights_loo``'s expectation is a fraction (0.62-0.93) of grad J_T."""
    rewards, logits = POLICIES[0]
    fractions = []
    for n in (4, 8):
        for t in range(2, n + 1):

            def released(r, n=n, t=t):
                out = np.empty_like(r)
                for row, x in enumerate(r):
                    succ, fail = released_maclaurin_loo(int(x.sum()), n, t)
                    out[row] = np.where(x == 1, float(n * succ), float(n * fail))
                return out

            target = _grad_log_series(logits, rewards, t)
            got = expected_gradient(_softmax(logits), rewards, n, released)
            alpha = float(got @ target / (target @ target))
            np.testing.assert_allclose(got, alpha * target, rtol=0, atol=1e-12)  # parallel, scaled
            fractions.append(alpha)
            ours = expected_gradient(
                _softmax(logits), rewards, n, lambda r, t=t: rk.maxrl_weights(r, t, estimator="rloo")
            )
            np.testing.assert_allclose(ours, target, rtol=0, atol=1e-12)
    assert 0.6 < min(fractions) and max(fractions) < 0.95, fractions


def _variance(probs, rewards, n, fn):
    """Exact ``tr Cov`` of ``(1/n) sum_i w_i grad log pi(y_i)`` over every ordered sample set."""
    from oracles import all_samples

    samples = all_samples(len(probs), n)
    p_sample = np.prod(probs[samples], axis=1)
    w = np.asarray(fn(rewards[samples].astype(np.float64)))
    g = (w[:, :, None] * (np.eye(len(probs))[samples] - probs)).mean(axis=1)
    mean = p_sample @ g
    return float(p_sample @ ((g - mean) ** 2).sum(1))


def test_rloo_has_lower_variance_than_maclaurin_on_a_categorical_policy():
    """The benchmark's Pass@k policy (one correct answer of four, p = 0.1), exactly, T >= 2."""
    probs, rewards = np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.0, 0.0, 0.0, 1.0])
    for n in (4, 6):
        for t in range(2, n + 1):
            var = {
                e: _variance(probs, rewards, n, lambda r, e=e, t=t: rk.maxrl_weights(r, t, estimator=e))
                for e in UNBIASED
            }
            assert var["rloo"] < var["maclaurin"], (n, t, var)


# ----------------------------------------------------------------------- layouts, dtypes, errors
def test_every_layout_gives_the_same_weights():
    rng = np.random.default_rng(1)
    sizes = [5, 3, 8, 5, 6]
    rewards = [(rng.random(s) < 0.4).astype(np.float32) for s in sizes]
    for estimator in rk.MAXRL_ESTIMATORS:
        order = None if estimator == "vr_cond" else 3
        per_group = [rk.maxrl_weights(r[None], order, estimator=estimator)[0] for r in rewards]
        # ragged groups, interleaved labels (strings, as verl's uids)
        labels = np.concatenate([[f"uid{g}"] * s for g, s in enumerate(sizes)])
        flat = np.concatenate(rewards)
        perm = rng.permutation(flat.size)
        got = rk.maxrl_weights(flat[perm], order, group_ids=list(labels[perm]), estimator=estimator)
        np.testing.assert_allclose(got, np.concatenate(per_group)[perm], rtol=1e-6, err_msg=estimator)
        # group_size and 2-D, torch in, torch out
        equal = np.stack([(rng.random(5) < 0.5) for _ in range(4)]).astype(np.float32)
        dense = rk.maxrl_weights(torch.from_numpy(equal), order, estimator=estimator)
        assert isinstance(dense, torch.Tensor) and dense.dtype == torch.float32 and dense.shape == (4, 5)
        flat_w = rk.maxrl_weights(torch.from_numpy(equal.reshape(-1)), order, group_size=5, estimator=estimator)
        torch.testing.assert_close(flat_w.view(4, 5), dense)


def test_float64_and_bool_inputs():
    r = np.array([[True, False, True, False]])
    assert rk.maxrl_weights(r).dtype == np.float32
    assert rk.maxrl_weights(r.astype(np.float64)).dtype == np.float64
    np.testing.assert_array_equal(rk.maxrl_weights(r), [[2, 0, 2, 0]])


def test_graded_rewards_name_max_at_k_weights():
    with pytest.raises(ValueError, match=r"group 0 .*0\.5.*max_at_k_weights"):
        rk.maxrl_weights(np.array([[1.0, 0.5, 0.0]]))


def test_order_larger_than_a_group_is_refused():
    with pytest.raises(ValueError, match=r"group 1 \(group_id 'b'\) has 2 samples but order=3.*no unbiased estimator"):
        rk.maxrl_weights(np.array([1.0, 0.0, 1.0, 0.0, 1.0]), 3, group_ids=["a", "a", "a", "b", "b"])
    with pytest.raises(ValueError, match="order must be >= 1"):
        rk.maxrl_weights(np.array([[1.0, 0.0]]), 0)
    with pytest.raises(TypeError, match="order must be an int"):
        rk.maxrl_weights(np.array([[1.0, 0.0]]), 2.0)
    with pytest.raises(TypeError, match="order must be an int"):
        rk.maxrl_weights(np.array([[1.0, 0.0]]), True)


def test_estimator_errors():
    with pytest.raises(ValueError, match="unknown MaxRL estimator 'pkpo' .*pass_at_k_weights"):
        rk.maxrl_weights(np.array([[1.0, 0.0]]), estimator="pkpo")
    with pytest.raises(ValueError, match="'vr_cond' estimator has no truncation order.*order=None"):
        rk.maxrl_weights(np.array([[1.0, 0.0, 0.0]]), 2, estimator="vr_cond")
    np.testing.assert_array_equal(rk.maxrl_weights(np.array([[1.0, 0.0, 0.0]]), 3, estimator="vr_cond"), [[2, -1, -1]])


def test_empty_and_exported():
    assert rk.maxrl_weights(np.zeros((0, 4))).shape == (0, 4)
    assert "maxrl_weights" in rk.__all__ and "MAXRL_ESTIMATORS" in rk.__all__
    assert rk.MAXRL_ESTIMATORS[0] == "rspo"
