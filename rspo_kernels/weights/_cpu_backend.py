"""The C++ CPU backend: :class:`~rspo_kernels.weights._layout.Groups` in, tensors out, via ``rspo_kernels._cpu``.

The kernels (``csrc/``) read the grouped rewards and write the result through zero-copy numpy views
of torch tensors, in float32 or float64 like the input, with all arithmetic in float64. Inputs are
assumed validated by the public API; the kernels still reject impossible shapes with ValueError.

Threads and fork: large batches run on OpenMP threads (``OMP_NUM_THREADS`` caps them). A process
forked after its parent ran a parallel kernel (multiprocessing's default ``fork`` start method on
Linux, DataLoader workers) cannot use the parent's OpenMP workers, so, as torch does, an at-fork
handler makes every forked child single-threaded in these kernels; results are identical (the
kernels are bitwise deterministic across thread counts). A child that needs several threads should
be started with the ``spawn`` or ``forkserver`` method.

The extension is optional (``setup.py`` installs without it when no C++17 compiler is found).
Importing this module then raises ``ModuleNotFoundError`` named ``rspo_kernels._cpu``, which
:mod:`rspo_kernels._dispatch` reads as "not built" (``import rspo_kernels`` has already warned,
once) rather than as a broken backend.
"""

from __future__ import annotations

import importlib.util

import torch

try:
    import rspo_kernels._cpu as _cpu
except ImportError:
    if importlib.util.find_spec("rspo_kernels._cpu") is not None:
        raise  # built, but broken (e.g. a torch/ABI mismatch): let the dispatcher report the real error
    raise ModuleNotFoundError("the C++ extension rspo_kernels._cpu is not built", name="rspo_kernels._cpu") from None

from rspo_kernels.weights._layout import Groups, InvalidRewardError

__all__ = ["grouped_weights", "grouped_pass_at_k", "grouped_max_at_k", "first_invalid"]


def _arrays(groups: Groups):
    # Groups guarantees contiguous CPU tensors; the extension re-checks and raises ValueError if not.
    values = groups.values
    if values.requires_grad:
        values = values.detach()
    if values.device.type != "cpu":
        raise ValueError(f"the C++ backend needs CPU tensors, got {values.device}")
    return values, values.numpy(), groups.offsets.numpy()


def grouped_weights(groups: Groups, k: int, objective: str, estimator: str, *, validate: bool = False) -> torch.Tensor:
    """``(N,)`` weights of ``estimator`` for ``objective`` in the grouped order, dtype of the values.

    With ``validate``, the kernel also checks the rewards (finite; exactly 0 or 1 for Pass@k, in
    the same read that counts them) and raises :class:`~rspo_kernels.weights._layout.InvalidRewardError`
    at the first bad one.
    """
    values, v, offsets = _arrays(groups)
    out = torch.empty_like(values)
    bad = _cpu.weights(v, offsets, int(k), objective, estimator, out.numpy(), bool(validate))
    if bad >= 0:
        raise InvalidRewardError(bad)
    return out


def grouped_pass_at_k(groups: Groups, k: int) -> torch.Tensor:
    """``(G,)`` unbiased pass@k of each group of binary rewards."""
    values, v, offsets = _arrays(groups)
    out = torch.empty(groups.num_groups, dtype=values.dtype)
    _cpu.pass_at_k(v, offsets, int(k), out.numpy())
    return out


def grouped_max_at_k(groups: Groups, k: int) -> torch.Tensor:
    """``(G,)`` unbiased max@k of each group."""
    values, v, offsets = _arrays(groups)
    out = torch.empty(groups.num_groups, dtype=values.dtype)
    _cpu.max_at_k(v, offsets, int(k), out.numpy())
    return out


def first_invalid(values: torch.Tensor, binary: bool) -> int:
    """Index of the first non-finite (or, with ``binary``, non-0/1) value, or -1; one pass."""
    return int(_cpu.first_invalid(values.detach().numpy(), bool(binary)))
