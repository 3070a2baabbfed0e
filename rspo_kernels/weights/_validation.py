"""Input checking at the public boundary: containers, dtypes, layouts and reward values.

Everything a backend may assume is established here, once. Messages name the offending group,
the value, and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from rspo_kernels._dispatch import implementation
from rspo_kernels.weights._layout import Groups, Restore
from rspo_kernels.weights.estimators import BINARY_ONLY_ESTIMATORS, ESTIMATORS

__all__ = [
    "as_reward_tensor",
    "output_dtype",
    "check_integer_range",
    "check_k",
    "check_beta",
    "check_estimator",
    "check_layout_args",
    "check_group_sizes",
    "check_values",
    "raise_invalid_value",
]

_TORCH_OK = {
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
}
_NUMPY_KINDS_OK = "biuf"  # bool, signed, unsigned, float (float16/32/64)


def output_dtype(rewards: Any) -> torch.dtype:
    """The dtype of the weights and metrics returned for ``rewards``: float64 for float64, else float32."""
    dtype = getattr(rewards, "dtype", None)
    if isinstance(dtype, np.dtype):  # any byte order
        return torch.float64 if dtype.kind == "f" and dtype.itemsize == 8 else torch.float32
    return torch.float64 if dtype == torch.float64 else torch.float32


_EXACT_IN_FLOAT64 = 2**53


def check_integer_range(rewards: Any) -> None:
    """64-bit integer rewards must lie within ``+-2**53``, where float64 (the compute dtype) is exact.

    Reads the values (one host sync), so it runs with ``validate=True`` only.
    """
    dtype = getattr(rewards, "dtype", None)
    wide = (isinstance(dtype, np.dtype) and dtype.kind in "iu" and dtype.itemsize == 8) or dtype in (
        torch.int64,
        torch.uint64,
    )
    if not wide:
        return
    r = np.asarray(rewards).reshape(-1) if isinstance(rewards, np.ndarray) else rewards.detach().reshape(-1)
    bad = (r > _EXACT_IN_FLOAT64) | (r < -_EXACT_IN_FLOAT64)
    if bool(bad.any()):
        i = int(np.flatnonzero(bad)[0]) if isinstance(bad, np.ndarray) else int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"rewards hold an integer beyond +-2**53 ({int(r[i])} at flat position {i}), which float64 cannot "
            "represent exactly: rescale the rewards (e.g. subtract a per-prompt baseline) or pass float64 rewards"
        )


def as_reward_tensor(rewards: Any) -> tuple[torch.Tensor, str]:
    """Convert numpy/torch rewards to a detached torch tensor in the compute dtype.

    Returns
    -------
    values : torch.Tensor
        float64 for float64 input and for integers wider than 16 bits (float32 holds integers
        exactly only up to 2**24; float64 up to 2**53), float32 for every other supported dtype;
        same device. :func:`output_dtype` gives the dtype of the results.
    container : {"numpy", "torch"}
    """
    if isinstance(rewards, torch.Tensor):
        if rewards.layout != torch.strided:
            raise TypeError(
                f"rewards is a {rewards.layout} tensor; only dense tensors are supported: pass rewards.to_dense()"
            )
        if rewards.dtype not in _TORCH_OK:
            raise TypeError(
                f"rewards have unsupported dtype {rewards.dtype}; use bool, an integer type, "
                "float16, bfloat16, float32 or float64"
            )
        t, container = rewards.detach(), "torch"
    elif isinstance(rewards, np.ndarray):
        if isinstance(rewards, np.ma.MaskedArray):
            if np.ma.getmaskarray(rewards).any():
                raise TypeError(
                    "rewards is a masked array with masked entries, and masks are not supported: drop them "
                    "(rewards.compressed(), with matching group_ids) or fill them (rewards.filled(value))"
                )
            rewards = rewards.data  # nothing is masked: the data is the rewards
        if rewards.dtype.kind not in _NUMPY_KINDS_OK or rewards.dtype.itemsize > 8:
            raise TypeError(
                f"rewards have unsupported dtype {rewards.dtype}; use bool, an integer type, "
                "float16, float32 or float64"
            )
        # torch reads native byte order only; a big-endian array is converted (one copy).
        native = np.ascontiguousarray(rewards.astype(rewards.dtype.newbyteorder("="), copy=False))
        if not native.flags.writeable:  # torch warns on a read-only buffer (a broadcast view, a memmap): copy it
            native = native.copy()
        t, container = torch.from_numpy(native), "numpy"
    else:
        raise TypeError(
            f"rewards must be a numpy.ndarray or a torch.Tensor, got {type(rewards).__name__}; "
            "wrap Python sequences with numpy.asarray(...)"
        )
    if t.dim() not in (1, 2):
        raise ValueError(
            f"rewards must be 2-D (groups, samples) or 1-D with group_size/group_ids, got shape {tuple(t.shape)}"
        )
    wide_int = not t.dtype.is_floating_point and t.dtype != torch.bool and t.element_size() > 2
    dtype = torch.float64 if t.dtype == torch.float64 or wide_int else torch.float32
    return t.to(dtype), container


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__} ({k!r})")
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}; k is the number of samples the metric draws")
    return int(k)


def check_beta(beta: Any) -> float:
    """RS-GRPO's risk parameter: a finite real number (0 means the limit ``beta -> 0``)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)):
        raise TypeError(f"beta must be a real number (int or float), got {type(beta).__name__} ({beta!r})")
    value = float(beta)
    if not np.isfinite(value):
        raise ValueError(
            f"beta must be finite, got beta={beta!r}; beta > 0 is risk-seeking (towards max@n), beta < 0 risk-averse, "
            "and beta = 0 the mean-reward limit"
        )
    return value


