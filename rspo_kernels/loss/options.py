"""The loss's hyper-parameters in one frozen object that every backend receives.

:class:`LossOptions` is validated once, when it is built, so a typo fails at construction
(``RSPOLoss(...)``) and not at the first training step. The public functions build one from their
keywords; backends never see loose keyword lists.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
from typing import Any

__all__ = ["LOG_RATIO_CLAMP", "LOSS_AGG_MODES", "LossOptions"]

LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

# verl clamps ``logp - old_logp`` to this range before ``exp`` (``compute_policy_loss``): a stale
# or -inf old log-prob then gives a large but finite ratio instead of inf (and 0 * inf = NaN).
LOG_RATIO_CLAMP = 20.0


def _real(name: str, value: Any) -> float:
    # numbers.Real admits numpy scalars; bool is an int subclass but never a hyper-parameter.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)  # int, numpy integers, 0-d integer tensors
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Hyper-parameters of the clipped RSPO policy loss.

    Parameters
    ----------
    temperature : float, default 1.0
        Divides the logits before the softmax (use the sampling temperature). Must be > 0.
    epsilon_low : float, default 0.2
        Lower clip range: the ratio is clipped to ``[1 - epsilon_low, 1 + epsilon_high]``.
        Must lie in ``[0, 1)``.
    epsilon_high : float, optional
        Upper clip range (DAPO's "clip-higher"); ``None`` means ``epsilon_low``. Must be >= 0.
    clip_ratio_c : float, optional
        Dual-clip constant (verl's ``clip_ratio_c``, usually 3.0): for a negative weight ``A``
        the token loss is ``min(-A * clip_ratio_c, clipped loss)``. ``None`` turns it off.
        Must be > 1.
    beta : float, default 0.0
        Weight of the k3 KL penalty to the reference policy. Must be >= 0.
    loss_agg_mode : str, default "token-mean"
        One of :data:`LOSS_AGG_MODES`, as verl's ``agg_loss``.
    max_response_length : int, optional
        Constant divisor of ``"seq-mean-token-sum-norm"`` (Dr. GRPO); ``T`` for padded inputs
        when absent, required for packed inputs.
    entropy_coeff : float, default 0.0
        Weight of the entropy bonus (verl's ``actor.entropy_coeff``): the loss becomes
        ``pg_loss - entropy_coeff * agg(entropy)``, the entropy aggregated with the same
        ``loss_agg_mode`` as the policy loss (verl's ``ppo_loss``). Its gradient is exact on every
        backend. Any finite number (negative values penalise entropy).

    Raises
    ------
    TypeError
        A value of the wrong type (a string temperature, a float ``max_response_length``).
    ValueError
        A value out of range, or an unknown ``loss_agg_mode``.

    Examples
    --------
    >>> from rspo_kernels.loss import LossOptions
    >>> LossOptions(epsilon_high=0.28, clip_ratio_c=3.0).eps_high
    0.28
    """

    temperature: float = 1.0
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    clip_ratio_c: float | None = None
    beta: float = 0.0
    loss_agg_mode: str = "token-mean"
    max_response_length: int | None = None
    entropy_coeff: float = 0.0

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:  # frozen: normalise the fields once, here
            object.__setattr__(self, name, value)

        set_("temperature", _real("temperature", self.temperature))
        set_("epsilon_low", _real("epsilon_low", self.epsilon_low))
        if self.epsilon_high is not None:
            set_("epsilon_high", _real("epsilon_high", self.epsilon_high))
        if self.clip_ratio_c is not None:
            set_("clip_ratio_c", _real("clip_ratio_c", self.clip_ratio_c))
        set_("beta", _real("beta", self.beta))
        set_("entropy_coeff", _real("entropy_coeff", self.entropy_coeff))
        if self.max_response_length is not None:
            set_("max_response_length", _int("max_response_length", self.max_response_length))
        if not self.temperature > 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0 <= self.epsilon_low < 1:
            raise ValueError(f"epsilon_low must lie in [0, 1), got {self.epsilon_low}")
        if self.epsilon_high is not None and not 0 <= self.epsilon_high < float("inf"):
            raise ValueError(
                f"epsilon_high must be a finite number >= 0 (or None for epsilon_low), got {self.epsilon_high}"
            )
        if self.clip_ratio_c is not None and not 1 < self.clip_ratio_c < float("inf"):
            raise ValueError(
                f"clip_ratio_c must be > 1 (verl uses 3.0) or None to turn dual-clip off, got {self.clip_ratio_c}"
            )
        if not 0 <= self.beta < float("inf"):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")
        if not abs(self.entropy_coeff) < float("inf"):
            raise ValueError(
                f"entropy_coeff must be a finite number (verl's actor.entropy_coeff), got {self.entropy_coeff}"
            )
        if not isinstance(self.loss_agg_mode, str) or self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode={self.loss_agg_mode!r} is not one of {LOSS_AGG_MODES}")
        if self.max_response_length is not None and self.max_response_length < 1:
            raise ValueError(f"max_response_length must be >= 1, got {self.max_response_length}")

    @property
    def eps_high(self) -> float:
        """The upper clip range with ``None`` resolved to ``epsilon_low``."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of the keyword arguments this object carries."""
        return tuple(f.name for f in dataclasses.fields(cls))
