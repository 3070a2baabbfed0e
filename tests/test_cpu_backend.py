"""The C++ CPU backend (``rspo_kernels._cpu``) against the torch specification and brute force.

Every estimator x objective x dtype x layout (dense, ragged) is compared with
``rspo_kernels.weights.estimators`` on hypothesis-generated groups that contain ties on purpose; small
groups are also compared with subset enumeration (``oracles.py``). Tolerances come from the dtype:
the backend computes in float64 and rounds once, the specification uses float64 log-factorials
whose relative error grows like ``eps64 * log(n!)``.
"""

from __future__ import annotations

import math

import numpy as np
import oracles
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rspo_kernels as rk
from rspo_kernels import _cpu, _dispatch
from rspo_kernels.weights import _cpu_backend, api
from rspo_kernels.weights import estimators as spec
from rspo_kernels.weights._layout import Groups

ESTIMATORS = ("rspo", "plugin", "hitchhiking", "pkpo", "pkpo_loo", "ordergrad")
OBJECTIVES = ("pass@k", "max@k")
DTYPES = (torch.float32, torch.float64)
SORTED_ESTIMATORS = ("rspo", "plugin", "pkpo", "pkpo_loo", "ordergrad")  # tied rewards must get equal weights


def make_groups(values, sizes, dtype) -> Groups:
    sizes = np.asarray(sizes, dtype=np.int64)
    offsets = np.zeros(sizes.shape[0] + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    uniform = int(sizes[0]) if sizes.size and bool((sizes == sizes[0]).all()) else None
    vals = torch.as_tensor(np.asarray(values, dtype=np.float64)).to(dtype).contiguous()
    return Groups(vals, torch.from_numpy(offsets), uniform, sizes)


def tolerances(dtype: torch.dtype, n_max: int, k: int, scale: float) -> tuple[float, float]:
    """(rtol, atol) for comparing with the specification.

    One rounding to ``dtype`` on each side (2 eps), plus the specification's float64 log-factorial
    error (eps64 per unit of log(n!)), applied to terms of size up to ``2 k max|R|`` (pkpo_loo
    subtracts two such terms, so its absolute error scales with them, not with the result).
    """
    eps = torch.finfo(dtype).eps
    eps64 = torch.finfo(torch.float64).eps
    rtol = 4 * eps + 8 * eps64 * (1 + math.lgamma(n_max + 1))
    atol = rtol * 2 * k * max(scale, 1e-30)
    return rtol, atol


def assert_matches_spec(got: torch.Tensor, want: torch.Tensor, dtype, n_max: int, k: int, scale: float):
    assert got.dtype == want.dtype == dtype
    rtol, atol = tolerances(dtype, n_max, k, scale)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- strategies
@st.composite
def grouped_case(draw, estimator: str, binary: bool):
    """(values, sizes, k): dense or ragged groups, with ties drawn on purpose, valid for estimator."""
    k = draw(st.integers(1, 6))
    ragged = draw(st.booleans())
    num_groups = draw(st.integers(1, 5))
    if estimator == "hitchhiking":
        size = st.integers(1, 4).map(lambda m: m * k)
    else:
        lo = k + 1 if estimator in ("pkpo_loo", "ordergrad") else k
        # Mostly small groups (insertion sort); sometimes > 48 (the radix-sort path).
        size = st.one_of(st.integers(lo, lo + 9), st.integers(lo + 45, lo + 70))
    if ragged:
        sizes = draw(st.lists(size, min_size=num_groups, max_size=num_groups))
    else:
        sizes = [draw(size)] * num_groups
    total = sum(sizes)
    if binary:
        values = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=total, max_size=total))
    else:
        finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)
        palette = draw(st.lists(finite, min_size=1, max_size=draw(st.sampled_from([2, 4, total]))))
        palette = palette + [-x for x in palette[:1]] + [0.0, -0.0]  # signed zeros tie with each other
        values = draw(st.lists(st.sampled_from(palette), min_size=total, max_size=total))
        shift = draw(st.sampled_from([0.0, 0.0, 100.0]))
        values = [v + shift for v in values]
    return values, sizes, k


PASS_ONLY_ESTIMATORS = ("passk_training_std",)  # binary rewards only: no Max@k form