_CHOICES = ", ".join(map(repr, ESTIMATORS))


def check_estimator(estimator: Any, objective: str) -> None:
    """A known estimator name that is defined for ``objective``."""
    if not isinstance(estimator, str):
        raise TypeError(f"estimator must be a string, got {estimator!r}; choose one of {_CHOICES} (default 'rspo')")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {_CHOICES}")
    if objective == "max@k" and estimator in BINARY_ONLY_ESTIMATORS:
        raise ValueError(
            f"the {estimator!r} estimator is defined for binary Pass@k rewards only: use pass_at_k_weights "
            "with 0/1 rewards, or another estimator (e.g. 'rspo') for Max@k and graded rewards"
        )


def _terms(objective: str, k: int) -> tuple[str, str, str]:
    """How the messages name the objective, the sample-size requirement and the parameter.

    ``"maxrl"`` (:func:`rspo_kernels.maxrl_weights`) passes k=1: its order T is checked on its own.
    """
    if objective == "maxrl":
        return "MaxRL (maxrl_weights)", "T", "order T >= 1"
    return ("Pass@k" if objective == "pass@k" else "Max@k"), "k", f"k={k}"


def check_layout_args(values: torch.Tensor, group_size: Any, group_ids: Any, k: int, objective: str) -> None:
    """Check that the layout arguments fit the rewards' shape (no data access, no sync).

    Empty rewards still state their group size (the row length, or ``group_size``), and that size
    must admit k: ``(0, 4)`` rewards with k=10 are as wrong as ``(1, 4)`` ones, and ``(B, 0)``
    rewards are B groups with no samples.
    """
    name, param, given = _terms(objective, k)
    if values.dim() == 2:
        if group_size is not None or group_ids is not None:
            raise ValueError(
                "2-D rewards already give one group per row; drop group_size/group_ids "
                "or pass the rewards flattened to 1-D"
            )
        n = values.shape[1]
        if values.numel() == 0 and n < k:
            raise ValueError(
                f"rewards of shape {tuple(values.shape)} have groups (rows) of {n} samples but {given}; "
                f"{name} needs n >= {param}: pass rewards of shape (groups, n) with n >= {param}"
            )
        return
    if (group_size is None) == (group_ids is None):
        raise ValueError(
            "1-D rewards need exactly one of group_size (contiguous groups of equal size) or "
            "group_ids (one label per reward); got " + ("both" if group_size is not None else "neither")
        )
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
            raise TypeError(f"group_size must be an int, got {type(group_size).__name__} ({group_size!r})")
        n_total = values.shape[0]
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if n_total % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the {n_total} rewards "
                f"({n_total} = {n_total // group_size} * {group_size} + {n_total % group_size}); "
                "pass group_ids for groups of different sizes"
            )
        if n_total == 0 and group_size < k:
            raise ValueError(
                f"group_size={group_size} but {given}; {name} needs n >= {param}: "
                f"sample more responses or lower {param}"
            )


