"""Input validation of the loss API, once, at the public boundary.

Checks never read tensor values from a GPU (no host synchronisation in a training step) and skip
value checks while ``torch.compile`` traces (``fullgraph=True`` must not break on an ``int()``).
Every message names the argument and the fix.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "check_logits",
    "check_ids",
    "check_token_tensor",
    "check_weights",
    "check_cu_seqlens",
    "check_ids_in_range",
    "check_inplace",
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


def check_weights(weights: Any, token_shape: tuple[int, ...], n_seqs: int | None, device: torch.device) -> None:
    """Weights per response / sequence, or per token.

    Padded: ``(B,)`` or ``(B, T)``. Packed: ``(N,)`` per token or ``(S,)`` per sequence (with
    ``cu_seqlens``; ``n_seqs = S``).
    """
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if not weights.dtype.is_floating_point:
        raise TypeError(f"weights must be a floating tensor, got {weights.dtype}; convert it with .float()")
    shape = tuple(weights.shape)
    if len(token_shape) == 2:
        allowed = [token_shape[:1], token_shape]
        want = f"({token_shape[0]},) per response or {token_shape} per token"
    else:
        allowed = [token_shape] + ([(n_seqs,)] if n_seqs is not None else [])
        want = f"{token_shape} per token" + (
            f" or ({n_seqs},) per sequence of cu_seqlens"
            if n_seqs is not None
            else " (pass cu_seqlens for one weight per sequence)"
        )
    if shape not in allowed:
        raise ValueError(f"weights must have shape {want}, got {shape}")
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device} but logits is on {device}; move it with .to(logits.device)")


def check_cu_seqlens(cu_seqlens: Any, n_tokens: int, device: torch.device) -> int:
    """Validate packed offsets ``[0, ..., N]``; return the number of sequences ``S``."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool or cu_seqlens.dim() != 1:
        raise TypeError(
            f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold S + 1 >= 2 offsets [0, len_0, ..., N], got {cu_seqlens.numel()}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but logits is on {device}; move it together")
    if reads_values(cu_seqlens):
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        steps = cu_seqlens[1:] - cu_seqlens[:-1]
        if first != 0 or last != n_tokens or bool((steps < 0).any()):
            bad = int(torch.nonzero(steps < 0)[0, 0]) if bool((steps < 0).any()) else None
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


def check_inplace(name: str, x: torch.Tensor, inplace_backward: bool) -> None:
    """``inplace_backward`` overwrites ``x`` in backward: refuse leaves, whose values the caller owns."""
    if inplace_backward and x.requires_grad and x.is_leaf:
        raise ValueError(
            f"inplace_backward=True would overwrite the leaf tensor {name} with its gradient; it is meant for "
            f"{name} produced by a layer (e.g. an lm_head output). Pass inplace_backward=False for leaf tensors."
        )
