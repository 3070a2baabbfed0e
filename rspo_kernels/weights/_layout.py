"""The one canonical layout every backend sees: rewards ordered by group, plus group offsets.

Users hand us rewards as a 2-D ``(B, n)`` array, as a flat ``(N,)`` array with ``group_size``, or
as a flat array with arbitrary (possibly non-contiguous, ragged) ``group_ids``. :func:`to_groups`
turns every one of those into a :class:`Groups` (values stored group after group, each group in
its original order) and a :class:`Restore` that maps per-sample results back to the caller's
shape, order and container. Backends take only :class:`Groups`.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "Groups",
    "Restore",
    "InvalidRewardError",
    "to_groups",
    "group_labels_to_codes",
    "sort_within_groups",
]


class InvalidRewardError(ValueError):
    """Raised by a backend that validates rewards while it computes (the C++ Pass@k count).

    The public API turns it into the message that names the group, the value and the fix.

    Attributes
    ----------
    position : int
        Grouped index (into ``Groups.values``) of the first invalid reward.
    """

    def __init__(self, position: int):
        super().__init__(f"invalid reward at grouped position {position}")
        self.position = int(position)


@dataclass(frozen=True)
class Groups:
    """Rewards of G groups stored contiguously.

    Attributes
    ----------
    values : torch.Tensor
        ``(N,)`` float32 or float64, contiguous. Group ``g`` occupies
        ``values[offsets[g]:offsets[g + 1]]`` in the order the caller gave its members.
    offsets : torch.Tensor
        ``(G + 1,)`` int64 on the same device, ``offsets[0] == 0`` and ``offsets[-1] == N``.
    group_size : int or None
        The common size when every group has the same size (the dense fast path), else None.
    sizes : numpy.ndarray
        ``(G,)`` int64 group sizes on the host (used for validation and error messages).
    """

    values: torch.Tensor
    offsets: torch.Tensor
    group_size: int | None
    sizes: np.ndarray

    @property
    def num_groups(self) -> int:
        return int(self.sizes.shape[0])

    def segment_ids(self) -> torch.Tensor:
        """``(N,)`` int64 index of the group each value belongs to."""
        device = self.values.device
        if self.group_size is not None:
            return torch.arange(self.values.numel(), device=device) // self.group_size
        sizes = torch.as_tensor(self.sizes, device=device)
        # output_size avoids a device-to-host sync on CUDA
        return torch.repeat_interleave(
            torch.arange(self.num_groups, device=device), sizes, output_size=self.values.numel()
        )

    def with_values(self, values: torch.Tensor) -> Groups:
        return Groups(values.contiguous(), self.offsets, self.group_size, self.sizes)


@dataclass(frozen=True)
class Restore:
    """How to hand per-sample and per-group results back to the caller.

    Attributes
    ----------
    perm : torch.Tensor or None
        ``(N,)`` int64; grouped position ``p`` came from flat input position ``perm[p]``.
        None when the grouped order already is the input order.
    shape : tuple of int
        Shape of the caller's rewards.
    container : {"numpy", "torch"}
        Container of the caller's rewards.
    labels : list or None
        The ``group_ids`` label of each group in order of first appearance (error messages).
    """

    perm: torch.Tensor | None
    shape: tuple[int, ...]
    container: str
    labels: list | None

    def per_sample(self, grouped: torch.Tensor) -> Any:
        """Undo the grouping of a ``(N,)`` result and convert to the caller's container."""
        if self.perm is None:
            out = grouped
        else:
            out = torch.empty_like(grouped)
            out[self.perm] = grouped
        return self._to_container(out.reshape(self.shape))

    def per_group(self, result: torch.Tensor) -> Any:
        """Convert a ``(G,)`` per-group result to the caller's container."""
        return self._to_container(result)

    def _to_container(self, t: torch.Tensor) -> Any:
        return t.numpy() if self.container == "numpy" else t

    def describe_group(self, g: int) -> str:
        """Name group ``g`` the way the caller knows it."""
        if self.labels is not None:
            return f"group {g} (group_id {self.labels[g]!r})"
        return f"group {g}"


