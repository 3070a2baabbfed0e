"""Final-logit soft-capping (Gemma 2/3): ``z -> c * tanh(z / c)``, then the temperature.

Written once here and used by every torch backend (reference, chunked, vocabulary-parallel,
fused-linear, the statistics); the Triton kernels carry the same formula in
:mod:`rspo_kernels.ops._softmax_helpers`. The order is Hugging Face's: ``Gemma2ForCausalLM`` caps
the ``lm_head`` output (``final_logit_softcapping``) and sampling then divides the capped logits
by the temperature, so a token's log-prob is ``log_softmax(c * tanh(z / c) / T)``.

A ``-inf`` logit stays ``-inf`` (a token of probability 0, the library's vocabulary-masking
convention), although ``c * tanh(-inf) = -c``: masking survives the cap, and gets gradient 0.
The cap's derivative is ``d(c tanh(z / c))/dz = 1 - tanh(z / c)^2``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["cap_", "cap_derivative", "cap_logits", "check_softcap", "scaled_logits"]


def check_softcap(value: Any) -> float | None:
    """Validate ``logit_softcap``: None (no capping) or a finite number ``c > 0``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"logit_softcap must be a positive float or None, got {value!r} ({type(value).__name__})")
    c = float(value)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(
            f"logit_softcap must be a finite float > 0 (Gemma 2 uses 30.0) or None for no capping, got {value!r}"
        )
    return c


def cap_logits(z: torch.Tensor, cap: float, with_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(c * tanh(z / c), 1 - tanh(z / c)^2)`` for ``z`` in its own dtype; ``-inf`` stays ``-inf`` (derivative 0).

    The derivative is returned only when ``with_grad`` (else None).
    """
    t = torch.tanh(z / cap)
    neg_inf = z == float("-inf")
    y = torch.where(neg_inf, z, t * cap)
    if not with_grad:
        return y, None
    d = torch.where(neg_inf, torch.zeros((), dtype=t.dtype, device=t.device), 1.0 - t * t)
    return y, d


def scaled_logits(
    z: torch.Tensor, temperature: float, softcap: float | None, cdt: torch.dtype, with_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x = cap(z) / T`` in ``cdt``, and ``dx/dz * T`` (the cap's derivative; None without a cap or ``with_grad``).

    Without a cap and at ``T = 1`` a ``z`` already in ``cdt`` is returned as is (no copy).
    """
    x = z if z.dtype == cdt else z.to(cdt)
    d = None
    if softcap is not None:
        x, d = cap_logits(x, softcap, with_grad)
    if temperature != 1.0:
        x = x / temperature
    return x, d


def cap_(x: torch.Tensor, cap: float) -> torch.Tensor:
    """In place ``x <- c * tanh(x / c)`` (``-inf`` kept), for a fresh block of logits; returns ``x``."""
    neg_inf = x == float("-inf")
    x.div_(cap).tanh_().mul_(cap)
    return x.masked_fill_(neg_inf, float("-inf"))


def cap_derivative(x: torch.Tensor, temperature: float, cap: float) -> torch.Tensor:
    """``1 - tanh(z / c)^2`` from the capped, scaled logits ``x = c tanh(z / c) / T`` (0 where ``x = -inf``).

    Read off ``x`` so the fused-linear backward need not keep the raw block; ``(x T / c)^2 = inf``
    at a masked entry, clamped to 0.
    """
    t = x * (temperature / cap)
    return t.mul_(t).neg_().add_(1.0).clamp_(min=0.0)
