"""RSPO for TRL: :class:`RSPOTrainer` is ``GRPOTrainer`` with RSPO weights as the advantages.

::

    from rspo_kernels.integrations.trl import RSPOConfig, RSPOTrainer

    args = RSPOConfig(output_dir="out", num_generations=8, rspo_k=4, rspo_objective="pass@k")
    trainer = RSPOTrainer(model=..., reward_funcs=..., args=args, train_dataset=...)

Everything else (generation, the clipped loss, KL, logging, multi-GPU) is GRPO's, except the
default ``loss_type``: ``"dr_grpo"`` (a sum over tokens with a constant normaliser) instead of
GRPO's ``"dapo"``, whose normaliser depends on the sampled lengths.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

import rspo_kernels as rk
from rspo_kernels.integrations._common import DEFAULT_K, RSPOSettings, framework_import

with framework_import("trl", "trl"):
    from transformers import TrainingArguments
    from trl import GRPOConfig, GRPOTrainer

__all__ = ["RSPOConfig", "RSPOTrainer", "rspo_advantages"]

_KEYS = {
    "objective": "rspo_objective",
    "k": "rspo_k",
    "estimator": "rspo_estimator",
    "order": "rspo_order",
    "schedule": "rspo_k_schedule",
    "n": "num_generations",
}
_EVAL_KEYS = {**_KEYS, "n": "num_generations_eval"}
# transformers >= 5.2x renames gradient_checkpointing (now a deprecated alias that warns when set)
# to activation_checkpointing; TRL 1.16 still sets its default on the old name.
_RENAMED_CHECKPOINTING = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
# ... and TRL 1.16 calls the model's deprecated aliases while it generates.
_TRL_DEPRECATED_CALLS = r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated"
# The flag ran the backbone outside the DDP wrapper's forward (replicas drifted by 4e-3 in 3 steps on
# 2 processes) and duplicated what TRL's default path already does (docs/fused-trainers.md, "TRL").
_FUSED_LINEAR_LOSS_REMOVED = (
    "RSPOConfig(use_fused_linear_loss=True) was removed: RSPOTrainer, as TRL's GRPOTrainer, already computes the "
    "per-token log-probs from the last hidden state without materialising the logits (TRL's add_fused_lm_head / "
    "ChunkedLogProbFunction), inside the wrapped model's forward, so DDP, FSDP2 and ZeRO-3 synchronise it; drop "
    "use_fused_linear_loss (TRL's cast_lm_head_to_fp32 sets the head's precision)"
)


@dataclass
class RSPOConfig(GRPOConfig):
    """:class:`trl.GRPOConfig` plus the RSPO settings.

    Parameters
    ----------
    rspo_k : int, default 4
        k of Pass@k / Max@k; at most ``num_generations`` (and ``num_generations_eval``).
    rspo_objective : {"pass@k", "max@k", "maxrl"}, default "pass@k"
        Pass@k needs binary total rewards; Max@k takes graded ones; ``"maxrl"`` is
        maximum-likelihood RL (:func:`rspo_kernels.maxrl_weights`, binary rewards).
    rspo_estimator : str, default "rspo"
        One of :data:`rspo_kernels.ESTIMATORS` (:data:`rspo_kernels.MAXRL_ESTIMATORS` under ``"maxrl"``).
    rspo_order : int, optional
        MaxRL's truncation order T (default: ``num_generations``); ``"maxrl"`` only.
    rspo_k_schedule : str, optional
        ``"8:0,4:200,1:400"``: k = 8 from step 0, 4 from step 200, 1 from step 400 (the order
        under ``"maxrl"``); replaces ``rspo_k``. Every k is checked against ``num_generations``
        on creation; the k in force is logged as ``rspo/k`` (``rspo/order``).
    loss_type : str, default "dr_grpo"
        GRPO's, with a different default; any other value warns (see README, "Aggregation").

    Raises
    ------
    ValueError
        On creation, before any model loads: an invalid ``rspo_*`` value, or one that groups of
        ``num_generations`` (or ``num_generations_eval``) completions cannot serve.
    use_fused_linear_loss : bool, default False
        Removed: ``True`` raises. TRL's trainer already computes the log-probs from the hidden
        states without the logits (``add_fused_lm_head``), inside the wrapped model's forward
        (docs/fused-trainers.md, "TRL").

    Notes
    -----
    The RSPO weights replace GRPO's normalisation, so ``scale_rewards`` and
    ``multi_objective_aggregation`` have no effect: the reward of a completion is the weighted sum
    of the reward functions (``reward_weights``), as TRL logs it under ``reward``.
    """

    rspo_k: int = field(default=DEFAULT_K, metadata={"help": "k of Pass@k / Max@k (at most num_generations)."})
    rspo_objective: str = field(default="pass@k", metadata={"help": "'pass@k' (binary rewards) or 'max@k'."})
    rspo_estimator: str = field(default="rspo", metadata={"help": f"One of {', '.join(rk.ESTIMATORS)}."})
    rspo_order: int | None = field(default=None, metadata={"help": "MaxRL's truncation order (default n)."})
    rspo_k_schedule: str | None = field(default=None, metadata={"help": "k schedule, e.g. '8:0,4:200,1:400'."})
    loss_type: str = field(default="dr_grpo", metadata={"help": "GRPO's loss_type; RSPO's weights need 'dr_grpo'."})
    if _RENAMED_CHECKPOINTING:
        gradient_checkpointing: bool | None = None  # TRL's default goes onto the new name below
    use_fused_linear_loss: bool = field(
        default=False,
        metadata={"help": "Removed (raises when True): TRL's default path already never builds the logits."},
    )

    def __post_init__(self) -> None:
        if self.use_fused_linear_loss:
            raise ValueError(_FUSED_LINEAR_LOSS_REMOVED)
        if _RENAMED_CHECKPOINTING and self.gradient_checkpointing is None and self.activation_checkpointing is None:
            self.activation_checkpointing = GRPOConfig.gradient_checkpointing
        if self.loss_type != "dr_grpo":
            warnings.warn(
                f"RSPOConfig(loss_type={self.loss_type!r}): only loss_type='dr_grpo' (the default) sums a completion's "
                "tokens with a constant normaliser; the others scale completions by sampled lengths or change the "
                "loss, so the RSPO weights no longer give an unbiased Pass@k/Max@k gradient",
                UserWarning,
                stacklevel=3,
            )
        super().__post_init__()
        settings = self.rspo_settings()
        # Keep the checked values (rspo_k="4" from a command line -> 4), as the verl adapter does.
        self.rspo_objective, self.rspo_k, self.rspo_estimator = settings.objective, settings.k, settings.estimator
        settings.check_group_size(self.num_generations)
        if self.num_generations_eval is not None:
            self._settings(_EVAL_KEYS).check_group_size(self.num_generations_eval)

    def rspo_settings(self) -> RSPOSettings:
        """The validated RSPO settings (raises ``ValueError`` naming the bad field)."""
        return self._settings(_KEYS)

    def _settings(self, keys: dict[str, str]) -> RSPOSettings:
        return RSPOSettings.create(
            self.rspo_objective, self.rspo_k, self.rspo_estimator, keys, self.rspo_order, self.rspo_k_schedule
        )


def rspo_advantages(
    rewards: torch.Tensor, group_size: int, settings: RSPOSettings
) -> tuple[torch.Tensor, dict[str, float]]:
    """RSPO weights of consecutive groups, leaving out unscorable (NaN) completions.

    Parameters
    ----------
    rewards : torch.Tensor
        ``(N,)`` total reward of every completion of every process, in TRL's gathered order
        (``group_size`` consecutive completions per prompt). NaN marks a completion for which
        every reward function returned None.
    group_size : int
        Completions per prompt (``num_generations``, or ``num_generations_eval`` in evaluation).
    settings : RSPOSettings

    Returns
    -------
    weights : torch.Tensor
        ``(N,)`` float32 weights. Unscorable completions get 0 and are left out of their group,
        as GRPO leaves them out of its baseline; a group left with fewer than k scorable
        completions gets 0 throughout.
    metrics : dict of str to float
        ``"rspo/pass@4"`` (or ``max@4``, ...): mean unbiased metric over groups with at least k
        scorable completions; ``"rspo/frac_groups_skipped"``: fraction of groups with fewer.
    """
    scorable = ~torch.isnan(rewards)
    group = torch.arange(rewards.numel(), device=rewards.device) // group_size
    counts = torch.zeros(rewards.numel() // group_size, dtype=torch.long, device=rewards.device)
    counts.index_add_(0, group, scorable.long())
    least = settings.min_group_size
    keep = scorable & (counts >= least)[group]
    weights = torch.zeros_like(rewards, dtype=torch.float32)
    metrics = {"rspo/frac_groups_skipped": (counts < least).float().mean().item()}
    if bool(keep.any()):
        ids = group[keep]
        weights[keep] = settings.weights(rewards[keep], group_ids=ids).float()
        metrics[f"rspo/{settings.metric_name}"] = settings.metric(rewards[keep], group_ids=ids).float().mean().item()
    return weights, metrics


class RSPOTrainer(GRPOTrainer):
    """:class:`trl.GRPOTrainer` whose advantages are RSPO weights.

    The weights are computed on the rewards of all processes (a prompt's completions can be spread
    over several processes), then each process keeps its own slice, exactly where GRPO slices its
    advantages. The completions table (``log_completions``) shows the RSPO weights in its
    ``advantage`` column, and the metrics gain ``rspo/pass@k`` (the batch's unbiased pass@k,
    with k's value in the name), ``rspo/frac_groups_skipped`` and ``rspo/k`` (the k in force,
    which ``rspo_k_schedule`` changes with ``state.global_step``; ``rspo/order`` under MaxRL).

    Parameters
    ----------
    *args, **kwargs
        As for :class:`trl.GRPOTrainer`; ``args`` must be an :class:`RSPOConfig`.

    Raises
    ------
    TypeError
        When ``args`` is not an :class:`RSPOConfig`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(config, RSPOConfig):
            raise TypeError(f"RSPOTrainer needs args=RSPOConfig(...), got {type(config).__name__}")
        self._rspo = config.rspo_settings()
        self._rspo_rewards: torch.Tensor | None = None
        super().__init__(*args, **kwargs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """GRPO's gathered rewards per function; also keeps their weighted sum for RSPO."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # Already gathered over processes. A completion is unscorable when every function returned None.
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        self._rspo_rewards = rewards.masked_fill(unscorable, float("nan"))
        return rewards_per_func

    def _compute_loss(self, model, inputs):
        """The policy loss of one micro-batch; the one place to change how it is computed.

        ``inputs["advantages"]`` holds the RSPO weights (see :meth:`_generate_and_score_completions`).
        """
        return super()._compute_loss(model, inputs)

    def _generate_and_score_completions(self, inputs):
        """GRPO's generation batch, with RSPO weights as its ``advantages``."""
        with warnings.catch_warnings():
            # TRL's own calls (FutureWarnings on transformers >= 5.2x): nothing a user can change.
            warnings.filterwarnings("ignore", message=_TRL_DEPRECATED_CALLS, category=FutureWarning)
            output = super()._generate_and_score_completions(inputs)
        rewards, self._rspo_rewards = self._rspo_rewards, None
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        settings = self._rspo.at_step(self.state.global_step)
        weights, metrics = rspo_advantages(rewards, group_size, settings)
        metrics.update([settings.logged])

        local = output["advantages"].shape[0]
        start = self.accelerator.process_index * local
        output["advantages"] = weights[start : start + local].to(output["advantages"].dtype)

        # GRPO appended its gathered advantages last; put the RSPO weights in their place.
        logged = self._logs["advantages"]
        for _ in range(min(weights.numel(), len(logged))):
            logged.pop()
        logged.extend(weights.tolist())
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        return output