def check_group_sizes(groups: Groups, restore: Restore, k: int, objective: str, estimator: str) -> None:
    """Check k against every group's size (host-side sizes: no sync)."""
    sizes = groups.sizes
    if sizes.size == 0:
        return

    def first(bad: Callable[[Any], Any]) -> int:
        """First group whose size is ``bad``, or -1; equal sizes are one Python comparison."""
        if groups.group_size is not None:
            return 0 if bad(groups.group_size) else -1
        hits = np.flatnonzero(bad(sizes))
        return int(hits[0]) if hits.size else -1

    name, param, given = _terms(objective, k)
    g = first(lambda n: n < k)
    if g >= 0:
        raise ValueError(
            f"{restore.describe_group(g)} has {sizes[g]} samples but {given}; {name} needs n >= {param} "
            f"(no unbiased estimator exists for n < {param}): sample more responses or lower {param}"
        )
    g = first(lambda n: n <= k) if estimator == "pkpo_loo" else -1
    if g >= 0:
        raise ValueError(
            f"{restore.describe_group(g)} has {sizes[g]} samples but k={k}; the 'pkpo_loo' "
            "estimator needs n > k (its baseline uses k of the other n-1 samples): lower k or use 'rspo'"
        )
    g = first(lambda n: n <= k) if estimator == "ordergrad" else -1
    if g >= 0:
        raise ValueError(
            f"{restore.describe_group(g)} has {sizes[g]} samples but k={k}; the 'ordergrad' estimator needs "
            f"k <= n-1 (its baseline is the max@k of the n-1 others): lower k to at most {sizes[g] - 1} or use 'rspo'"
        )
    g = first(lambda n: n % k != 0) if estimator == "hitchhiking" else -1
    if g >= 0:
        raise ValueError(
            f"{restore.describe_group(g)} has {sizes[g]} samples, not a multiple of k={k}; the "
            "'hitchhiking' estimator splits each group into blocks of k: use a multiple of k samples"
        )


def _locate(groups: Groups, restore: Restore, p: int) -> tuple[int, int, str]:
    """Group, position within the group, and input index of grouped position ``p``."""
    g = int(np.searchsorted(np.cumsum(groups.sizes), p, side="right"))
    pos = p - int(groups.sizes[:g].sum())
    flat = int(restore.perm[p]) if restore.perm is not None else p
    if len(restore.shape) == 1:
        return g, pos, f"input index {flat}"
    return g, pos, f"input index {tuple(int(i) for i in np.unravel_index(flat, restore.shape))}"


def first_invalid(values: torch.Tensor, binary: bool) -> int:
    """Index of the first non-finite (or, with ``binary``, non-0/1) value, or -1. One host sync.

    The plain-torch implementation; the dispatcher may serve a faster one (C++ on CPU).
    """
    valid = (values == 0) | (values == 1) if binary else torch.isfinite(values)
    if bool(valid.all()):
        return -1
    return int(torch.nonzero(~valid)[0, 0])


def check_values(groups: Groups, restore: Restore, objective: str | None) -> None:
    """Finite rewards everywhere; binary rewards for Pass@k. Needs one host sync."""
    v = groups.values
    if v.numel() == 0:
        return
    # Binary rewards are finite, so Pass@k needs a single test.
    _, find = implementation("first_invalid", v.device.type)
    p = find(v, objective == "pass@k")
    if p >= 0:
        raise_invalid_value(groups, restore, p)


def raise_invalid_value(groups: Groups, restore: Restore, p: int) -> None:
    """Raise the ValueError for the invalid reward at grouped position ``p`` (group, value, fix)."""
    v = groups.values
    g, pos, where = _locate(groups, restore, p)
    value = float(v[p])
    if not np.isfinite(value):
        raise ValueError(
            f"{restore.describe_group(g)} has a non-finite reward ({value}) at position {pos} "
            f"({where}); rewards must be finite: replace it (e.g. with the lowest reward) or drop the group"
        )
    raise ValueError(
        f"{restore.describe_group(g)} has reward {value!r} at position {pos} ({where}); "
        "Pass@k needs rewards in {0, 1}: threshold them, or use max_at_k_weights / max_at_k for graded rewards"
    )