def group_labels_to_codes(group_ids: Any, n: int) -> tuple[torch.Tensor, list]:
    """Map arbitrary hashable labels to int64 codes numbered by first appearance.

    Parameters
    ----------
    group_ids : array-like of length ``n``
        Integers, strings (e.g. verl's uid array) or any hashable labels.
    n : int
        Expected length.

    Returns
    -------
    codes : torch.Tensor
        ``(n,)`` int64 on the CPU; the first label seen gets 0, the next new one 1, ...
    labels : list
        The distinct labels in order of first appearance.
    """
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex:
            raise TypeError(
                f"group_ids must hold integers or hashable labels, not floats: got a {group_ids.dtype} tensor; "
                "cast it, e.g. group_ids.long()"
            )
        arr = group_ids.detach().cpu().numpy()
    elif isinstance(group_ids, np.ndarray):
        arr = group_ids
        if arr.dtype.kind in "iub" and not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))  # torch reads native byte order only
        if arr.dtype.kind == "O" and arr.ndim == 1:
            _check_label_types(arr.tolist())
    else:
        # Python sequences: numpy would turn [2, "2"] into two equal strings, tuples into rows,
        # and [1, True] into [1, 1], so the labels' types are checked first, and only all-integer
        # sequences take the vectorised path.
        items = list(group_ids)
        _check_label_types(items)
        vectorised: np.ndarray | None
        try:
            vectorised = np.asarray(items)
        except ValueError:
            vectorised = None
        if vectorised is None or vectorised.dtype.kind not in "iub" or vectorised.ndim != 1:
            arr = np.empty(len(items), dtype=object)
            arr[:] = items
        else:
            arr = vectorised
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(
            f"group_ids has shape {tuple(arr.shape)} but rewards have {n} samples; "
            f"pass one group id per reward (a 1-D sequence of length {n})"
        )
    if n == 0:
        return torch.zeros(0, dtype=torch.int64), []
    if arr.dtype.kind in "iub":
        # A copy (as .to(int64) made for narrower types): torch warns on a read-only buffer (a broadcast view).
        return _integer_codes(torch.from_numpy(np.array(arr, dtype=np.int64)))
    if arr.dtype.kind in "UST":
        uniq, first, inverse = np.unique(arr, return_index=True, return_inverse=True)
        # np.unique numbers labels by sort order; renumber them by first appearance.
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.shape[0])
        codes = rank[inverse.reshape(-1)]
        labels = [x.item() if hasattr(x, "item") else x for x in uniq[order]]
    else:
        if arr.dtype.kind in "fc":
            raise TypeError(
                f"group_ids must hold integers or hashable labels, not floats: got {arr.dtype} values; "
                "cast them, e.g. group_ids.astype(int)"
            )
        # Mixed or arbitrary Python objects: one dict pass (labels are on the host anyway).
        index: dict[Hashable, int] = {}
        try:
            codes = np.fromiter((index.setdefault(x, len(index)) for x in arr.tolist()), np.int64, n)
        except TypeError as exc:
            raise TypeError(f"group_ids must be hashable labels: {exc}") from None
        labels = list(index)
    return torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int64)), labels


def _check_label_types(items: list) -> None:
    """Reject labels that Python would silently merge: ``1 == 1.0 == True`` hash alike.

    Float labels are refused in every container (a float id is nearly always a cast by mistake,
    and 1.0 would join group 1); bools are refused beside other labels (True would join 1).
    """
    kinds = set(map(type, items))
    floats = [t for t in kinds if issubclass(t, (float, np.floating, complex, np.complexfloating))]
    bools = [t for t in kinds if issubclass(t, (bool, np.bool_))]
    if floats:
        i = next(i for i, x in enumerate(items) if type(x) in floats)
        raise TypeError(
            f"group_ids must hold integers or hashable labels, not floats: got {items[i]!r} at input index {i} "
            "(Python treats 1.0 and 1 as one label); cast them to int or str"
        )
    if bools and len(kinds) > len(bools):
        i = next(i for i, x in enumerate(items) if type(x) in bools)
        raise TypeError(
            f"group_ids mix bools with other labels: got {items[i]!r} at input index {i}, and Python treats "
            "True as 1 and False as 0, so they would join those groups; use one kind of label (e.g. str)"
        )


