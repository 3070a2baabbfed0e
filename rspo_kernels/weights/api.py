"""Public Pass@k / Max@k weights and metrics.

Each function validates its input once, normalises the layout into
:class:`~rspo_kernels.weights._layout.Groups`, asks :mod:`rspo_kernels._dispatch` for a backend, and
hands the result back in the caller's shape, order and container.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch

import rspo_kernels.weights._validation as check
from rspo_kernels._dispatch import implementation
from rspo_kernels.weights._layout import Groups, InvalidRewardError, Restore, to_groups
from rspo_kernels.weights.estimators import ESTIMATORS
from rspo_kernels.weights.maxrl import MAXRL_ESTIMATORS, grouped_maxrl_weights

__all__ = [
    "pass_at_k_weights",
    "max_at_k_weights",
    "pass_at_k",
    "max_at_k",
    "maxrl_weights",
    "risk_sensitive_weights",
    "ESTIMATORS",
    "MAXRL_ESTIMATORS",
]

ArrayLike = np.ndarray | torch.Tensor
GroupIds = np.ndarray | torch.Tensor | Sequence[Hashable]


# Backends whose weight kernels validate the rewards in the read that computes them (one pass
# over memory instead of two): the public API hands them ``validate=True`` instead of scanning.
_VALIDATING_BACKENDS = frozenset({"cpp"})


def _prepare(
    rewards: ArrayLike,
    k: int,
    group_size: int | None,
    group_ids: GroupIds | None,
    objective: str,
    estimator: str,
) -> tuple[Groups, Restore, int]:
    """Validate everything but the reward values, and normalise the layout."""
    k = check.check_k(k)
    values, container = check.as_reward_tensor(rewards)
    check.check_layout_args(values, group_size, group_ids, k, objective)
    groups, restore = to_groups(
        values, shape=values.shape, container=container, group_size=group_size, group_ids=group_ids
    )
    check.check_group_sizes(groups, restore, k, objective, estimator)
    return groups, restore, k


def _weights(rewards, k, group_size, group_ids, objective, estimator, validate):
    check.check_estimator(estimator, objective)
    groups, restore, k = _prepare(rewards, k, group_size, group_ids, objective, estimator)
    out = check.output_dtype(rewards)
    if validate:
        check.check_integer_range(rewards)
    if groups.values.numel() == 0:
        return restore.per_sample(groups.values.to(out, copy=True))
    backend, fn = implementation("weights", groups.values.device.type)
    if validate and backend in _VALIDATING_BACKENDS:
        try:
            w = fn(groups, k, objective, estimator, validate=True)
        except InvalidRewardError as bad:
            check.raise_invalid_value(groups, restore, bad.position)
    else:
        if validate:
            check.check_values(groups, restore, objective)
        w = fn(groups, k, objective, estimator)
    w = w.to(out)
    if validate and objective == "max@k":  # weights are linear in the rewards: near the dtype's limit they overflow
        overflow = torch.nonzero(~torch.isfinite(w))
        if overflow.numel():
            g = int(np.searchsorted(np.cumsum(groups.sizes), int(overflow[0, 0]), side="right"))
            raise ValueError(
                f"{restore.describe_group(g)}: its Max@k weights overflow {out} (beyond {torch.finfo(out).max:.1e}; "
                "they grow with the rewards' spread): rescale the rewards, e.g. divide them by their largest magnitude"
            )
    return restore.per_sample(w)


def _metric(op, rewards, k, group_size, group_ids, validate):
    objective = "pass@k" if op == "pass_at_k" else "max@k"
    groups, restore, k = _prepare(rewards, k, group_size, group_ids, objective, "rspo")
    out = check.output_dtype(rewards)
    if groups.values.numel() == 0:
        return restore.per_group(groups.values.new_zeros(groups.num_groups, dtype=out))
    if validate:
        check.check_integer_range(rewards)
        check.check_values(groups, restore, objective)
    _, fn = implementation(op, groups.values.device.type)
    return restore.per_group(fn(groups, k).to(out))


def pass_at_k_weights(
    rewards: ArrayLike,
    k: int,
    *,
    group_size: int | None = None,
    group_ids: GroupIds | None = None,
    estimator: str = "rspo",
    validate: bool = True,
) -> ArrayLike:
    r"""Per-response policy-gradient weights whose expectation is the gradient of Pass@k.

    Parameters
    ----------
    rewards : numpy.ndarray or torch.Tensor
        Binary rewards (0 = wrong, 1 = correct), bool, integer or float. Either ``(B, n)``, one
        group (prompt) per row, or ``(N,)`` together with ``group_size`` or ``group_ids``. Dense
        tensors only; numpy arrays in either byte order (converted); masked arrays only when
        nothing is masked.
    k : int
        Number of samples Pass@k draws, ``1 <= k <= n`` for every group.
    group_size : int, optional
        For 1-D rewards: consecutive groups of this size (must divide N).
    group_ids : array-like of length N, optional
        For 1-D rewards: a label per response (ints, strings such as verl's uids, any hashable).
        Groups may be non-contiguous and of different sizes. Float labels, and bools beside
        other labels, are refused: Python treats ``1``, ``1.0`` and ``True`` as one label.
    estimator : {"rspo", "plugin", "hitchhiking", "pkpo", "pkpo_loo", "passk_training_std", "ordergrad"}, default "rspo"
        ``"rspo"`` is unbiased (Theorem 4.3); ``"plugin"`` is the biased eq. 7;
        ``"hitchhiking"`` is the Section 3 baseline (group sizes must be multiples of k);
        ``"pkpo"`` and ``"pkpo_loo"`` are PKPO's estimators (``"pkpo_loo"`` needs n > k);
        ``"passk_training_std"`` is the analytic advantage of Chen et al., "Pass@k Training"
        (arXiv 2508.10751), std-normalised GRPO-style, so biased and not on this scale (see Notes);
        ``"ordergrad"`` is OrderGrad / MaxPO's unbiased and exactly centred advantage (needs
        k <= n-1; see Notes).
    validate : bool, default True
        Check that rewards are finite and binary. These checks need one device-to-host sync; pass
        False inside a training step on validated rewards. Shape and size checks always run.
        Unchecked rewards are read as ``R != 0`` by every backend: any non-zero reward (NaN
        included) counts as correct.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        Weights with the shape, order and container of ``rewards`` (same device). float64 for
        float64 rewards, float32 otherwise.

    Raises
    ------
    ValueError
        Non-finite or non-binary rewards, k < 1, a group with fewer than k samples (also for
        empty ``(0, n)`` rewards with n < k), an unknown estimator, bad layout arguments; each
        message names the offending group and the fix.
    TypeError
        Unsupported container or dtype (sparse tensors, masked arrays with masked entries), a
        non-integer k / group_size, a non-string estimator, float or bool-mixed group ids.

    Notes
    -----
    With ``c`` correct responses out of ``n`` (RSPO, Theorem 4.3 of arXiv 2508.01174, in its
    leave-one-out form)

    .. math:: w_i = k \, \frac{\binom{n-c}{k-1}}{\binom{n-1}{k-1}} \, R_i ,

    scaled so that :math:`E[\frac1n \sum_i w_i \nabla \log\pi(y_i)] = \nabla \mathrm{Pass@}k`;
    ``k = 1`` gives ``w = R``. Correct responses get 0 when ``n - c < k - 1`` (the group almost
    surely passes already). Computed in float64 from log-factorials, never forming C(n, k).
    On CPU tensors, validation happens inside the C++ kernel's counting read (no second pass).

    ``"passk_training_std"`` (docs/math.md § Other estimators): with ``rho = 1 - C(n-c,k)/C(n,k)``
    and ``sigma = sqrt(rho (1 - rho))``, a correct response gets ``(1 - rho)/(sigma + 1e-6)``
    and a wrong one ``(1 - rho - C(n-c-1,k-1)/C(n-1,k-1))/(sigma + 1e-6)``; a group that is all
    correct or all wrong gets 0, and so does every group at k = n. Its expectation is
    ``alpha`` times the Pass@k gradient, not the gradient itself, where ``alpha`` depends on n,
    k and the prompt's pass rate and is neither bounded by 1 nor constant (1.86 at n=8, k=1,
    p=0.5; 0 at k = n; table in docs/math.md § Other estimators); k = 1 gives GRPO's advantage.

    ``"ordergrad"`` (OrderGrad, arXiv 2606.06096; MaxPO, arXiv 2606.06080): ``A_i = k (q_i - M_i)``,
    with ``q_i`` the chance that response i and k-1 random others hold a correct one, and ``M_i``
    the unbiased pass@k of the n-1 others. A correct response gets ``k C(n-c, k)/C(n-1, k)``, a
    wrong one ``-k c/(n-k) C(n-1-c, k-1)/C(n-1, k-1)``; every group sums to exactly 0, the
    expectation is the Pass@k gradient (on this scale), and ``k = 1`` gives RLOO,
    ``R_i - mean_{j != i} R_j``. Needs ``k <= n-1``.

    Integer rewards wider than 16 bits (int32, int64) are computed in float64, so they keep
    their exact values (``validate=True`` refuses int64 beyond ``+-2**53``, where float64 is no
    longer exact); the weights are then rounded once to float32.

    Examples
    --------
    >>> import numpy as np, rspo_kernels as rk
    >>> rk.pass_at_k_weights(np.array([[1, 0, 0, 1, 0, 0, 0, 0]]), k=4)  # 16/7 for correct ones
    array([[2.2857144, 0.       , 0.       , 2.2857144, 0.       , 0.       ,
            0.       , 0.       ]], dtype=float32)
    """
    return _weights(rewards, k, group_size, group_ids, "pass@k", estimator, validate)


def max_at_k_weights(
    rewards: ArrayLike,
    k: int,
    *,
    group_size: int | None = None,
    group_ids: GroupIds | None = None,
    estimator: str = "rspo",
    validate: bool = True,
) -> ArrayLike:
    r"""Per-response policy-gradient weights whose expectation is the gradient of Max@k.

    Parameters
    ----------
    rewards : numpy.ndarray or torch.Tensor
        Real rewards (bool, integer or float; ties allowed). ``(B, n)`` one group per row, or
        ``(N,)`` with ``group_size`` or ``group_ids``.
    k : int
        Number of samples Max@k draws, ``1 <= k <= n`` for every group.
    group_size, group_ids, validate
        As in :func:`pass_at_k_weights` (``validate`` checks finiteness only).
    estimator : {"rspo", "plugin", "hitchhiking", "pkpo", "pkpo_loo", "ordergrad"}, default "rspo"
        ``"rspo"`` is unbiased and tie-aware (Theorem C.4); ``"plugin"`` is the biased eq. 11;
        ``"ordergrad"`` is unbiased and exactly centred (needs k <= n-1; see Notes).
        ``"passk_training_std"`` has no Max@k form and raises ValueError.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        Weights with the shape, order and container of ``rewards``; float64 for float64 input,
        float32 otherwise. Integer rewards wider than 16 bits (int32, int64) are computed in
        float64 (exact up to ``+-2**53``; ``validate=True`` refuses larger ones) and rounded
        once at the end; pass ``rewards.double()`` for float64 weights.

    Raises
    ------
    ValueError, TypeError
        As in :func:`pass_at_k_weights` (no binary requirement).

    Notes
    -----
    Sort the group ascending and let :math:`c_<[i]` count rewards strictly below :math:`R_i`
    (Theorem C.4 of arXiv 2508.01174):

    .. math:: w_i = \frac{k}{\binom{n-1}{k-1}} \Big[ R_i \binom{c_<[i]}{k-1}
              - \sum_{j=1}^{c_<[i]} R_{(j)} \binom{j-1}{k-2} \Big]
              = k \, E_S\big[\max(R_i - \max S, 0)\big],

    with S uniform over the (k-1)-subsets of the other responses. Weights are non-negative,
    shift-invariant, equal for tied rewards, and zero for the lowest k-1; ``k = n`` gives only the
    top response ``n (R_max - R_second)``; ``k = 1`` gives ``w = R``. Binary rewards give exactly
    the Pass@k weights.

    ``"ordergrad"`` (OrderGrad, arXiv 2606.06096; MaxPO, arXiv 2606.06080) is "include one minus
    leave one out": :math:`A_i = k (E_S[\max(R_i, \max S)] - M_i)`, with S as above and
    :math:`M_i` the unbiased max@k of the n-1 others. It is unbiased, every group's weights sum to
    exactly 0, tied rewards share one weight, it is shift-invariant, and ``k = 1`` gives RLOO,
    :math:`R_i - \mathrm{mean}_{j \ne i} R_j`. O(n log n) per group in the sorted gap form of
    docs/math.md. Needs ``k <= n-1``.

    Examples
    --------
    >>> import numpy as np, rspo_kernels as rk
    >>> rk.max_at_k_weights(np.array([0.1, 0.5, 0.5, 0.9]), k=2, group_size=4)  # [0, 4/15, 4/15, 16/15]
    array([0.        , 0.26666667, 0.26666667, 1.06666667])
    """
    return _weights(rewards, k, group_size, group_ids, "max@k", estimator, validate)


def pass_at_k(
    rewards: ArrayLike,
    k: int,
    *,
    group_size: int | None = None,
    group_ids: GroupIds | None = None,
    validate: bool = True,
) -> ArrayLike:
    r"""Unbiased pass@k of each group (the evaluation metric).

    Parameters
    ----------
    rewards, k, group_size, group_ids, validate
        As in :func:`pass_at_k_weights`.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(G,)`` one value per group: in row order for 2-D input, in order of first appearance of
        each id for ``group_ids``. float64 for float64 input, float32 otherwise.

    Notes
    -----
    :math:`1 - \binom{n-c}{k} / \binom{n}{k}` (Chen et al. 2021), 1 when ``n - c < k``; computed
    in float64 as ``-expm1(sum log1p(-x))`` over the ``min(c, k)`` factors of the product form
    (docs/math.md § Evaluation metrics), so a tiny pass rate keeps full relative precision. Unlike
    bootstrapping with replacement (what some trainers log as best@k), it is unbiased. With
    ``validate=False`` any non-zero reward counts as correct.

    Examples
    --------
    >>> import numpy as np, rspo_kernels as rk
    >>> rk.pass_at_k(np.array([[1, 0, 0, 0], [1, 1, 0, 0]]), k=2)  # 1/2 and 5/6
    array([0.5      , 0.8333333], dtype=float32)
    """
    return _metric("pass_at_k", rewards, k, group_size, group_ids, validate)


def max_at_k(
    rewards: ArrayLike,
    k: int,
    *,
    group_size: int | None = None,
    group_ids: GroupIds | None = None,
    validate: bool = True,
) -> ArrayLike:
    r"""Unbiased max@k (expected best reward of k samples) of each group.

    Parameters
    ----------
    rewards, k, group_size, group_ids, validate
        As in :func:`max_at_k_weights`.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(G,)`` one value per group, ordered as in :func:`pass_at_k`.

    Notes
    -----
    :math:`\sum_i R_{(i)} \binom{i-1}{k-1} / \binom{n}{k}` over the ascending sort: the mean of
    ``max`` over all k-subsets. Ties need no special care.

    Examples
    --------
    >>> import numpy as np, rspo_kernels as rk
    >>> rk.max_at_k(np.array([3.0, 1.0, 2.0, 5.0]), k=2, group_size=4)  # (2 + 3*2 + 5*3) / 6
    array([3.83333333])
    """
    return _metric("max_at_k", rewards, k, group_size, group_ids, validate)


def maxrl_weights(
    rewards: ArrayLike,
    order: int | None = None,
    *,
    estimator: str = "rspo",
    group_size: int | None = None,
    group_ids: GroupIds | None = None,
    validate: bool = True,
) -> ArrayLike:
    r"""Per-response weights whose expectation is the gradient of MaxRL's truncated objective ``J_T``.

    Maximum-likelihood RL (Tajwar et al., arXiv 2602.02710) trains on ``log p(success)``, whose
    Maclaurin series gives ``grad log p = sum_{k>=1} (1/k) grad pass@k``; truncated at order ``T``
    it is ``J_T = sum_{k=1}^{T} (1/k) pass@k``.

    Parameters
    ----------
    rewards : numpy.ndarray or torch.Tensor
        Binary rewards (0 = wrong, 1 = correct), in any layout :func:`pass_at_k_weights` takes:
        ``(B, n)``, or ``(N,)`` with ``group_size`` or ``group_ids`` (ragged groups allowed).
    order : int, optional
        The truncation order ``T``, ``1 <= T <= n`` for every group; default: each group's size
        ``n`` (the highest order ``n`` samples can estimate without bias). ``T = 1`` is plain
        policy gradient on ``p``.
    estimator : {"rspo", "rloo", "maclaurin", "cross_fitted", "vr_cond"}, default "rspo"
        ``"rspo"``: ``sum_{k=1}^{T} (1/k)`` times RSPO's Pass@k weights, in closed form; unbiased,
        0 for wrong responses. ``"rloo"``: ``"rspo"`` with a leave-one-out baseline; unbiased.
        ``"maclaurin"``, ``"cross_fitted"``: the authors' released estimators (n times their
        advantages); unbiased. ``"vr_cond"``: the authors' ratio estimator, which has no order
        (``order`` must be None or n): unbiased for ``grad J_n``, biased for ``grad log p``.
    group_size, group_ids
        As in :func:`pass_at_k_weights`.
    validate : bool, default True
        Check that rewards are finite and binary (one device-to-host sync). Unchecked rewards
        are read as ``R != 0``.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        Weights with the shape, order and container of ``rewards``: float64 for float64 rewards,
        float32 otherwise. Scaled so that ``E[(1/n) sum_i w_i grad log pi(y_i)] = grad J_T``.

    Raises
    ------
    ValueError
        ``order`` larger than a group (pass@k for k > n has no unbiased estimator from n samples),
        ``order < 1``, graded rewards (use :func:`max_at_k_weights`), an unknown estimator,
        ``"vr_cond"`` with an order other than n, bad layout arguments.
    TypeError
        As in :func:`pass_at_k_weights`; ``order`` that is not an int.

    Notes
    -----
    A response is weighed through its reward ``R_i`` and the number ``c_i`` of correct
    responses among the ``n - 1`` others (docs/math.md § MaxRL). With
    :math:`d(c') = \sum_{k=1}^{T} \binom{n-1-c'}{k-1} / \binom{n-1}{k-1}
    = \frac{n}{c'+1} \Big(1 - \binom{n-1-c'}{T} / \binom{n}{T}\Big)`:

    - ``"rspo"``: :math:`w_i = d(c_i) R_i`, i.e. ``n pass@T / c`` for a correct response, with
      ``pass@T`` the group's unbiased pass@T (``n / c`` at ``T = n``);
    - ``"rloo"``: :math:`w_i = d(c_i) (R_i - c_i/(n-1))`;
    - ``"maclaurin"``: 1 for a correct response, :math:`1 - d(c_i)` for a wrong one;
    - ``"cross_fitted"``: ``"maclaurin"`` plus :math:`\sum_{k=2}^{\min(T, \lfloor n/2 \rfloor)}
      \binom{F_i}{k} / \binom{n-1}{k}` (``F_i`` wrong among the others);
    - ``"vr_cond"``: ``(n - c)/c`` for a correct response, -1 for a wrong one (``c`` correct in
      the group): ``"rspo"`` at ``T = n`` minus 1.

    References
    ----------
    F. Tajwar et al., "Maximum Likelihood Reinforcement Learning", arXiv 2602.02710, and the
    released ``verl/trainer/ppo/maclaurin.py`` (github.com/tajwarfahim/maxrl).

    Examples
    --------
    >>> import numpy as np, rspo_kernels as rk
    >>> rk.maxrl_weights(np.array([[1, 0, 0, 1]]))  # T = n = 4: n / c = 2 for correct responses
    array([[2., 0., 0., 2.]], dtype=float32)
    >>> rk.maxrl_weights(np.array([[1, 0, 0, 1]]), 2)  # 1 + (1/2) * 2 * C(2,1)/C(3,1) = 5/3
    array([[1.6666666, 0.       , 0.       , 1.6666666]], dtype=float32)
    """
    if not isinstance(estimator, str) or estimator not in MAXRL_ESTIMATORS:
        kind = ValueError if isinstance(estimator, str) else TypeError
        hint = " (Pass@k / Max@k estimators live in pass_at_k_weights)" if estimator in ESTIMATORS else ""
        raise kind(
            f"unknown MaxRL estimator {estimator!r}{hint}; choose one of {', '.join(map(repr, MAXRL_ESTIMATORS))}"
        )
    if order is not None:
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)):
            raise TypeError(f"order must be an int or None, got {type(order).__name__} ({order!r})")
        if order < 1:
            raise ValueError(f"order must be >= 1, got order={order}; it is the truncation order T of MaxRL's series")
        order = int(order)
    groups, restore, _ = _prepare(rewards, 1, group_size, group_ids, "maxrl", "rspo")  # "maxrl": its own messages
    _check_order(groups, restore, order, estimator)
    out = check.output_dtype(rewards)
    if groups.values.numel() == 0:
        return restore.per_sample(groups.values.to(out, copy=True))
    if validate:
        try:
            check.check_values(groups, restore, "pass@k")
        except ValueError as exc:
            raise ValueError(
                f"{exc} [maxrl_weights trains log p(success) and needs binary rewards; for graded rewards "
                "use max_at_k_weights (Max@k)]"
            ) from None
    return restore.per_sample(grouped_maxrl_weights(groups, order, estimator).to(out))


def _check_order(groups: Groups, restore: Restore, order: int | None, estimator: str) -> None:
    """``order <= n`` for every group; ``"vr_cond"`` only at ``order = n`` (host-side sizes, no sync)."""
    sizes = groups.sizes
    if order is None:
        return
    if sizes.size == 0:  # no group, but the layout states their size: (0, n), or group_size=n
        n = groups.group_size
        if n is None and len(restore.shape) == 2:
            n = restore.shape[-1]
        if n is not None and n < order:
            raise ValueError(
                f"rewards of shape {tuple(restore.shape)} have groups of {n} samples but order={order}; MaxRL's "
                f"J_T needs n >= T (as pass_at_k_weights needs n >= k): pass groups of at least {order} samples"
            )
        return
    hits = np.flatnonzero(sizes < order)
    if hits.size:
        g = int(hits[0])
        raise ValueError(
            f"{restore.describe_group(g)} has {sizes[g]} samples but order={order}; MaxRL's J_T sums pass@k for "
            f"k <= T, and pass@k for k > n has no unbiased estimator from n samples: lower order (at most n) or "
            "sample more responses"
        )
    hits = np.flatnonzero(sizes != order) if estimator == "vr_cond" else hits
    if hits.size:
        g = int(hits[0])
        raise ValueError(
            f"the 'vr_cond' estimator has no truncation order (it estimates J_n, n the group size), but order={order} "
            f"and {restore.describe_group(g)} has {sizes[g]} samples: pass order=None"
        )


def risk_sensitive_weights(
    rewards: ArrayLike,
    beta: float,
    *,
    group_size: int | None = None,
    group_ids: GroupIds | None = None,
    validate: bool = True,
) -> ArrayLike:
    r"""RS-GRPO's risk-sensitive advantage (Jiang et al., arXiv 2509.24261), centred in every group.

    Parameters
    ----------
    rewards : numpy.ndarray or torch.Tensor
        Real rewards (bool, integer or float; ties allowed), in any layout
        :func:`max_at_k_weights` takes: ``(B, n)``, or ``(N,)`` with ``group_size`` or ``group_ids``.
    beta : float
        The risk parameter, finite. ``beta > 0`` is risk-seeking (the objective moves from the
        mean reward towards the best one as beta grows), ``beta < 0`` risk-averse, and
        ``beta = 0`` is the limit ``beta -> 0``: ``A_i = R_i - mean R``.
    group_size, group_ids
        As in :func:`pass_at_k_weights`.
    validate : bool, default True
        Check that the rewards are finite (one device-to-host sync).

    Returns
    -------
    numpy.ndarray or torch.Tensor
        Advantages with the shape, order and container of ``rewards``: float64 for float64
        rewards, float32 otherwise. Every group's advantages sum to 0.

    Raises
    ------
    ValueError
        Non-finite rewards, a non-finite ``beta``, bad layout arguments.
    TypeError
        As in :func:`pass_at_k_weights`; ``beta`` that is not a real number.

    Notes
    -----
    With :math:`S = \frac1\beta \log \frac1n \sum_j e^{\beta R_j}`,

    .. math:: A_i = \frac{e^{\beta (R_i - S)} - 1}{\beta} = \frac{n\, \mathrm{softmax}(\beta R)_i - 1}{\beta}.

    The objective is :math:`J_\beta = \frac1\beta \log E[e^{\beta R}]`, whose gradient is
    :math:`E[\frac{e^{\beta (R - J_\beta)} - 1}{\beta} \nabla \log \pi]`; plugging in the
    group's own estimate S makes the weights **biased** for :math:`\nabla J_\beta` (and no
    unbiased n-sample estimator exists for binary rewards). On this library's scale,
    :math:`E[\frac1n \sum_i A_i \nabla \log\pi(y_i)] = \alpha \nabla J_\beta` for a binary
    reward; the exact factor :math:`\alpha` is tabulated in docs/math.md (benchmarks/risk_sensitive_bias.py).
    Matches the released ``compute_rs_grpo_advantage`` (github.com/Jackory/RS-GRPO), ``beta = 0``
    included, except for a group of one response: the definition gives ``S = R`` and ``A = 0``, where
    the released code sets ``S = 0``.
    Evaluated with ``log1p`` / ``expm1`` around the group's max (min for ``beta < 0``), so nothing
    overflows for any finite beta, and with the second-order expansion
    :math:`A_i = x_i + \frac\beta2 (x_i^2 - \overline{x^2})`, :math:`x = R - \bar R`, where
    :math:`|\beta| (\max R - \min R) < 10^{-8}` (exact to float64 there).

    Examples
    --------
    >>> import numpy as np, rspo_kernels as rk
    >>> rk.risk_sensitive_weights(np.array([[0.0, 0.0, 0.0, 1.0]]), beta=np.log(3.0))  # (4 softmax - 1) / beta
    array([[-0.30341308, -0.30341308, -0.30341308,  0.91023923]])
    """
    beta = check.check_beta(beta)
    values, container = check.as_reward_tensor(rewards)
    check.check_layout_args(values, group_size, group_ids, 1, "max@k")
    groups, restore = to_groups(
        values, shape=values.shape, container=container, group_size=group_size, group_ids=group_ids
    )
    check.check_group_sizes(groups, restore, 1, "max@k", "rspo")
    out = check.output_dtype(rewards)
    if validate:
        check.check_integer_range(rewards)
    if groups.values.numel() == 0:
        return restore.per_sample(groups.values.to(out, copy=True))
    if validate:
        check.check_values(groups, restore, "max@k")
    _, fn = implementation("risk_sensitive_weights", groups.values.device.type)
    return restore.per_sample(fn(groups, beta).to(out))
