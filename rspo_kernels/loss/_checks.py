"""Input validation of the loss API, once, at the public boundary.

Checks never read tensor values from a GPU (no host synchronisation in a training step) and skip
value checks while ``torch.compile`` traces (``fullgraph=True`` must not break on an ``int()``).
Every message names the argument and the fix.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

__all__ = [
    "check_logits",
    "check_ids",
    "check_token_tensor",
    "check_weights",
    "WEIGHTS_PER",
    "check_cu_seqlens",
    "check_ids_in_range",
    "check_inplace",
    "check_flag",
    "check_block_size",
    "reads_values",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def reads_values(x: torch.Tensor) -> bool:
    """Whether a check may read ``x``'s values: CPU tensors outside ``torch.compile`` tracing."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def check_logits(name: str, logits: Any, *, packed_ok: bool = True) -> None:
    """``logits`` (or hidden states) is a float tensor, ``(B, T, D)`` or, when ``packed_ok``, ``(N, D)``."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    ok = (2, 3) if packed_ok else (3,)
    if logits.dim() not in ok:
        want = "(B, T, D) padded or (N, D) packed" if packed_ok else "(B, T, D)"
        raise ValueError(f"{name} must be {want}, got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty last dimension")


def check_ids(target_ids: Any, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(target_ids, torch.Tensor):
        raise TypeError(f"target_ids must be a torch.Tensor, got {type(target_ids).__name__}")
    if target_ids.dtype.is_floating_point or target_ids.dtype == torch.bool or target_ids.is_complex():
        raise TypeError(f"target_ids must be an integer tensor, got {target_ids.dtype}; use target_ids.long()")
    if tuple(target_ids.shape) != shape:
        raise ValueError(
            f"target_ids must have shape {shape} (the logits' leading dims), got {tuple(target_ids.shape)}"
        )
    if target_ids.device != device:
        raise ValueError(f"target_ids is on {target_ids.device} but logits is on {device}; move them together")


def check_token_tensor(name: str, x: Any, shape: tuple[int, ...], device: torch.device, *, floating: bool) -> None:
    """A per-token tensor (mask, old/ref log-probs) of the logits' leading shape."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (one value per token), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but logits is on {device}; move it with .to(logits.device)")
    if floating and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}; convert it with .float()")


WEIGHTS_PER = ("sequence", "token")


def check_weights(
    weights: Any,
    token_shape: tuple[int, ...],
    n_seqs: int | None,
    device: torch.device,
    weights_per: Any = None,
) -> None:
    """Weights per response / sequence, or per token.

    Padded: ``(B,)`` or ``(B, T)``. Packed: ``(N,)`` per token or ``(S,)`` per sequence (with
    ``cu_seqlens``; ``n_seqs = S``). ``weights_per`` (``"sequence"``, ``"token"`` or None: read
    from the shape) pins the reading; see :func:`rspo_kernels.loss.layout.weights_per_token`.
    """
    if weights_per is not None and weights_per not in WEIGHTS_PER:
        raise ValueError(f"weights_per must be 'sequence', 'token' or None (read from the shape), got {weights_per!r}")
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if not weights.dtype.is_floating_point:
        raise TypeError(f"weights must be a floating tensor, got {weights.dtype}; convert it with .float()")
    shape = tuple(weights.shape)
    per_seq: list[tuple[int, ...]]
    per_tok: list[tuple[int, ...]] = [token_shape]
    if len(token_shape) == 2:
        per_seq = [token_shape[:1]]
        want_seq, want_tok = f"({token_shape[0]},) per response", f"{token_shape} per token"
    else:
        if weights_per == "sequence" and n_seqs is None:
            raise ValueError(
                "weights_per='sequence' with packed (N, D) inputs needs cu_seqlens to map each weight to its sequence"
            )
        per_seq = [(n_seqs,)] if n_seqs is not None else []
        want_seq = (
            f"({n_seqs},) per sequence of cu_seqlens"
            if n_seqs is not None
            else "(pass cu_seqlens for one weight per sequence)"
        )
        want_tok = f"{token_shape} per token"
    if weights_per == "sequence":
        allowed, want = per_seq, want_seq + " (weights_per='sequence')"
    elif weights_per == "token":
        allowed, want = per_tok, want_tok + " (weights_per='token')"
    else:
        allowed = per_tok + per_seq
        if len(token_shape) == 2:
            want = f"{want_seq} or {want_tok}"
        else:
            want = f"{want_tok} or {want_seq}" if per_seq else f"{want_tok} {want_seq}"
    if shape not in allowed:
        raise ValueError(f"weights must have shape {want}, got {shape}")
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device} but logits is on {device}; move it with .to(logits.device)")