def _cases():
    return [(o, e, d) for o in OBJECTIVES for e in ESTIMATORS for d in DTYPES] + [
        ("pass@k", e, d) for e in PASS_ONLY_ESTIMATORS for d in DTYPES
    ]


@pytest.mark.parametrize("objective, estimator, dtype", _cases())
@given(data=st.data())
def test_weights_match_specification(objective, estimator, dtype, data):
    values, sizes, k = data.draw(grouped_case(estimator, binary=objective == "pass@k"))
    groups = make_groups(values, sizes, dtype)
    got = _cpu_backend.grouped_weights(groups, k, objective, estimator)
    want = spec.grouped_weights(groups, k, objective, estimator)
    scale = float(groups.values.abs().max())
    assert_matches_spec(got, want, dtype, max(sizes), k, scale)


@pytest.mark.parametrize("estimator", SORTED_ESTIMATORS)
@given(data=st.data())
def test_tied_rewards_get_bitwise_equal_weights(estimator, data):
    values, sizes, k = data.draw(grouped_case(estimator, binary=False))
    groups = make_groups(values, sizes, torch.float64)
    w = _cpu_backend.grouped_weights(groups, k, "max@k", estimator).numpy()
    v = groups.values.numpy()
    offsets = groups.offsets.numpy()
    for g in range(len(sizes)):
        lo, hi = offsets[g], offsets[g + 1]
        for value in np.unique(v[lo:hi]):
            tied = w[lo:hi][v[lo:hi] == value]
            assert np.all(tied.view(np.int64) == tied[0].view(np.int64)), (value, tied)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_metrics_match_specification(dtype, data):
    values, sizes, k = data.draw(grouped_case("rspo", binary=False))
    groups = make_groups(values, sizes, dtype)
    scale = float(groups.values.abs().max())
    assert_matches_spec(
        _cpu_backend.grouped_max_at_k(groups, k), spec.grouped_max_at_k(groups, k), dtype, max(sizes), k, scale
    )
    binary = groups.with_values((groups.values > groups.values.median()).to(dtype))
    assert_matches_spec(
        _cpu_backend.grouped_pass_at_k(binary, k), spec.grouped_pass_at_k(binary, k), dtype, max(sizes), k, 1.0
    )


# --------------------------------------------------------------------------- brute force
@pytest.mark.parametrize(
    "rewards, k",
    [
        ([1, 0, 0, 1, 0, 0, 0, 0], 4),
        ([0.1, 0.5, 0.5, 0.9], 2),
        ([3, 1, 2, 5], 4),
        ([2, -1, 2, 0.5, -1, 7], 3),
        ([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0], 2),
        ([5.0], 1),
        ([-3.0, -3.0, -3.0], 2),
    ],
)
def test_weights_match_subset_enumeration(rewards, k):
    groups = make_groups(rewards, [len(rewards)], torch.float64)
    binary = set(rewards) <= {0, 1}
    expected = {
        "rspo": oracles.subset_rspo(rewards, k),
        "pkpo": oracles.subset_pkpo(rewards, k),
        "plugin": (oracles.plugin_pass if binary else oracles.plugin_max)(rewards, k),
    }
    if k < len(rewards):
        expected["pkpo_loo"] = oracles.subset_pkpo_loo(rewards, k)
        expected["ordergrad"] = oracles.subset_ordergrad(rewards, k)
    if len(rewards) % k == 0:
        expected["hitchhiking"] = oracles.hitchhiking(rewards, k)
    if binary:
        expected["passk_training_std"] = oracles.passk_training_std(rewards, k)
    objective = "pass@k" if binary else "max@k"
    rtol, atol = tolerances(torch.float64, len(rewards), k, max(map(abs, rewards)))
    for estimator, want in expected.items():
        got = _cpu_backend.grouped_weights(groups, k, objective, estimator)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=rtol, atol=atol)
    torch.testing.assert_close(
        _cpu_backend.grouped_max_at_k(groups, k).item(), oracles.subset_max_at_k(rewards, k), rtol=rtol, atol=atol
    )
    if binary:
        torch.testing.assert_close(
            _cpu_backend.grouped_pass_at_k(groups, k).item(), oracles.subset_pass_at_k(rewards, k), rtol=rtol, atol=atol
        )


