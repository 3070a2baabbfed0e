"""Public API contract: layouts, containers, dtypes, empty input, large groups and every error path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rspo_kernels as rk

WEIGHT_FNS = [rk.pass_at_k_weights, rk.max_at_k_weights]
METRIC_FNS = [rk.pass_at_k, rk.max_at_k]
ALL_FNS = WEIGHT_FNS + METRIC_FNS


def _binary(fn):
    return fn in (rk.pass_at_k_weights, rk.pass_at_k)


# ----------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize(
    "estimator", ["rspo", "plugin", "hitchhiking", "pkpo", "pkpo_loo", "passk_training_std", "ordergrad"]
)
@given(data=st.data())
def test_layouts_agree(fn, estimator, data):
    """2-D rows, flat with group_size, and shuffled string group_ids give the same numbers."""
    if estimator == "passk_training_std" and fn is not rk.pass_at_k_weights:
        return  # Pass@k weights only
    b = data.draw(st.integers(1, 6))
    n = data.draw(st.sampled_from([4, 6, 8]))
    k = data.draw(st.sampled_from([1, 2]))
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    rewards = rng.integers(0, 2 if _binary(fn) else 4, size=(b, n)).astype(np.float64)
    kwargs = {"estimator": estimator} if fn in WEIGHT_FNS else {}
    if fn not in WEIGHT_FNS and estimator != "rspo":
        return  # metrics take no estimator; one pass is enough
    dense = fn(rewards, k, **kwargs)
    flat = fn(rewards.reshape(-1), k, group_size=n, **kwargs)
    ids = np.repeat([f"uid-{i}" for i in range(b)], n)
    shuffle = rng.permutation(b * n)
    if estimator == "hitchhiking":
        # Hitchhiking blocks follow the within-group order: interleave groups but keep that order.
        slots = rng.permutation(np.repeat(np.arange(b), n))
        for g in range(b):
            shuffle[slots == g] = np.arange(g * n, (g + 1) * n)
    by_ids = fn(rewards.reshape(-1)[shuffle], k, group_ids=ids[shuffle], **kwargs)
    if fn in WEIGHT_FNS:
        np.testing.assert_allclose(flat, dense.reshape(-1), rtol=1e-12, atol=1e-12)
        unshuffled = np.empty_like(by_ids)
        unshuffled[shuffle] = by_ids
        np.testing.assert_allclose(unshuffled, dense.reshape(-1), rtol=1e-12, atol=1e-12)
    else:
        np.testing.assert_allclose(flat, dense, rtol=1e-12, atol=1e-12)
        first_seen = list(dict.fromkeys(ids[shuffle]))
        np.testing.assert_allclose(by_ids, dense[[int(s.split("-")[1]) for s in first_seen]], rtol=1e-12, atol=1e-12)


@given(data=st.data())
def test_ragged_group_ids_match_per_group_calls(data):
    """Non-contiguous groups of different sizes equal one call per group."""
    sizes = data.draw(st.lists(st.integers(3, 9), min_size=1, max_size=6))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    ids = np.concatenate([np.full(s, 10 * g + 7) for g, s in enumerate(sizes)])
    rewards = np.round(rng.normal(size=ids.shape[0]), 1)  # rounding makes ties
    perm = rng.permutation(ids.shape[0])
    ids, rewards = ids[perm], rewards[perm]
    for estimator in ["rspo", "plugin", "pkpo", "pkpo_loo"]:
        w = rk.max_at_k_weights(rewards, 2, group_ids=ids, estimator=estimator)
        for label in np.unique(ids):
            members = ids == label
            single = rk.max_at_k_weights(rewards[members][None], 2, estimator=estimator)[0]
            np.testing.assert_allclose(w[members], single, rtol=1e-12, atol=1e-12)
    metric = rk.max_at_k(rewards, 3, group_ids=ids)
    order = list(dict.fromkeys(ids.tolist()))
    expected = [rk.max_at_k(rewards[ids == g][None], 3)[0] for g in order]
    np.testing.assert_allclose(metric, expected, rtol=1e-12)


def test_group_ids_accept_lists_tensors_and_mixed_labels():
    r = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    expected = rk.pass_at_k_weights(r, 2, group_ids=np.array([0, 1, 0, 1, 0, 1]))
    for ids in (
        [0, 1, 0, 1, 0, 1],
        torch.tensor([5, 3, 5, 3, 5, 3]),
        ["a", 2, "a", 2, "a", 2],
        [(1, "x"), None, (1, "x"), None, (1, "x"), None],
    ):
        np.testing.assert_array_equal(rk.pass_at_k_weights(r, 2, group_ids=ids), expected)


# ------------------------------------------------------------------------ containers / dtypes
@pytest.mark.parametrize(
    "dtype,out",
    [
        (torch.bool, torch.float32),
        (torch.uint8, torch.float32),
        (torch.int32, torch.float32),
        (torch.int64, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_torch_dtypes(dtype, out):
    r = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 1]]).to(dtype)
    for fn in ALL_FNS:
        got = fn(r, 2)
        assert isinstance(got, torch.Tensor) and got.dtype == out and got.device == r.device
        ref = fn(r.to(torch.float64), 2)
        torch.testing.assert_close(got, ref.to(out))  # dtype-default tolerances


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint16, np.int64, np.float16, np.float32, np.float64])
def test_numpy_dtypes(dtype):
    r = np.array([[1, 0, 0, 1], [0, 0, 0, 1]]).astype(dtype)
    got = rk.pass_at_k_weights(r, 2)
    assert isinstance(got, np.ndarray)
    assert got.dtype == (np.float64 if dtype == np.float64 else np.float32)
    np.testing.assert_allclose(got, rk.pass_at_k_weights(r.astype(np.float64), 2), rtol=1e-6)


def test_shape_order_and_noncontiguous_input():
    base = np.arange(24, dtype=np.float64).reshape(4, 6) % 5
    view = base.T  # non-contiguous (6, 4)
    np.testing.assert_array_equal(rk.max_at_k_weights(view, 3), rk.max_at_k_weights(np.ascontiguousarray(view), 3))
    assert rk.max_at_k_weights(view, 3).shape == (6, 4)
    t = torch.tensor(base, requires_grad=True)
    w = rk.max_at_k_weights(t, 2)
    assert not w.requires_grad and w.shape == (4, 6)


@pytest.mark.parametrize("fn", ALL_FNS)
def test_empty_input(fn):
    assert fn(np.zeros((0, 4)), 2).shape == ((0, 4) if fn in WEIGHT_FNS else (0,))
    assert fn(torch.zeros(0), 2, group_size=4).shape == ((0,) if fn in WEIGHT_FNS else (0,))
    assert fn(np.zeros(0), 1, group_ids=[]).shape == (0,)


def test_large_group_float32_matches_float64():
    rng = np.random.default_rng(0)
    r32 = rng.normal(size=2**20).astype(np.float32)
    w32 = rk.max_at_k_weights(r32[None], 64)
    w64 = rk.max_at_k_weights(r32.astype(np.float64)[None], 64)
    assert np.isfinite(w32).all() and w32.dtype == np.float32
    big = w64 > 1e-30  # entries below float32's normal range are flushed; compare the rest
    np.testing.assert_allclose(w32[big], w64[big], rtol=1e-5)
    assert np.abs(w32[~big]).max(initial=0) < 1e-30
    # unbiased scale check: the weights average to k times the expected marginal gain, > 0
    assert w64.sum() > 0
    p = (rng.random(2**20) < 0.01).astype(np.float32)
    wp = rk.pass_at_k_weights(p, 64, group_size=2**20)
    np.testing.assert_allclose(wp, rk.pass_at_k_weights(p.astype(np.float64), 64, group_size=2**20), rtol=1e-5)


def test_validate_false_skips_value_checks_only():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(rk.pass_at_k_weights(r, 2, validate=False), rk.pass_at_k_weights(r, 2))
    with pytest.raises(ValueError, match="k=5"):
        rk.pass_at_k_weights(r, 5, validate=False)


# --------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rewards(fn, bad):
    r = np.zeros((3, 4))
    r[2, 1] = bad
    with pytest.raises(ValueError, match=r"group 2 has a non-finite reward .* position 1 \(input index \(2, 1\)\)"):
        fn(r, 2)


def test_non_finite_with_group_ids_names_the_label():
    r = np.array([0.0, 1.0, np.nan, 0.0])
    with pytest.raises(ValueError, match=r"group 1 \(group_id 'b'\) .* position 1 \(input index 2\)"):
        rk.max_at_k_weights(r, 1, group_ids=["a", "b", "b", "a"])


@pytest.mark.parametrize("fn", ALL_FNS)
def test_k_below_one_and_non_int(fn):
    r = np.zeros((2, 4))
    with pytest.raises(ValueError, match="k must be >= 1, got k=0"):
        fn(r, 0)
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="k must be an int"):
            fn(r, bad)


@pytest.mark.parametrize("fn", ALL_FNS)
def test_k_above_group_size(fn):
    r = np.zeros(11)
    ids = [0] * 5 + [1] * 3 + [2] * 3
    with pytest.raises(ValueError, match=r"group 1 \(group_id 1\) has 3 samples but k=4; (Pass|Max)@k needs n >= k"):
        fn(r, 4, group_ids=ids)


def test_pkpo_loo_needs_k_below_n():
    with pytest.raises(ValueError, match=r"group 0 has 4 samples but k=4; the 'pkpo_loo' estimator needs n > k"):
        rk.max_at_k_weights(np.zeros((2, 4)), 4, estimator="pkpo_loo")


@pytest.mark.parametrize("fn", [rk.pass_at_k_weights, rk.pass_at_k])
def test_pass_at_k_needs_binary(fn):
    r = np.array([[0.0, 1.0, 1.0, 0.0], [0.0, 0.5, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"group 1 has reward 0.5 at position 1 .*Pass@k needs rewards in \{0, 1\}"):
        fn(r, 2)
    with pytest.raises(ValueError, match="rewards in"):
        fn(np.array([[0, 2, 1, 1]]), 2)


def test_hitchhiking_needs_multiple_of_k():
    with pytest.raises(ValueError, match=r"group 1 \(group_id 1\) has 5 samples, not a multiple of k=2"):
        rk.max_at_k_weights(np.zeros(9), 2, group_ids=[0, 0, 0, 0, 1, 1, 1, 1, 1], estimator="hitchhiking")


def test_unknown_estimator():
    with pytest.raises(ValueError, match="unknown estimator 'grpo'; choose one of 'rspo'"):
        rk.max_at_k_weights(np.zeros((1, 4)), 2, estimator="grpo")


@pytest.mark.parametrize("fn", ALL_FNS)
def test_layout_argument_errors(fn):
    flat = np.zeros(8)
    with pytest.raises(ValueError, match="exactly one of group_size .* got neither"):
        fn(flat, 2)
    with pytest.raises(ValueError, match="got both"):
        fn(flat, 2, group_size=4, group_ids=[0] * 8)
    with pytest.raises(ValueError, match=r"group_size=3 does not divide the 8 rewards"):
        fn(flat, 2, group_size=3)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        fn(flat, 1, group_size=0)
    with pytest.raises(TypeError, match="group_size must be an int"):
        fn(flat, 1, group_size=4.0)
    with pytest.raises(ValueError, match=r"group_ids has shape \(7,\) but rewards have 8 samples"):
        fn(flat, 2, group_ids=[0] * 7)
    with pytest.raises(ValueError, match="2-D rewards already give one group per row"):
        fn(np.zeros((2, 4)), 2, group_size=4)
    with pytest.raises(ValueError, match=r"rewards must be 2-D .* got shape \(2, 2, 2\)"):
        fn(np.zeros((2, 2, 2)), 1)


@pytest.mark.parametrize("fn", ALL_FNS)
def test_container_and_dtype_errors(fn):
    with pytest.raises(TypeError, match="numpy.ndarray or a torch.Tensor, got list"):
        fn([[0, 1, 1, 0]], 2)
    with pytest.raises(TypeError, match="unsupported dtype"):
        fn(np.array([["a", "b"]]), 1)
    with pytest.raises(TypeError, match="unsupported dtype"):
        fn(torch.zeros(1, 4, dtype=torch.complex64), 1)
    with pytest.raises(TypeError, match="group_ids must hold integers or hashable labels"):
        fn(np.zeros(4), 1, group_ids=np.array([0.5, 0.5, 1.5, 1.5]))


def test_backend_info_reports_every_device():
    info = rk.backend_info()
    assert set(info["cpu"]) >= {"weights", "pass_at_k", "max_at_k"}
    assert "failures" in info


# ------------------------------------------------------------------- validate=False contract
def _backends_for_weights():
    backends = ["cpp", "reference"]
    try:
        import triton  # noqa: F401
    except ImportError:
        return backends
    return backends + ["triton"]


@pytest.mark.parametrize("backend", _backends_for_weights())
@pytest.mark.parametrize("estimator", ["rspo", "plugin", "hitchhiking", "pkpo", "pkpo_loo", "ordergrad"])
def test_unvalidated_pass_at_k_counts_every_non_zero_reward_as_correct(monkeypatch, backend, estimator):
    """Issue 14 §3.5: with validate=False every backend reads Pass@k rewards as ``R != 0``."""
    from rspo_kernels._dispatch import BACKEND_ENV

    r = np.array([[0.0, 0.5, 2.0, -1.0, 0.0, 0.0, 1.0, np.nan], [0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]])
    binary = (r != 0).astype(np.float64)
    want_w = rk.pass_at_k_weights(binary, 2, estimator=estimator)
    want_m = rk.pass_at_k(binary, 2)
    monkeypatch.setenv(BACKEND_ENV, backend)
    np.testing.assert_allclose(
        rk.pass_at_k_weights(r, 2, estimator=estimator, validate=False), want_w, rtol=1e-12, atol=1e-15
    )
    np.testing.assert_allclose(rk.pass_at_k(r, 2, validate=False), want_m, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="Pass@k needs rewards in"):
        rk.pass_at_k_weights(r, 2, estimator=estimator)


# ------------------------------------------------------------------ issue 14 §3.6: clear errors
@pytest.mark.parametrize("fn", ALL_FNS)
def test_empty_rewards_still_need_groups_of_k(fn):
    with pytest.raises(ValueError, match=r"rewards of shape \(3, 0\) have groups \(rows\) of 0 samples but k=2"):
        fn(np.zeros((3, 0)), 2)
    with pytest.raises(ValueError, match=r"rewards of shape \(0, 4\) have groups \(rows\) of 4 samples but k=10"):
        fn(np.zeros((0, 4)), 10)
    with pytest.raises(ValueError, match=r"group_size=4 but k=10; (Pass|Max)@k needs n >= k"):
        fn(torch.zeros(0), 10, group_size=4)
    assert fn(np.zeros((0, 4)), 4).shape == ((0, 4) if fn in WEIGHT_FNS else (0,))


@pytest.mark.parametrize("fn", WEIGHT_FNS)
def test_estimator_none_is_a_clear_type_error(fn):
    with pytest.raises(TypeError, match=r"estimator must be a string, got None; choose one of 'rspo'"):
        fn(np.zeros((2, 4)), 2, estimator=None)


@pytest.mark.parametrize("fn", ALL_FNS)
def test_big_endian_numpy_rewards_and_ids_are_read_in_native_order(fn):
    """Documented behaviour: non-native byte order is converted (one copy), results are native."""
    r = np.array([[1, 0, 0, 1], [0, 0, 0, 1]], dtype=np.float64)
    got = fn(r.astype(">f8"), 2)
    np.testing.assert_array_equal(got, fn(r, 2))
    assert got.dtype.isnative
    ids = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(
        fn(r.reshape(-1), 2, group_ids=ids.astype(">i8")), fn(r.reshape(-1), 2, group_ids=ids)
    )


@pytest.mark.parametrize("fn", ALL_FNS)
def test_sparse_tensors_are_refused(fn):
    with pytest.raises(TypeError, match=r"rewards is a torch.sparse_coo tensor; .* pass rewards.to_dense\(\)"):
        fn(torch.zeros(3, 4).to_sparse(), 2)


@pytest.mark.parametrize("fn", ALL_FNS)
def test_masked_arrays_with_masked_entries_are_refused(fn):
    masked = np.ma.masked_array([[1.0, 0.0, 1.0]], mask=[[0, 1, 0]])
    with pytest.raises(TypeError, match=r"masked array with masked entries.*rewards.compressed\(\).*rewards.filled"):
        fn(masked, 2)
    unmasked = np.ma.masked_array([[1.0, 0.0, 1.0]], mask=[[0, 0, 0]])
    np.testing.assert_array_equal(fn(unmasked, 2), fn(unmasked.data, 2))  # nothing masked: the data


@pytest.mark.parametrize(
    "ids",
    [
        [0.5, 0.5, 1.5, 1.5],
        np.array([0.5, 0.5, 1.5, 1.5]),
        torch.tensor([0.0, 0.0, 1.0, 1.0]),
        [1, 1, 2.0, 2],
        np.array([1, 1, 2.0, 2], dtype=object),
    ],
)
def test_float_group_ids_are_refused_in_every_container(ids):
    with pytest.raises(TypeError, match="group_ids must hold integers or hashable labels, not floats"):
        rk.pass_at_k(np.array([1.0, 0.0, 0.0, 1.0]), 1, group_ids=ids)


@pytest.mark.parametrize(
    "ids", [[1, True, 1, True], ["a", False, "a", False], np.array([1, True, 1, True], dtype=object)]
)
def test_bools_mixed_with_other_group_ids_are_refused(ids):
    """``1``, ``True`` and ``1.0`` are one dict key: refuse them instead of merging the groups."""
    with pytest.raises(TypeError, match=r"group_ids mix bools with other labels: got True at input index 1|got False"):
        rk.pass_at_k(np.array([1.0, 0.0, 0.0, 1.0]), 1, group_ids=ids)
    # Bools alone are two labels, like any two strings.
    bools = rk.pass_at_k(np.array([1.0, 0.0, 0.0, 1.0]), 1, group_ids=[True, False, True, False])
    np.testing.assert_array_equal(bools, rk.pass_at_k(np.array([1.0, 0.0, 0.0, 1.0]), 1, group_ids=list("abab")))


@pytest.mark.parametrize("fn", [rk.max_at_k_weights])
def test_passk_training_std_is_pass_at_k_only(fn):
    with pytest.raises(ValueError, match=r"'passk_training_std' estimator is defined for binary Pass@k rewards only"):
        fn(np.array([[0.1, 0.5, 0.9, 0.2]]), 2, estimator="passk_training_std")
    with pytest.raises(ValueError, match=r"group 0 has reward 0.5 at position 1 .*Pass@k needs rewards in \{0, 1\}"):
        rk.pass_at_k_weights(np.array([[0.0, 0.5, 1.0, 1.0]]), 2, estimator="passk_training_std")