def check_cu_seqlens(cu_seqlens: Any, n_tokens: int, device: torch.device) -> int:
    """Validate packed offsets ``[0, ..., N]``; return the number of sequences ``S``."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    # Unsigned offsets would wrap on subtraction (a decrease would pass unseen), and torch lacks
    # most kernels for uint16/32/64: int32 (flash-attention's) and int64 are the offset types.
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
        raise TypeError(
            f"cu_seqlens must be a 1-D integer tensor (int32 or int64), got {cu_seqlens.dtype} of shape "
            f"{tuple(cu_seqlens.shape)}; convert it with cu_seqlens.long()"
        )
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold S + 1 >= 2 offsets [0, len_0, ..., N], got {cu_seqlens.numel()}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but logits is on {device}; move it together")
    if reads_values(cu_seqlens):
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        decreasing = cu_seqlens[1:] < cu_seqlens[:-1]  # compared, never subtracted: nothing can overflow
        if first != 0 or last != n_tokens or bool(decreasing.any()):
            bad = int(torch.nonzero(decreasing)[0, 0]) if bool(decreasing.any()) else None
            where = f"; offsets decrease after sequence {bad}" if bad is not None else ""
            raise ValueError(
                f"cu_seqlens must start at 0, never decrease and end at N={n_tokens} (the packed token count); "
                f"got first={first}, last={last}{where}"
            )
    return cu_seqlens.numel() - 1


def check_ids_in_range(target_ids: torch.Tensor, vocab: int, mask: torch.Tensor | None) -> None:
    """CPU only: every live id lies in ``[0, V)`` (on a GPU such an id gives a NaN loss)."""
    if not reads_values(target_ids) or target_ids.numel() == 0:
        return
    live = target_ids if mask is None else target_ids[mask != 0]
    if live.numel() and (int(live.min()) < 0 or int(live.max()) >= vocab):
        raise ValueError(
            f"target_ids must lie in [0, V={vocab}) wherever the mask is nonzero; found values in "
            f"[{int(live.min())}, {int(live.max())}]. Mask padding positions (mask=0) instead of using "
            "out-of-range ids."
        )


def _may_overlap(x: torch.Tensor) -> bool:
    """Whether two indices of ``x`` may share one memory location (an ``expand``-ed view, say).

    Sufficient test: with the dimensions of size > 1 sorted by stride, each stride must exceed the
    span of all the smaller ones. Dense tensors and slices such as ``logits[:, :-1]`` pass.
    """
    if x.numel() == 0:
        return False
    span = 0
    for stride, size in sorted((abs(st), s) for s, st in zip(x.shape, x.stride(), strict=True) if s > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def check_inplace(name: str, x: torch.Tensor, inplace_backward: bool) -> None:
    """``inplace_backward`` overwrites ``x`` in backward: refuse leaves, whose values the caller owns,
    and views whose elements share memory, where every row's gradient would land in one place."""
    if not (inplace_backward and x.requires_grad):
        return
    if x.is_leaf:
        raise ValueError(
            f"inplace_backward=True would overwrite the leaf tensor {name} with its gradient; it is meant for "
            f"{name} produced by a layer (e.g. an lm_head output). Pass inplace_backward=False for leaf tensors."
        )
    if _may_overlap(x):
        raise ValueError(
            f"inplace_backward=True would write every token's gradient over {name}, whose elements share memory "
            f"(strides {tuple(x.stride())} for shape {tuple(x.shape)}, e.g. an expand()-ed view): pass a "
            f"contiguous tensor ({name}.contiguous()) or inplace_backward=False."
        )


def check_flag(name: str, value: Any) -> bool:
    """A boolean switch: ``bool`` or ``numpy.bool_`` only, since ``bool("no")`` would be True."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_block_size(name: str, value: Any) -> int | None:
    """``None`` (the default block shape) or an integer >= 1; numpy integers are accepted, as for ``k``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    try:
        size = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or None, got {value!r} ({type(value).__name__})") from None
    if size < 1:
        raise ValueError(f"{name} must be >= 1 (or None for the default block shape), got {size}")
    return size