def _uniform_layout(num_groups: int, size: int, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """Offsets (on ``device``) and host sizes of ``num_groups`` groups of ``size``.

    Off the CPU the offsets are built on the device (no host-to-device copy inside a training
    step). On the CPU both are cached per shape (no backend writes them; the sizes are marked
    read-only): a training loop sees the same few shapes, and rebuilding 16k offsets per call
    costs a third of a validated Pass@k call at B=16384, n=64.
    """
    if device.type == "cpu":
        return _cpu_uniform_layout(num_groups, size)
    offsets = torch.arange(0, (num_groups + 1) * size, size, dtype=torch.int64, device=device)
    return offsets, np.full(num_groups, size, dtype=np.int64)


@functools.lru_cache(maxsize=16)
def _cpu_uniform_layout(num_groups: int, size: int) -> tuple[torch.Tensor, np.ndarray]:
    offsets = torch.from_numpy(np.arange(0, (num_groups + 1) * size, size, dtype=np.int64))
    sizes = np.full(num_groups, size, dtype=np.int64)
    sizes.flags.writeable = False
    return offsets, sizes


def _integer_codes(labels: torch.Tensor) -> tuple[torch.Tensor, list]:
    """First-appearance codes of integer labels: one sort (``torch.unique``) and one scatter."""
    n = labels.shape[0]
    uniq, inverse = torch.unique(labels, return_inverse=True)
    first = torch.full((uniq.numel(),), n, dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(n), "amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank[inverse], uniq[order].tolist()


def _offsets_from_sizes(sizes: np.ndarray, device: torch.device) -> torch.Tensor:
    offsets = np.zeros(sizes.shape[0] + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return torch.from_numpy(offsets).to(device)


def to_groups(
    values: torch.Tensor,
    *,
    shape: Sequence[int],
    container: str,
    group_size: int | None,
    group_ids: Any,
) -> tuple[Groups, Restore]:
    """Normalise a validated reward tensor and its layout arguments into :class:`Groups`.

    Parameters
    ----------
    values : torch.Tensor
        ``(B, n)`` or ``(N,)`` rewards already converted to the compute dtype.
    shape, container
        The caller's shape and container, kept for :class:`Restore`.
    group_size, group_ids
        The caller's layout arguments for 1-D input, checked by the public API.

    Returns
    -------
    groups : Groups
    restore : Restore
    """
    shape = tuple(int(s) for s in shape)
    device = values.device
    if values.dim() == 2:
        b, n = values.shape
        offsets, sizes = _uniform_layout(b, n, device)
        groups = Groups(values.reshape(-1).contiguous(), offsets, n, sizes)
        return groups, Restore(None, shape, container, None)
    flat = values.reshape(-1)
    n_total = flat.shape[0]
    if group_size is not None:
        offsets, sizes = _uniform_layout(n_total // group_size, group_size, device)
        groups = Groups(flat.contiguous(), offsets, group_size, sizes)
        return groups, Restore(None, shape, container, None)
    codes, labels = group_labels_to_codes(group_ids, n_total)
    sizes = np.bincount(codes.numpy(), minlength=len(labels)).astype(np.int64)
    # One stable sort by group code keeps each group's members in their original order.
    perm = torch.sort(codes, stable=True).indices
    identity = bool(torch.equal(perm, torch.arange(n_total)))
    perm_dev = None if identity else perm.to(device)
    grouped = flat if identity else flat[perm_dev]
    uniform = int(sizes[0]) if sizes.size and bool((sizes == sizes[0]).all()) else None
    groups = Groups(grouped.contiguous(), _offsets_from_sizes(sizes, device), uniform, sizes)
    return groups, Restore(perm_dev, shape, container, labels)


def sort_within_groups(groups: Groups, values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each group ascending (stable), keeping groups in place.

    Parameters
    ----------
    groups : Groups
    values : torch.Tensor, optional
        ``(N,)`` values to sort instead of ``groups.values`` (e.g. a float64 copy).

    Returns
    -------
    sorted_values : torch.Tensor
        ``(N,)``; slots ``offsets[g]:offsets[g+1]`` hold group g ascending.
    order : torch.Tensor
        ``(N,)`` int64; sorted slot ``s`` holds the grouped value ``order[s]``.
    """
    values = groups.values if values is None else values
    n_total = values.numel()
    if groups.group_size is not None and n_total:
        v, idx = torch.sort(values.view(-1, groups.group_size), dim=1, stable=True)
        base = torch.arange(0, n_total, groups.group_size, device=values.device).unsqueeze(1)
        return v.reshape(-1), (idx + base).reshape(-1)
    # One segmented sort: by value, then stably by group, so each group ends up sorted in place.
    by_value = torch.sort(values, stable=True).indices
    by_group = torch.sort(groups.segment_ids()[by_value], stable=True).indices
    order = by_value[by_group]
    return values[order], order
