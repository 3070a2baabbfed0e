"""OpenRLHF: action log-probs (and entropies) from the hidden states, never the full logits.

Opt in with ``RSPO_FUSED_LOGPROBS=1`` in the job's environment. The RSPO worker hook
(:func:`rspo_kernels.integrations.openrlhf.install`, which Ray runs in every worker) then calls
:func:`install`, which wraps ``openrlhf.models.actor.Actor.forward``: when the caller asks for action
log-probs (``action_mask``) or per-token log-probs (``return_logprobs``), the backbone runs without its
head and :func:`rspo_kernels.token_logprobs_linear` computes the log-probs (and, with
``return_entropy``, the entropies, both differentiable) from the last hidden state and the
``lm_head`` module, block by block. The ``(tokens, vocab)`` float32 logits that OpenRLHF builds,
divides by the temperature and keeps alive for backward never exist.

Everything around the head is OpenRLHF's own: ``unpad_and_slice_tensor`` for packed samples and
ring-attention slices (its labels are rolled before slicing), ``gather_and_pad_tensor`` afterwards,
the ``[:, :-1]`` shift and the action slice. The head runs as the ``lm_head`` module's forward, so
DeepSpeed ZeRO-3 gathers it as it would for the logits.

The original forward runs instead whenever the caller wants the logits (neither ``action_mask`` nor
``return_logprobs``, or ``allgather_logits``), for vision-language inputs, and for MoE models that
return a router auxiliary loss. The output returned with ``return_output=True`` then carries no
``logits``. Heads that scale or cap the logits are refused when the actor is built.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

from rspo_kernels.integrations._common import unwrap, when_imported, wrap
from rspo_kernels.integrations._fused_head import head_logprobs

__all__ = ["ENV_VAR", "enabled", "fused_forward", "install", "uninstall"]

ENV_VAR = "RSPO_FUSED_LOGPROBS"
_ACTOR = "openrlhf.models.actor"
_HEAD_SCALING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``RSPO_FUSED_LOGPROBS`` asks for the fused path (``1``); ``0`` or unset: no.

    Raises
    ------
    ValueError
        Any other value, naming the variable.
    """
    value = (os.environ if environ is None else environ).get(ENV_VAR, "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_VAR}={value!r}: set {ENV_VAR}=1 to compute log-probs from the hidden states, or 0")
    return value == "1"


def _causal_lm(model: Any) -> Any:
    """The HuggingFace causal LM inside OpenRLHF's ``Actor.model`` (a PEFT model unwrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_head(model: Any) -> None:
    lm = _causal_lm(model)
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for name in _HEAD_SCALING:
        value = getattr(config, name, None)
        if value not in (None, 1.0):
            raise ValueError(
                f"{ENV_VAR}=1 computes hidden @ lm_head.weight.T (+ bias), but the actor's config sets "
                f"{name}={value!r}; unset {ENV_VAR} for this model"
            )


def _wants_logits(self: Any, action_mask: Any, return_logprobs: bool, allgather_logits: bool, mm_inputs: dict) -> bool:
    if (action_mask is None and not return_logprobs) or allgather_logits or mm_inputs or getattr(self, "is_vlm", False):
        return True
    return bool(getattr(_causal_lm(self.model).config, "output_router_logits", False))


def fused_forward(original: Any) -> Any:
    """``Actor.forward`` computing the log-probs from the hidden states; ``original`` where logits are wanted."""

    def forward(
        self,
        sequences: torch.LongTensor,
        action_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_output: bool = False,
        allgather_logits: bool = False,
        return_logprobs: bool = False,
        ring_attn_group: Any = None,
        packed_seq_lens: list[int] | None = None,
        return_entropy: bool = False,
        **mm_inputs: Any,
    ) -> Any:
        if _wants_logits(self, action_mask, return_logprobs, allgather_logits, mm_inputs):
            return original(
                self,
                sequences,
                action_mask,
                attention_mask=attention_mask,
                return_output=return_output,
                allgather_logits=allgather_logits,
                return_logprobs=return_logprobs,
                ring_attn_group=ring_attn_group,
                packed_seq_lens=packed_seq_lens,
                return_entropy=return_entropy,
                **mm_inputs,
            )
        ring = importlib.import_module("openrlhf.models.ring_attn_utils")
        from transformers.modeling_outputs import CausalLMOutputWithPast

        batch, seqlen = sequences.size()
        if self.packing_samples:
            sequences, position_ids, rolled, pad_len, indices = ring.unpad_and_slice_tensor(
                sequences, attention_mask, ring_attn_group
            )
            forward_mask = None
        else:
            rolled = torch.roll(sequences, shifts=-1, dims=1)
            forward_mask = attention_mask
            assert attention_mask is not None, "Actor.forward needs the attention_mask"
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask.eq(0), 1)
        lm = _causal_lm(self.model)
        out = lm.base_model(sequences, attention_mask=forward_mask, position_ids=position_ids)
        log_probs, entropy = head_logprobs(
            out[0], lm.get_output_embeddings(), rolled, float(self.temperature), return_entropy
        )

        def full(values: torch.Tensor) -> torch.Tensor:  # (B, seqlen - 1), as from the logits
            if self.packing_samples:
                values = ring.gather_and_pad_tensor(values, ring_attn_group, pad_len, indices, batch, seqlen)
            return values[:, :-1]

        output = CausalLMOutputWithPast(
            past_key_values=getattr(out, "past_key_values", None),
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )
        if return_entropy:
            assert return_output and entropy is not None, "Actor.forward(return_entropy=True) needs return_output=True"
            output.entropy = full(entropy)
        log_probs = full(log_probs)
        if action_mask is None:
            return (log_probs, output) if return_output else log_probs
        action_log_probs = log_probs[:, -action_mask.shape[1] :] * action_mask.float()
        return (action_log_probs, output) if return_output else action_log_probs

    return forward


def _checked_init(original: Any) -> Any:
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _check_head(self.model)  # as the actor is built, before any training step

    return __init__


def _patch(module: Any) -> None:
    wrap(module.Actor, "forward", fused_forward)
    wrap(module.Actor, "__init__", _checked_init)


def install() -> None:
    """Wrap ``Actor.forward`` in this process when ``RSPO_FUSED_LOGPROBS=1``; idempotent, a no-op otherwise.

    Imports nothing from OpenRLHF now (``openrlhf.models`` imports flash-attn): the patch is applied
    when ``openrlhf.models.actor`` is first imported, or now if it already is.

    Raises
    ------
    ValueError
        ``RSPO_FUSED_LOGPROBS`` other than ``0`` / ``1``.
    """
    if enabled():
        when_imported(_ACTOR, _patch)


def uninstall() -> None:
    """Restore OpenRLHF's own ``Actor.forward`` in this process."""
    actor = getattr(sys.modules.get(_ACTOR), "Actor", None)
    for name in ("forward", "__init__"):
        unwrap(actor, name)
