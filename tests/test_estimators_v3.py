"""Issue 29: OrderGrad / MaxPO's centred unbiased advantage (``estimator="ordergrad"``) and RS-GRPO's
risk-sensitive advantage (:func:`rspo_kernels.risk_sensitive_weights`).

Every expected value comes from an independent route: subset enumeration in exact fractions
(tests/oracles.py), the authors' printed closed form for 0/1 rewards in exact fractions, RSPO minus
a leave-two-out baseline, exact expectations over Bernoulli and categorical policies with rational
probabilities, and RS-GRPO's printed definition evaluated in 50-digit arithmetic (mpmath).
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import oracles
import pytest
import torch
from conftest import EXTENSION_BUILT, reward_groups
from hypothesis import given
from hypothesis import strategies as st

import rspo_kernels as rk
from rspo_kernels._dispatch import BACKEND_ENV

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
from benchmarks import risk_sensitive_bias, variance  # noqa: E402

BACKENDS = ["reference"] + (["cpp"] if EXTENSION_BUILT else [])
try:  # the Triton backend runs under TRITON_INTERPRET=1 on CPU tensors (set by conftest)
    import triton  # noqa: F401

    BACKENDS.append("triton")
except ImportError:  # pragma: no cover
    pass
WEIGHTS = {"pass@k": rk.pass_at_k_weights, "max@k": rk.max_at_k_weights}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, request.param)
    return request.param


def _f64(r) -> np.ndarray:
    return np.array([[float(x) for x in r]], dtype=np.float64)


def _close(got, exact, scale: float = 1.0) -> None:
    """float64 weights against exact fractions: a few ulps of the group's scale."""
    want = np.array([float(x) for x in exact])
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13 * scale)


# ----------------------------------------------------------------------------- OrderGrad: vectors
def test_authors_binary_formula_equals_the_definition_in_exact_fractions():
    """``k C(n-c,k)/C(n-1,k)`` and ``-k c/(n-k) C(n-1-c,k-1)/C(n-1,k-1)`` == ``k (q_i - M_i)`` by subsets."""
    for n in range(2, 9):
        for c in range(n + 1):
            r = [1] * c + [0] * (n - c)
            for k in range(1, n):
                assert oracles.ordergrad_binary_formula(r, k) == oracles.subset_ordergrad(r, k), (n, c, k)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 16, 40])
def test_binary_groups_match_the_authors_formula(backend, n):
    """Every c = 0..n and every k <= n-1, Pass@k and Max@k of 0/1 rewards, in exact fractions."""
    if backend == "triton" and n > 16:
        pytest.skip("the interpreter runs every program in turn: small shapes only (C++ and the spec cover n = 40)")
    rows = []
    for c in range(n + 1):
        r = [1, 0] * min(c, n - c) + [1] * max(0, 2 * c - n) + [0] * max(0, n - 2 * c)  # mixed order
        assert sum(r) == c and len(r) == n
        rows.append(r)
    batch = np.array(rows, dtype=np.float64)  # one group per count c, one call per k
    for k in range(1, n):
        for objective in ("pass@k", "max@k"):
            got = WEIGHTS[objective](batch, k, estimator="ordergrad")
            for r, w in zip(rows, got, strict=True):
                _close(w, oracles.ordergrad_binary_formula(r, k), scale=k)


def test_binary_worked_values():
    """n = 8, c = 2, k = 3: correct 3 C(6,3)/C(7,3) = 12/7; wrong -3 * 2/5 * C(5,2)/C(7,2) = -4/7."""
    r = [1, 0, 0, 1, 0, 0, 0, 0]
    want = [12 / 7 if x else -4 / 7 for x in r]
    for objective in ("pass@k", "max@k"):
        np.testing.assert_allclose(WEIGHTS[objective](_f64(r), 3, estimator="ordergrad")[0], want, rtol=1e-14)


@given(r=reward_groups(2, 8), data=st.data())
def test_graded_rewards_match_subset_enumeration(r, data):
    """Graded rewards with ties (hypothesis palette) against ``k (q_i - M_i)`` in exact fractions."""
    k = data.draw(st.integers(1, len(r) - 1))
    exact = oracles.subset_ordergrad([Fraction(x) for x in r], k)
    scale = k * max(1.0, max(abs(x) for x in r)) * len(r)
    for backend in BACKENDS:
        os.environ[BACKEND_ENV] = backend
        try:
            got = rk.max_at_k_weights(_f64(r), k, estimator="ordergrad")[0]
        finally:
            del os.environ[BACKEND_ENV]
        _close(got, exact, scale)