# --------------------------------------------------------------------------- numerics, determinism
def test_large_group_float32_matches_float64():
    """One group of 2^20 rewards, k = 64: float32 output is the float64 result rounded once."""
    gen = torch.Generator().manual_seed(0)
    x32 = torch.rand(2**20, generator=gen, dtype=torch.float32)
    n = x32.numel()
    for estimator in SORTED_ESTIMATORS:
        w32 = _cpu_backend.grouped_weights(make_groups(x32, [n], torch.float32), 64, "max@k", estimator)
        w64 = _cpu_backend.grouped_weights(make_groups(x32.double(), [n], torch.float64), 64, "max@k", estimator)
        normal = w64.abs() >= torch.finfo(torch.float32).tiny  # smaller weights underflow in float32
        rel = ((w32.double() - w64).abs() / w64.abs())[normal]
        assert rel.max().item() <= 1e-5, estimator
        assert torch.all(w32[~normal].abs() <= torch.finfo(torch.float32).tiny)
    m32 = _cpu_backend.grouped_max_at_k(make_groups(x32, [n], torch.float32), 64)
    m64 = _cpu_backend.grouped_max_at_k(make_groups(x32.double(), [n], torch.float64), 64)
    assert abs(m32.double().item() - m64.item()) <= 2 * torch.finfo(torch.float32).eps * m64.item()


