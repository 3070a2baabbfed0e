"""The loss's hyper-parameters in one frozen object that every backend receives.

:class:`LossOptions` is validated once, when it is built, so a typo fails at construction
(``RSPOLoss(...)``) and not at the first training step. The public functions build one from their
keywords; backends never see loose keyword lists.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
from collections.abc import Mapping
from typing import Any

__all__ = [
    "KL_PENALTIES",
    "LOG_RATIO_CLAMP",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "POLICY_LOSS_DEFAULTS",
    "POLICY_LOSS_KEYS",
    "SEQUENCE_POLICY_LOSSES",
    "VERL_POLICY_LOSSES",
    "LossOptions",
]

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

# verl 0.9.1's registered policy losses (``verl.trainer.ppo.core_algos.get_policy_loss_fn``, less its
# ``bypass_mode`` wrapper), and for each the ``actor.policy_loss`` / ``actor`` keys it reads.
POLICY_LOSS_KEYS: dict[str, tuple[str, ...]] = {
    "vanilla": (),
    "dppo_tv": (),
    "dppo_kl": (),
    "gspo": (),
    "sapo": ("tau_pos", "tau_neg"),
    "gpg": (),
    "clip_cov": ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub"),
    "kl_cov": ("kl_cov_ratio", "ppo_kl_coef"),
    "geo_mean": (),
    "dro": ("dro_beta",),
    "cispo": (),
    # Where TRL 1.16 / Liger-Kernel 0.8.5 define a loss differently from verl: their own names.
    "cispo_trl": (),
    "two_sided_clip": ("delta",),
    "vespo": ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
    "luspo": (),
}
POLICY_LOSSES = tuple(POLICY_LOSS_KEYS)
VERL_POLICY_LOSSES = POLICY_LOSSES[:11]

# verl's defaults (``PolicyLossConfig`` and ``ActorConfig``); ``dro_beta`` has none: DRO requires it.
POLICY_LOSS_DEFAULTS: dict[str, float] = {
    "clip_cov_ratio": 0.0002,
    "clip_cov_lb": 1.0,
    "clip_cov_ub": 5.0,
    "kl_cov_ratio": 0.0002,
    "ppo_kl_coef": 0.1,
    "tau_pos": 1.0,
    "tau_neg": 1.05,
    # TRL's GRPOConfig defaults
    "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
}

# Losses that read whole sequences (a sequence-level ratio or aggregation): packed inputs need cu_seqlens.
SEQUENCE_POLICY_LOSSES = ("gspo", "sapo", "geo_mean", "vespo", "luspo")

# verl's ``actor.kl_loss_type`` names (``core_algos.kl_penalty``), each also with a ``+`` suffix (value of
# the estimator, gradient of k2: straight-through), and ``k3_unclamped``: Schulman's k3 without verl's
# clamp of the estimate to [-10, 10], the estimator of this loss before ``kl_penalty`` existed.
_KL_BASE = ("k3_unclamped", "kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
KL_PENALTIES = _KL_BASE + tuple(k + "+" for k in _KL_BASE)


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
    policy_loss : str, default "vanilla"
        One of :data:`POLICY_LOSSES`, verl 0.9.1's registered names (docs/loss.md has each
        formula): ``vanilla`` (PPO clip, dual-clip with ``clip_ratio_c``), ``dppo_tv`` /
        ``dppo_kl`` (DPPO's binary TV / KL trust region; ``epsilon_low`` / ``epsilon_high`` are the
        divergence thresholds and ``clip_ratio_c`` truncates the ratio, None: no truncation),
        ``gspo`` (sequence-level ratio), ``sapo`` (soft gates; always aggregated
        ``seq-mean-token-mean``, as verl does), ``gpg``, ``clip_cov``, ``kl_cov``, ``geo_mean``
        (GMPO: the mean over sequences, ignoring ``loss_agg_mode`` and the global-batch sizes,
        as verl does), ``dro``, ``cispo``. ``epsilon_low`` / ``epsilon_high`` / ``clip_ratio_c``
        play verl's ``clip_ratio_low`` / ``clip_ratio_high`` / ``clip_ratio_c``. Where TRL 1.16 /
        Liger-Kernel 0.8.5 define a loss differently, under its own name: ``cispo_trl`` (the
        ratio capped at ``epsilon_high`` itself, one-sided: TRL's epsilon_high, e.g. 5.0),
        ``two_sided_clip`` (INTELLECT-2's ``delta`` cap on the unclipped branch), ``vespo``
        (gamma-weighted sequence ratio), ``luspo`` (sequence ratio, token sums averaged over
        sequences).
    policy_loss_options : mapping, optional
        The loss's own settings under verl's key names (:data:`POLICY_LOSS_KEYS`): ``tau_pos``,
        ``tau_neg`` (sapo; default 1.0, 1.05), ``clip_cov_ratio``, ``clip_cov_lb``,
        ``clip_cov_ub`` (clip_cov; 0.0002, 1.0, 5.0), ``kl_cov_ratio``, ``ppo_kl_coef``
        (kl_cov; 0.0002, 0.1), ``dro_beta`` (dro; required, > 0), ``delta`` (two_sided_clip;
        required, > 1), ``vespo_k_pos``, ``vespo_lambda_pos``, ``vespo_k_neg``,
        ``vespo_lambda_neg`` (vespo; TRL's 2.0, 3.0, 3.0, 2.0). A key the chosen loss does not
        read raises. Stored as a sorted tuple of ``(key, value)`` items (hashable).
    kl_penalty : str, default "k3_unclamped"
        The KL estimator that ``beta`` weighs, verl's ``actor.kl_loss_type`` names
        (:data:`KL_PENALTIES`): ``kl``/``k1`` (``logp - ref``), ``abs``, ``mse``/``k2``
        (``(logp - ref)^2 / 2``), ``low_var_kl``/``k3`` (``e^d - d - 1``, ``d = ref - logp``
        clamped to [-20, 20], the estimate clamped to [-10, 10]), each with a ``+`` suffix for
        the straight-through form (its value, k2's gradient). The default ``k3_unclamped`` is k3
        without the [-10, 10] clamp (this loss's estimator before the option existed).

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
    policy_loss: str = "vanilla"
    policy_loss_options: Any = None
    kl_penalty: str = "k3_unclamped"

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
        if not isinstance(self.policy_loss, str) or self.policy_loss not in POLICY_LOSS_KEYS:
            raise ValueError(f"policy_loss={self.policy_loss!r} is not one of {POLICY_LOSSES}")
        if not isinstance(self.kl_penalty, str) or self.kl_penalty not in KL_PENALTIES:
            raise ValueError(f"kl_penalty={self.kl_penalty!r} is not one of {KL_PENALTIES}")
        set_("policy_loss_options", self._check_loss_options(self.policy_loss, self.policy_loss_options))
        if self.policy_loss == "cispo_trl" and self.epsilon_high is None:
            raise ValueError(
                "policy_loss='cispo_trl' caps the ratio at epsilon_high itself (TRL's epsilon_high, ScaleRL's "
                "epsilon_max, e.g. 5.0): pass epsilon_high"
            )

    @staticmethod
    def _check_loss_options(loss: str, given: Any) -> tuple[tuple[str, float], ...]:
        if given is None:
            items: list[tuple[Any, Any]] = []
        elif isinstance(given, Mapping):
            items = list(given.items())
        elif isinstance(given, (tuple, list)) and all(isinstance(i, tuple) and len(i) == 2 for i in given):
            items = list(given)  # the normalised form, as stored (e.g. copied from another LossOptions)
        else:
            raise TypeError(
                f"policy_loss_options must be a mapping of verl's key names to numbers, got {type(given).__name__}"
            )
        valid = POLICY_LOSS_KEYS[loss]
        out: dict[str, float] = {}
        for key, value in items:
            if key not in valid:
                raise ValueError(
                    f"policy_loss_options key {key!r} is not read by policy_loss={loss!r}; "
                    f"valid keys: {list(valid) if valid else 'none'}"
                )
            out[key] = _real(f"policy_loss_options[{key!r}]", value)
            if not abs(out[key]) < float("inf"):
                raise ValueError(f"policy_loss_options[{key!r}] must be finite, got {out[key]}")
        positive = ("clip_cov_ratio", "kl_cov_ratio", "dro_beta", "tau_pos", "tau_neg")
        for key in positive:
            if key in out and not out[key] > 0:
                raise ValueError(f"policy_loss_options[{key!r}] must be > 0, got {out[key]}")
        if "delta" in out and not out["delta"] > 1:
            raise ValueError(
                f"policy_loss_options['delta'] must be > 1 (TRL: above 1 + epsilon_high), got {out['delta']}"
            )
        if loss == "two_sided_clip" and "delta" not in out:
            raise ValueError("policy_loss='two_sided_clip' needs policy_loss_options={'delta': ...} (TRL's delta, > 1)")
        if loss == "dro" and "dro_beta" not in out:
            raise ValueError("policy_loss='dro' needs policy_loss_options={'dro_beta': ...} (> 0; verl has no default)")
        lb = out.get("clip_cov_lb", POLICY_LOSS_DEFAULTS["clip_cov_lb"])
        ub = out.get("clip_cov_ub", POLICY_LOSS_DEFAULTS["clip_cov_ub"])
        if loss == "clip_cov" and not lb < ub:
            raise ValueError(f"policy_loss_options clip_cov_lb={lb} must be < clip_cov_ub={ub}")
        return tuple(sorted(out.items()))

    def loss_option(self, key: str) -> float:
        """The value of a ``policy_loss_options`` key, or verl's default for it."""
        return dict(self.policy_loss_options).get(key, POLICY_LOSS_DEFAULTS.get(key))  # type: ignore[return-value]

    @property
    def eps_high(self) -> float:
        """The upper clip range with ``None`` resolved to ``epsilon_low``."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of the keyword arguments this object carries."""
        return tuple(f.name for f in dataclasses.fields(cls))