@pytest.mark.parametrize("seed", range(6))
def test_leave_two_out_form_and_subset_form_agree_exactly(seed):
    """Issue 29: ``k (q_i - M_i)`` == RSPO's weight minus the mean of the others' RSPO weights without i."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 8))
    r = [Fraction(int(x), 4) for x in rng.integers(-4, 5, n)]
    for k in range(1, n):
        assert oracles.subset_ordergrad(r, k) == oracles.ordergrad_leave_two_out(r, k)


def test_graded_worked_values():
    """``[0.1, 0.5, 0.5, 0.9]``, k = 2, by hand: q = (0.5+0.5+0.9)/3, M = (0.5+0.9+0.9)/3 for the first."""
    got = rk.max_at_k_weights(np.array([[0.1, 0.5, 0.5, 0.9]]), 2, estimator="ordergrad")[0]
    exact = oracles.subset_ordergrad([Fraction(1, 10), Fraction(1, 2), Fraction(1, 2), Fraction(9, 10)], 2)
    assert exact == [Fraction(-4, 15), Fraction(-4, 15), Fraction(-4, 15), Fraction(4, 5)]
    _close(got, exact)


def test_k_1_is_rloo(backend):
    rng = np.random.default_rng(3)
    r = rng.normal(size=(5, 7))
    rloo = r - (r.sum(1, keepdims=True) - r) / (r.shape[1] - 1)
    np.testing.assert_allclose(rk.max_at_k_weights(r, 1, estimator="ordergrad"), rloo, rtol=1e-13, atol=1e-14)
    b = (r > 0).astype(np.float64)
    rloo_b = b - (b.sum(1, keepdims=True) - b) / (b.shape[1] - 1)
    np.testing.assert_allclose(rk.pass_at_k_weights(b, 1, estimator="ordergrad"), rloo_b, rtol=1e-13, atol=1e-15)


def test_ties_share_one_weight_and_shift_invariance(backend):
    r = np.array([[2.0, -1.0, 2.0, 0.5, -1.0, 2.0, 7.0, 0.5]])
    for k in range(1, 8):
        w = rk.max_at_k_weights(r, k, estimator="ordergrad")[0]
        for value in np.unique(r):
            tied = w[r[0] == value]
            np.testing.assert_allclose(tied, tied[0], rtol=1e-15, atol=1e-15)
        if backend == "cpp":  # tie runs are handled as blocks there: bitwise equal
            assert all(len(set(w[r[0] == v].tolist())) == 1 for v in np.unique(r))
        shifted = rk.max_at_k_weights(r + 1e6, k, estimator="ordergrad")[0]  # shift-invariant, no cancellation
        np.testing.assert_allclose(shifted, w, rtol=1e-9, atol=1e-9)


@given(r=reward_groups(2, 10), data=st.data())
def test_groups_are_exactly_centred(r, data):
    """Exact fractions: every group sums to 0 (the definition); float64 weights sum to 0 to rounding."""
    k = data.draw(st.integers(1, len(r) - 1))
    exact = oracles.subset_ordergrad([Fraction(x) for x in r], k)
    assert sum(exact, Fraction(0)) == 0
    w = rk.max_at_k_weights(_f64(r), k, estimator="ordergrad")[0]
    assert abs(w.sum()) <= 1e-12 * k * len(r) * max(1.0, max(abs(x) for x in r))


def test_binary_groups_are_exactly_centred_in_fractions():
    for n in range(2, 12):
        for c in range(n + 1):
            for k in range(1, n):
                assert sum(oracles.ordergrad_binary_formula([1] * c + [0] * (n - c), k), Fraction(0)) == 0


# ----------------------------------------------------------------------------- OrderGrad: unbiasedness
@pytest.mark.parametrize("p", [Fraction(1, 10), Fraction(1, 3), Fraction(5, 7)])
@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_exactly_unbiased_on_bernoulli_policies(p, n):
    """Exact fractions: ``E[(1/n) sum_i A_i grad log pi(y_i)] == grad Pass@k`` for every k <= n-1.

    Binary rewards, exchangeable weights: the expectation is ``(a_1 - a_0) grad p`` with ``a_r`` a
    response's expected weight given its reward, averaged over the ``Binomial(n-1, p)`` correct
    ones among the others (benchmarks/passk_alpha.py's derivation); ``grad Pass@k = k (1-p)^(k-1) grad p``.
    """
    for k in range(1, n):
        pmf = [math.comb(n - 1, j) * p**j * (1 - p) ** (n - 1 - j) for j in range(n)]
        a1 = sum(pmf[j] * oracles.ordergrad_binary_formula([1] * (j + 1) + [0] * (n - 1 - j), k)[0] for j in range(n))
        a0 = sum(pmf[j] * oracles.ordergrad_binary_formula([1] * j + [0] * (n - j), k)[-1] for j in range(n))
        assert a1 - a0 == k * (1 - p) ** (k - 1), (n, k)
        # ... and the library's float64 weights give the same expectation
        groups = np.array([[1.0] * c + [0.0] * (n - c) for c in range(n + 1)])
        w = rk.pass_at_k_weights(groups, k, estimator="ordergrad")
        fl = [float(x) for x in pmf]
        got = sum(fl[j] * w[j + 1, 0] for j in range(n)) - sum(fl[j] * w[j, n - 1] for j in range(n))
        assert got == pytest.approx(float(k * (1 - p) ** (k - 1)), rel=1e-12, abs=1e-13)


def _exact_max_at_k_gradient(probs: list[Fraction], rewards: list[Fraction], k: int) -> list[Fraction]:
    """``d Max@k / d logits`` of a softmax policy in exact fractions.

    ``Max@k = sum_v v (F(v)^k - F(v-)^k)`` over the distinct rewards v; the chain rule through
    ``d pi_a / d theta_b = pi_a (delta_ab - pi_b)``.
    """
    m = len(probs)
    d_pi = []
    for a in range(m):
        total = Fraction(0)
        for v in set(rewards):
            at_or_below = sum((probs[b] for b in range(m) if rewards[b] <= v), Fraction(0))
            below = sum((probs[b] for b in range(m) if rewards[b] < v), Fraction(0))
            total += (
                v
                * k
                * ((at_or_below ** (k - 1) if rewards[a] <= v else 0) - (below ** (k - 1) if rewards[a] < v else 0))
            )
        d_pi.append(total)
    return [sum(d_pi[a] * probs[a] * ((a == b) - probs[b]) for a in range(m)) for b in range(m)]


@pytest.mark.parametrize(
    "probs,rewards",
    [
        ((Fraction(1, 2), Fraction(1, 3), Fraction(1, 6)), (Fraction(0), Fraction(1, 2), Fraction(1))),
        ((Fraction(2, 5), Fraction(1, 5), Fraction(1, 5), Fraction(1, 5)), (Fraction(1), Fraction(3), Fraction(3), 0)),
    ],
)
def test_exactly_unbiased_on_graded_categorical_policies(probs, rewards):
    """Exact fractions, every ordered sample set: the definition's expectation == grad Max@k (ties included)."""
    probs, rewards = list(probs), [Fraction(x) for x in rewards]
    m = len(probs)
    for n in (2, 3, 4):
        for k in range(1, n):
            mean = [Fraction(0)] * m
            for ys in itertools.product(range(m), repeat=n):
                weight = math.prod(probs[y] for y in ys)
                a = oracles.subset_ordergrad([rewards[y] for y in ys], k)
                for b in range(m):
                    mean[b] += weight * sum(a[i] * ((ys[i] == b) - probs[b]) for i in range(n)) / n
            assert mean == _exact_max_at_k_gradient(probs, rewards, k), (n, k)


# ----------------------------------------------------------------------------- OrderGrad: API
def test_k_equal_to_n_is_refused_naming_the_group_size_and_k():
    for objective in ("pass@k", "max@k"):
        with pytest.raises(
            ValueError, match=r"group 0 has 4 samples but k=4; the 'ordergrad' estimator needs k <= n-1"
        ):
            WEIGHTS[objective](np.array([[1.0, 0.0, 0.0, 1.0]]), 4, estimator="ordergrad")
        with pytest.raises(ValueError, match=r"group 1 \(group_id 'b'\) has 2 samples but k=2; .* needs k <= n-1"):
            WEIGHTS[objective](np.array([1.0, 0.0, 0.0, 1.0, 1.0]), 2, group_ids=list("aaabb"), estimator="ordergrad")
        with pytest.raises(ValueError, match=r"has 3 samples but k=4; .* needs n >= k"):
            WEIGHTS[objective](np.array([[1.0, 0.0, 0.0]]), 4, estimator="ordergrad")


def test_c_plus_plus_kernel_refuses_k_equal_to_n_itself():
    if not EXTENSION_BUILT:
        pytest.skip("the C++ extension is not built")
    from rspo_kernels import _cpu

    v = np.array([1.0, 0.0, 1.0])
    for objective in ("pass@k", "max@k"):
        with pytest.raises(ValueError, match=r"k=3 \(needs k < n\)"):
            _cpu.weights(v, np.array([0, 3]), 3, objective, "ordergrad", np.empty(3), False)


def test_is_listed_in_estimators():
    assert "ordergrad" in rk.ESTIMATORS


@pytest.mark.parametrize("objective", ["pass@k", "max@k"])
def test_layouts_containers_and_dtypes_agree(backend, objective):
    rng = np.random.default_rng(11)
    sizes = [5, 3, 8, 4]
    rows = [rng.integers(0, 2, s).astype(np.float64) if objective == "pass@k" else rng.normal(size=s) for s in sizes]
    k = 2
    per_group = [WEIGHTS[objective](row[None, :], k, estimator="ordergrad")[0] for row in rows]
    flat = np.concatenate(rows)
    ids = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(flat.size)
    got = WEIGHTS[objective](flat[perm], k, group_ids=[f"g{i}" for i in ids[perm]], estimator="ordergrad")
    np.testing.assert_allclose(got, np.concatenate(per_group)[perm], rtol=1e-13, atol=1e-14)
    dense = np.stack([rows[0], rows[0][::-1]])
    by_rows = WEIGHTS[objective](dense, k, estimator="ordergrad")
    by_size = WEIGHTS[objective](dense.reshape(-1), k, group_size=5, estimator="ordergrad")
    np.testing.assert_allclose(by_size, by_rows.reshape(-1), rtol=1e-13, atol=1e-14)
    t = WEIGHTS[objective](torch.from_numpy(dense).float(), k, estimator="ordergrad")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    torch.testing.assert_close(t, torch.from_numpy(by_rows).float(), rtol=1e-5, atol=1e-6)
    assert WEIGHTS[objective](dense.astype(np.float32), k, estimator="ordergrad").dtype == np.float32


def test_pass_at_k_equals_max_at_k_on_binary_rewards(backend):
    rng = np.random.default_rng(5)
    r = rng.integers(0, 2, size=(40, 9)).astype(np.float64)
    for k in (1, 2, 5, 8):
        np.testing.assert_allclose(
            rk.pass_at_k_weights(r, k, estimator="ordergrad"),
            rk.max_at_k_weights(r, k, estimator="ordergrad"),
            rtol=1e-13,
            atol=1e-14,
        )


@pytest.mark.skipif(not EXTENSION_BUILT, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpp_matches_the_specification_on_random_ragged_groups(monkeypatch, dtype):
    rng = np.random.default_rng(2)
    sizes = rng.integers(2, 70, size=60)
    ids = rng.permutation(np.repeat(np.arange(sizes.size), sizes))
    graded = np.round(rng.normal(size=ids.size), 1).astype(dtype)  # rounding makes ties
    binary = rng.integers(0, 2, ids.size).astype(dtype)
    for k in (1, 2, 3):
        for objective, r in (("max@k", graded), ("pass@k", binary)):
            out = {}
            for backend in ("reference", "cpp"):
                monkeypatch.setenv(BACKEND_ENV, backend)
                out[backend] = WEIGHTS[objective](r, k, group_ids=ids, estimator="ordergrad")
            tol = 1e-12 if dtype == np.float64 else 2e-6
            np.testing.assert_allclose(out["cpp"], out["reference"], rtol=tol, atol=tol * k)
    # large groups: the C++ radix sort path and the OpenMP loop
    r = np.round(rng.normal(size=(40, 600)), 2)
    out = {}
    for backend in ("reference", "cpp"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        out[backend] = rk.max_at_k_weights(r, 37, estimator="ordergrad")
    np.testing.assert_allclose(out["cpp"], out["reference"], rtol=1e-11, atol=1e-11)


def test_triton_kernels_serve_ordergrad_at_small_shapes(monkeypatch):
    pytest.importorskip("triton")
    from rspo_kernels.ops import weights as triton_weights
    from rspo_kernels.weights import estimators
    from rspo_kernels.weights._layout import to_groups

    rng = np.random.default_rng(4)
    values = torch.from_numpy(np.round(rng.normal(size=30), 1))
    ids = torch.from_numpy(rng.integers(0, 4, 30))
    groups = to_groups(values, shape=values.shape, container="torch", group_size=None, group_ids=ids)[0]
    for objective in ("pass@k", "max@k"):
        g = groups.with_values((groups.values > 0).double()) if objective == "pass@k" else groups
        want = estimators.grouped_weights(g, 2, objective, "ordergrad")
        torch.testing.assert_close(triton_weights.grouped_weights(g, 2, objective, "ordergrad"), want)


# ----------------------------------------------------------------------------- adapters
def test_adapters_take_rspo_estimator_ordergrad():
    sys.path.insert(0, str(_ROOT))
    from integrations._common import RSPOSettings

    keys = {"objective": "rspo_objective", "k": "rspo_k", "estimator": "rspo_estimator", "n": "num_generations"}
    for objective in ("pass@k", "max@k"):
        settings = RSPOSettings.create(objective, "2", "ordergrad", keys)
        assert settings.estimator == "ordergrad"
        settings.check_group_size(4)
        w = settings.weights(torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64))
        want = [float(x) for x in oracles.ordergrad_binary_formula([1, 0, 0, 1], 2)]
        torch.testing.assert_close(w[0], torch.tensor(want, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"needs k <= n-1.*\[RSPO settings: .*rspo_estimator=ordergrad"):
            RSPOSettings.create(objective, 4, "ordergrad", keys).check_group_size(4)


def test_trl_config_accepts_ordergrad():
    pytest.importorskip("trl")
    from integrations.trl import RSPOConfig

    args = RSPOConfig(
        output_dir="unused", num_generations=4, per_device_train_batch_size=4, report_to="none", use_cpu=True,
        bf16=False, rspo_k=2, rspo_estimator="ordergrad",
    )  # fmt: skip
    assert args.rspo_settings().estimator == "ordergrad"


# ----------------------------------------------------------------------------- RS-GRPO
BETAS = [0.0, 1e-300, 1e-12, 1e-9, 1e-6, 0.1, 1.0, 2.0, 7.5, 50.0, 700.0, -0.5, -3.0, -80.0]


@pytest.mark.parametrize("beta", BETAS)
def test_risk_sensitive_matches_the_printed_definition(beta):
    rng = np.random.default_rng(int(abs(beta) * 1000) % 97)
    for n in (1, 2, 5, 16):
        for palette in ([0.0, 1.0], [-2.0, 0.3, 0.3, 1.7, 4.0]):
            r = rng.choice(palette, size=n).astype(np.float64)
            want = oracles.risk_sensitive(r.tolist(), beta)
            got = rk.risk_sensitive_weights(r[None, :], beta)[0]
            scale = max(1.0, float(np.ptp(r)), 1.0 / abs(beta) if beta else 0.0)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13 * scale, err_msg=f"beta={beta} r={r}")


def test_risk_sensitive_worked_values_and_centring():
    """``[0,0,0,1]``, beta = log 3: ``exp(beta R) = [1,1,1,3]``, mean 3/2, so A = (2/3 - 1)/beta and (2 - 1)/beta."""
    beta = math.log(3.0)
    w = rk.risk_sensitive_weights(np.array([[0.0, 0.0, 0.0, 1.0]]), beta)[0]
    np.testing.assert_allclose(w, [-1 / 3 / beta] * 3 + [1 / beta], rtol=1e-14)
    rng = np.random.default_rng(0)
    r = rng.normal(size=(50, 9)) * 3
    for beta in (0.0, 1e-10, 0.3, 4.0, -2.0):
        w = rk.risk_sensitive_weights(r, beta)
        assert np.abs(w.sum(1)).max() <= 1e-12 * max(1.0, 1 / abs(beta) if beta else 1.0) * 9


def test_risk_sensitive_beta_zero_is_the_limit_and_continuous():
    r = np.array([[0.2, 1.0, -0.4, 0.2, 3.0]])
    np.testing.assert_allclose(rk.risk_sensitive_weights(r, 0), r - r.mean(), rtol=0, atol=1e-15)
    for beta in (1e-9, -1e-9, 1e-7):  # both sides of the switch to the expansion
        np.testing.assert_allclose(
            rk.risk_sensitive_weights(r, beta)[0], oracles.risk_sensitive(r[0].tolist(), beta), rtol=1e-13
        )


def test_risk_sensitive_is_stable_for_large_beta_and_offsets():
    r = np.array([[1e6, 1e6 + 1.0, 1e6 + 0.5]])
    for beta in (1e-3, 1.0, 100.0, 1e4):
        got = rk.risk_sensitive_weights(r, beta)[0]
        want = oracles.risk_sensitive((r[0] - 1e6).tolist(), beta)  # shift-invariant by definition
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_risk_sensitive_layouts_containers_and_validation():
    rng = np.random.default_rng(9)
    sizes = [3, 6, 1, 4]
    rows = [rng.normal(size=s) for s in sizes]
    flat = np.concatenate(rows)
    ids = np.repeat(np.arange(4), sizes)
    perm = rng.permutation(flat.size)
    want = np.concatenate([rk.risk_sensitive_weights(row[None], 2.0)[0] for row in rows])
    np.testing.assert_allclose(rk.risk_sensitive_weights(flat[perm], 2.0, group_ids=ids[perm]), want[perm], rtol=1e-13)
    dense = np.stack([rows[1], rows[1][::-1]])
    np.testing.assert_allclose(
        rk.risk_sensitive_weights(dense.reshape(-1), 2.0, group_size=6),
        rk.risk_sensitive_weights(dense, 2.0).reshape(-1),
        rtol=1e-13,
    )
    t = rk.risk_sensitive_weights(torch.tensor([[0, 1, 1, 0]]), 1.5)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert rk.risk_sensitive_weights(np.zeros((0, 3)), 1.0).shape == (0, 3)
    with pytest.raises(ValueError, match=r"beta must be finite, got beta=inf"):
        rk.risk_sensitive_weights(dense, float("inf"))
    with pytest.raises(ValueError, match=r"beta must be finite, got beta=nan"):
        rk.risk_sensitive_weights(dense, float("nan"))
    with pytest.raises(TypeError, match=r"beta must be a real number"):
        rk.risk_sensitive_weights(dense, "2")
    with pytest.raises(TypeError, match=r"beta must be a real number"):
        rk.risk_sensitive_weights(dense, True)
    with pytest.raises(ValueError, match=r"group 0 has a non-finite reward \(nan\) at position 1"):
        rk.risk_sensitive_weights(np.array([[0.0, np.nan]]), 1.0)
    with pytest.raises(ValueError, match=r"1-D rewards need exactly one of group_size"):
        rk.risk_sensitive_weights(flat, 1.0)


# ----------------------------------------------------------------------------- RS-GRPO: bias table
@pytest.mark.parametrize("n,beta,p", [(2, 1.0, Fraction(1, 3)), (4, 2.0, Fraction(1, 10)), (3, -1.0, Fraction(1, 2))])
def test_bias_factor_matches_brute_force_enumeration(n, beta, p):
    """``alpha`` (benchmarks/risk_sensitive_bias.py) against every ordered sample set of a 3-action policy.

    Actions 0 and 1 are wrong, 2 is correct; the policy gradient of ``J_beta`` is
    ``(e^beta - 1) / (beta (1 - p + p e^beta)) grad p``.
    """
    probs = np.array([float((1 - p) / 3), float(2 * (1 - p) / 3), float(p)])
    rewards = np.array([0.0, 0.0, 1.0])
    got = oracles.expected_gradient(probs, rewards, n, lambda r: rk.risk_sensitive_weights(r, beta))
    grad_p = probs * (rewards - float(p))
    slope = math.expm1(beta) / (beta * (1 - float(p) + float(p) * math.exp(beta)))
    alpha = risk_sensitive_bias.alpha(n, beta, float(p))
    np.testing.assert_allclose(got, alpha * slope * grad_p, rtol=0, atol=1e-13)
    assert abs(alpha - 1) > 1e-3  # biased


def test_bias_shrinks_as_n_grows_and_is_n_minus_1_over_n_at_beta_zero():
    """At beta = 0 the advantage is ``R_i - mean R``, whose mean includes ``R_i``: ``alpha = (n-1)/n``."""
    for n in (2, 4, 9):
        for p in (0.1, 0.6):
            assert risk_sensitive_bias.alpha(n, 0.0, p) == pytest.approx((n - 1) / n, rel=1e-13)
    assert abs(risk_sensitive_bias.alpha(256, 2.0, 0.3) - 1) < abs(risk_sensitive_bias.alpha(8, 2.0, 0.3) - 1)


def test_docs_table_of_the_risk_sensitive_bias_is_the_generated_one():
    text = (_ROOT / "docs" / "math.md").read_text(encoding="utf-8")
    start, end = "<!-- rs-grpo-bias-table:start -->\n", "\n<!-- rs-grpo-bias-table:end -->"
    assert start in text and end in text, "docs/math.md lost the RS-GRPO bias table markers"
    table = text.split(start, 1)[1].split(end, 1)[0]
    assert table == risk_sensitive_bias.table_markdown(), "regenerate with python -m benchmarks.risk_sensitive_bias"


# ----------------------------------------------------------------------------- the variance table
@pytest.fixture(scope="module")
def exact_rows():
    old = os.environ.pop(BACKEND_ENV, None)
    try:
        return variance.run(variance.DOCS_NS, (), 0)
    finally:
        if old is not None:
            os.environ[BACKEND_ENV] = old


def test_docs_variance_table_is_the_generated_one(exact_rows):
    text = (_ROOT / "docs" / "weights.md").read_text(encoding="utf-8")
    start, end = "<!-- variance-table:start -->\n", "\n<!-- variance-table:end -->"
    assert start in text and end in text, "docs/weights.md lost the variance table markers"
    table = text.split(start, 1)[1].split(end, 1)[0]
    assert table == variance.exact_docs_table(exact_rows), "regenerate with benchmarks.variance.exact_docs_table"


def test_the_demo_report_names_the_lowest_variance_estimator_as_the_table_does(exact_rows):
    """Every statement of report.VARIANCE_VERDICT (and of docs/weights.md's summary) against the enumeration."""
    from rspo_kernels.demo.report import VARIANCE_VERDICT, format_report

    by = {(r["policy"], r["n"], r["k"], r["estimator"]): r for r in exact_rows}

    def lowest(p, n, k):
        return set(variance._lowest(by, p.name, n, k))

    for p in variance.POLICIES:
        for n in (8, 16):
            assert lowest(p, n, n // 2) == {"rspo"}, (p.name, n)
            assert lowest(p, n, 1) <= {"ordergrad", "pkpo_loo"}, (p.name, n)
        for n in (4, 8, 16):
            if p.objective == "max@k":
                assert lowest(p, n, 2) == {"ordergrad"}, n
            if p.name.endswith("p=0.5"):
                assert lowest(p, n, 2) == {"rspo"}, n
                ratio = by[(p.name, n, 2, "ordergrad")]["ratio_to_rspo"]
                assert 3.99 <= ratio <= 9, ratio  # exactly 4 at n = 4
    for p in variance.POLICIES:  # k = n is ordergrad-free, and RSPO is lowest
        assert lowest(p, 4, 4) == {"rspo"}
    text = format_report({"config": {"seeds": [0], "eval_prompts": 1, "eval_samples": 1}, "tables": {}, "claims": []})
    assert VARIANCE_VERDICT in text and "'ordergrad'" in VARIANCE_VERDICT and "'rspo' at k = n/2" in VARIANCE_VERDICT