def test_large_group_matches_specification():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2**16, generator=gen, dtype=torch.float64).round(decimals=2)  # many ties
    groups = make_groups(x, [x.numel()], torch.float64)
    for estimator in SORTED_ESTIMATORS:
        got = _cpu_backend.grouped_weights(groups, 64, "max@k", estimator)
        want = spec.grouped_weights(groups, 64, "max@k", estimator)
        assert_matches_spec(got, want, torch.float64, x.numel(), 64, float(x.abs().max()))


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_deterministic_and_independent_of_threading(objective, dtype):
    """Two runs give the same bytes, and the multi-threaded batch equals one call per group."""
    gen = torch.Generator().manual_seed(2)
    sizes = torch.randint(8, 400, (300,), generator=gen).numpy()
    x = torch.rand(int(sizes.sum()), generator=gen, dtype=torch.float64)
    x = (x < 0.4).double() if objective == "pass@k" else (x * 8).floor() / 8  # ties
    ragged = make_groups(x, sizes, dtype)
    assert ragged.values.numel() >= 32768  # large enough for every kernel's parallel path (csrc)
    blocks = make_groups(x[: 4 * (x.numel() // 4)], [4] * (x.numel() // 4), dtype)
    for estimator in ESTIMATORS + (PASS_ONLY_ESTIMATORS if objective == "pass@k" else ()):
        k = 4 if estimator == "hitchhiking" else 7
        groups = blocks if estimator == "hitchhiking" else ragged
        first = _cpu_backend.grouped_weights(groups, k, objective, estimator).numpy().tobytes()
        second = _cpu_backend.grouped_weights(groups, k, objective, estimator).numpy().tobytes()
        assert first == second, estimator
        off = groups.offsets.numpy()
        one_by_one = b"".join(
            _cpu_backend.grouped_weights(
                make_groups(groups.values[off[g] : off[g + 1]], [off[g + 1] - off[g]], dtype), k, objective, estimator
            )
            .numpy()
            .tobytes()
            for g in range(groups.num_groups)
        )
        assert first == one_by_one, estimator


# --------------------------------------------------------------------------- bindings, dispatch
def test_bindings_reject_bad_buffers_with_value_error():
    v = np.zeros(6)
    off = np.array([0, 3, 6], dtype=np.int64)
    with pytest.raises(ValueError, match=r"group 1 has n=1 samples but k=4 \(k must be <= n\)"):
        _cpu.weights(v, np.array([0, 5, 6], dtype=np.int64), 4, "max@k", "rspo", np.empty(6))
    with pytest.raises(ValueError, match=r"group 0 has n=3 samples but k=3 \(needs k < n\)"):
        _cpu.weights(v, off, 3, "max@k", "pkpo_loo", np.empty(6))
    with pytest.raises(ValueError, match=r"group 0 has n=3 samples, not a multiple of k=2"):
        _cpu.weights(v, off, 2, "max@k", "hitchhiking", np.empty(6))
    with pytest.raises(ValueError, match="k=0 must be at least 1"):
        _cpu.max_at_k(v, off, 0, np.empty(2))
    with pytest.raises(ValueError, match="unknown estimator 'grpo'"):
        _cpu.weights(v, off, 1, "max@k", "grpo", np.empty(6))
    with pytest.raises(ValueError, match="passk_training_std estimator is defined for Pass@k"):
        _cpu.weights(v, off, 1, "max@k", "passk_training_std", np.empty(6))
    with pytest.raises(ValueError, match="unknown objective 'best@k'"):
        _cpu.weights(v, off, 1, "best@k", "rspo", np.empty(6))
    with pytest.raises(ValueError, match="out must have the dtype of values"):
        _cpu.weights(v, off, 1, "max@k", "rspo", np.empty(6, dtype=np.float32))
    with pytest.raises(ValueError, match="values must be float32 or float64"):
        _cpu.weights(v.astype(np.int64), off, 1, "max@k", "rspo", np.empty(6, dtype=np.int64))
    with pytest.raises(ValueError, match="values must be a 1-D contiguous array"):
        _cpu.weights(np.zeros(12)[::2], off, 1, "max@k", "rspo", np.empty(6))
    with pytest.raises(ValueError, match=r"offsets\[-1\] must equal len\(values\)"):
        _cpu.weights(v, np.array([0, 3, 5], dtype=np.int64), 1, "max@k", "rspo", np.empty(6))
    with pytest.raises(ValueError, match="out must have one entry per group"):
        _cpu.pass_at_k(v, off, 1, np.empty(6))
    with pytest.raises(ValueError, match="every group needs at least one"):
        _cpu.max_at_k(v, np.array([0, 0, 6], dtype=np.int64), 1, np.empty(2))


def test_empty_input():
    groups = make_groups([], [], torch.float32)
    assert _cpu_backend.grouped_weights(groups, 1, "max@k", "rspo").shape == (0,)
    assert _cpu_backend.grouped_max_at_k(groups, 1).shape == (0,)


def test_public_api_routes_cpu_tensors_to_cpp():
    cpu = rk.backend_info()["cpu"]
    assert {op: cpu[op] for op in ("max_at_k", "pass_at_k", "weights")} == dict.fromkeys(
        ("max_at_k", "pass_at_k", "weights"), "cpp"
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_public_api_with_shuffled_ragged_group_ids_matches_reference(monkeypatch, estimator):
    gen = np.random.default_rng(3)
    k = 2
    sizes = gen.integers(1, 12, size=40) * 2 + (2 if estimator in ("pkpo_loo", "ordergrad") else 0)
    ids = np.repeat(np.arange(sizes.size), sizes)
    gen.shuffle(ids)
    rewards = gen.choice(np.linspace(-1, 1, 9), size=ids.size)
    binary = (rewards > 0).astype(np.float64)
    got = api.max_at_k_weights(rewards, k, group_ids=ids, estimator=estimator)
    got_pass = api.pass_at_k_weights(binary, k, group_ids=ids, estimator=estimator)
    got_metric = api.max_at_k(rewards, k, group_ids=ids)
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "reference")
    want = api.max_at_k_weights(rewards, k, group_ids=ids, estimator=estimator)
    want_pass = api.pass_at_k_weights(binary, k, group_ids=ids, estimator=estimator)
    want_metric = api.max_at_k(rewards, k, group_ids=ids)
    rtol, atol = tolerances(torch.float64, int(sizes.max()), k, 1.0)
    for a, b in [(got, want), (got_pass, want_pass), (got_metric, want_metric)]:
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(_dispatch._IMPLEMENTATIONS, ("weights", "cpp"), "rspo_kernels._no_such_module:f")
    monkeypatch.setattr(_dispatch, "_cache", {})
    monkeypatch.setattr(_dispatch, "_failures", {})
    with pytest.warns(RuntimeWarning, match="'cpp' backend for 'weights' failed to load"):
        backend, fn = _dispatch.implementation("weights", "cpu")
    assert backend != "cpp"
    backend_again, _ = _dispatch.implementation("weights", "cpu")  # no second warning (filterwarnings=error)
    assert backend_again == backend
    assert "weights/cpp" in rk.backend_info()["failures"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(
    n=st.integers(0, 5000),
    bad=st.lists(
        st.tuples(st.integers(0, 4999), st.sampled_from([np.nan, np.inf, -np.inf, 0.5, -1.0, 2.0])), max_size=3
    ),
    binary_input=st.booleans(),
)
def test_first_invalid_matches_numpy(dtype, n, bad, binary_input):
    x = (np.arange(n) % 3 == 0).astype(dtype) if binary_input else np.linspace(-5, 5, n).astype(dtype)
    for pos, value in bad:
        if pos < n:
            x[pos] = value
    for binary in (False, True):
        ok = np.isin(x, [0, 1]) if binary else np.isfinite(x)
        want = int(np.argmin(ok)) if not ok.all() else -1
        assert _cpu.first_invalid(x, binary) == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("binary", [False, True])
@given(data=st.data())
def test_first_invalid_matches_reference(dtype, binary, data):
    """The validation scan finds the same first bad value as the torch reference."""
    from rspo_kernels.weights import _validation

    n = data.draw(st.integers(0, 5000))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    v = torch.from_numpy(rng.integers(0, 2, n).astype(np.float64)).to(dtype)
    for _ in range(data.draw(st.integers(0, 3))):
        if n:
            v[int(rng.integers(0, n))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.5, 2.0, -1.0]))
    assert _cpu_backend.first_invalid(v, binary) == _validation.first_invalid(v, binary)


def test_max_at_k_metric_does_not_overflow_near_the_float64_maximum(monkeypatch):
    """Issue 14 §3.4: every pair's max is 1e308, so max@2 is 1e308, not inf."""
    groups = make_groups([-1e308, 1e308, 1e308], [3], torch.float64)
    assert _cpu_backend.grouped_max_at_k(groups, 2).item() == pytest.approx(1e308, rel=1e-15)
    assert spec.grouped_max_at_k(groups, 2).item() == pytest.approx(1e308, rel=1e-15)


# --------------------------------------------------------------------------- validation in the count
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sizes", [[64] * 700, [5, 70000, 3], list(range(1, 400))])
@given(data=st.data())
def test_counting_pass_validates_like_first_invalid(dtype, sizes, data):
    """Issue 14 §2: the Pass@k count reports the first non-binary reward that a separate scan finds."""
    total = sum(sizes)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    v = rng.integers(0, 2, total).astype(dtype)
    for _ in range(data.draw(st.integers(0, 3))):
        v[int(rng.integers(0, total))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.5, 2.0, -1.0, -0.0]))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    for estimator in ("rspo", "passk_training_std"):
        bad = _cpu.weights(v, offsets, 1, "pass@k", estimator, np.empty_like(v), True)
        assert bad == _cpu.first_invalid(v, True)
        assert _cpu.weights(v, offsets, 1, "pass@k", estimator, np.empty_like(v), False) == -1


def test_public_api_validates_cpu_pass_at_k_without_a_separate_scan(monkeypatch):
    """The validated C++ Pass@k path reads the rewards once: the separate scan is never called."""

    def no_scan(values, binary):
        raise AssertionError("the separate validation scan ran")

    monkeypatch.setattr(_cpu_backend, "first_invalid", no_scan)
    monkeypatch.setattr(_dispatch, "_cache", {**_dispatch._cache, ("first_invalid", "cpp"): no_scan})
    r = np.zeros((300, 64), dtype=np.float32)
    r[:, ::7] = 1
    rk.pass_at_k_weights(r, 4)
    r[211, 5] = 0.5
    with pytest.raises(
        ValueError, match=r"group 211 has reward 0.5 at position 5 \(input index \(211, 5\)\); Pass@k needs"
    ):
        rk.pass_at_k_weights(r, 4)
    r[211, 5] = np.nan
    with pytest.raises(ValueError, match=r"group 211 has a non-finite reward \(nan\) at position 5"):
        rk.pass_at_k_weights(torch.from_numpy(r), 4, estimator="passk_training_std")
