"""TRL: the RSPO policy loss from the last hidden state and ``lm_head``, never building the logits.

:class:`FusedLinearLossMixin` goes in front of ``GRPOTrainer`` in :class:`RSPOTrainer`'s bases. With
``RSPOConfig(use_fused_linear_loss=True)`` its ``_compute_loss`` runs the model's backbone (no
head), takes the hidden states at the positions that predict the completion tokens, and calls
:func:`rspo_kernels.rspo_linear_loss` with ``lm_head.weight`` (and bias): the ``(tokens, vocab)``
logits never exist, in forward or backward. Without the flag it is GRPO's ``_compute_loss``.

TRL's aggregation (``loss_type``) maps onto :func:`rspo_linear_loss`'s ``loss_agg_mode``; TRL also
divides by the gradient-accumulation steps. The result equals GRPO's own loss on the same batch
(tested): ``bnpo`` is ``token-mean``; ``grpo`` is ``seq-mean-token-mean`` and ``dr_grpo`` is
``seq-mean-token-sum-norm`` (with ``max_completion_length``), both times ``G / B`` because TRL
averages over all ``B`` rows and we over the ``G`` non-empty ones; ``dapo`` is ``token-sum``
divided by TRL's ``num_items_in_batch`` normaliser. GRPO options that change the per-token loss
beyond clipping and the k3 KL (sequence-level importance sampling, entropy masks or bonus,
off-policy masks, vLLM importance-sampling correction, ``delta``, the bias-corrected KL, MoE
auxiliary loss, logit soft-capping or scaling, other ``loss_type`` values) raise at the first step,
naming the option.
"""

from __future__ import annotations

from typing import Any

import torch

from rspo_kernels.loss.linear import rspo_linear_loss

__all__ = ["FusedLinearLossMixin", "fused_linear_loss_settings"]

_AGG = {"bnpo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-sum"}


def fused_linear_loss_settings(trainer: Any) -> dict[str, Any]:
    """The :func:`rspo_linear_loss` keywords for ``trainer``'s GRPO settings; raises on what it cannot express."""
    args = trainer.args
    if trainer.loss_type not in _AGG:
        raise ValueError(f"use_fused_linear_loss=True supports loss_type in {sorted(_AGG)}, got {trainer.loss_type!r}")
    unsupported = {
        "importance_sampling_level='sequence'": trainer.importance_sampling_level != "token",
        "top_entropy_quantile < 1": getattr(trainer, "top_entropy_quantile", 1.0) < 1.0,
        "off_policy_mask_threshold": getattr(trainer, "off_policy_mask_threshold", None) is not None,
        "entropy_coef (entropy bonus)": bool(getattr(trainer, "_entropy_bonus_enabled", False)),
        "delta (two-sided clipping)": getattr(args, "delta", None) is not None,
        "use_bias_correction_kl with beta > 0": trainer.beta != 0.0
        and bool(getattr(args, "use_bias_correction_kl", False)),
        "vLLM importance-sampling correction": bool(getattr(trainer, "use_vllm", False))
        and bool(getattr(trainer, "vllm_importance_sampling_correction", False)),
        "a MoE router auxiliary loss": bool(getattr(trainer, "aux_loss_enabled", False)),
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise ValueError(
            f"use_fused_linear_loss=True does not support {', '.join(bad)}; turn it off or set "
            "use_fused_linear_loss=False"
        )
    return {
        "temperature": trainer.temperature,
        "epsilon_low": trainer.epsilon_low,
        "epsilon_high": trainer.epsilon_high,
        "beta": trainer.beta,
        "loss_agg_mode": _AGG[trainer.loss_type],
        "max_response_length": trainer.max_completion_length if trainer.loss_type == "dr_grpo" else None,
    }


def _backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1.0):
            raise ValueError(
                f"use_fused_linear_loss=True computes hidden @ lm_head.weight.T (+ bias); this model's "
                f"config sets {name}={getattr(config, name)!r}, which it does not apply"
            )
    return base.base_model, base.get_output_embeddings()


class FusedLinearLossMixin:
    """``_compute_loss`` from hidden states and ``lm_head`` when ``args.use_fused_linear_loss`` is set.

    Put it before ``GRPOTrainer`` in the bases. The loss and its gradients equal GRPO's on the same
    batch; it logs GRPO's ``entropy``, ``clip_ratio/region_mean`` and (with ``beta``) ``kl``.
    """

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        if not getattr(self.args, "use_fused_linear_loss", False):
            return super()._compute_loss(model, inputs)  # type: ignore[misc]
        settings = fused_linear_loss_settings(self)
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        n_completion = completion_ids.size(1)
        backbone, lm_head = _backbone_and_head(self.accelerator.unwrap_model(model))
        with self.accelerator.autocast():
            out = backbone(
                input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
                attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
                use_cache=False,
            )
        # Position t predicts token t + 1: these rows predict the completion tokens.
        hidden = out.last_hidden_state[:, -n_completion - 1 : -1]
        weight = lm_head.weight
        hidden = hidden.to(device=weight.device, dtype=weight.dtype)
        advantages = inputs["advantages"]
        loss, stats = rspo_linear_loss(
            hidden,
            weight,
            completion_ids,
            advantages.float(),
            mask,
            bias=lm_head.bias,
            old_logprobs=inputs.get("old_per_token_logps"),
            ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            return_stats=True,
            **settings,
        )
        mode = "train" if self.model.training else "eval"
        n_rows = mask.size(0)
        nonempty = (mask.sum(-1) > 0).sum().to(loss.dtype)
        if self.loss_type in ("grpo", "dr_grpo"):
            loss = loss * nonempty / n_rows  # TRL averages over all B rows, we over the G non-empty ones
        if self.loss_type == "dapo":
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss = loss / normalizer
        elif mode == "train":
            loss = loss / self.current_gradient_accumulation_steps
        metrics = self._metrics[mode]
        metrics["entropy"].append(self.accelerator.gather(stats["entropy_mean"]).nanmean().item())
        metrics["clip_ratio/region_mean"].append(self.accelerator.gather(stats["clip_fraction"]).nanmean().item())
        if self.beta != 0.0:
            metrics["kl"].append(self.accelerator.gather(stats["ref_kl"]).nanmean().item())
        return loss
