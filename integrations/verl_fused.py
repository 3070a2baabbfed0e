"""verl: ``use_fused_kernels=True`` with ``fused_kernel_options.impl_backend=rspo``.

::

    actor_rollout_ref.model.use_fused_kernels=True \\
    +actor_rollout_ref.model.fused_kernel_options.impl_backend=rspo

verl builds every actor and reference model through
``verl.models.transformers.monkey_patch.apply_monkey_patch``, which ends with
``patch_forward_with_backends(model, use_fused_kernels, fused_kernels_backend)``; that function
knows only ``triton``, ``torch`` and ``liger`` and skips anything else. :func:`register` (run by
``rspo_kernels.integrations.verl``, the plugin that verl imports in every process) extends it: for
``impl_backend=rspo`` the causal LM's ``forward`` becomes :func:`forward_with_rspo_backend`, which
returns verl's ``CausalLMOutputForPPO`` with the log-probs and entropies computed by
:func:`rspo_kernels.token_logprobs_linear` from the last hidden state and the ``lm_head`` module,
block by block, never materialising the ``(tokens, vocab)`` logits. Both outputs carry gradients
(verl subtracts ``entropy_coeff * entropy``).

The head runs as the ``lm_head`` module's own forward (forward redirection), so an FSDP2 head that
verl's ``apply_fsdp2`` shards as its own unit (untied embeddings) is unsharded and its gradient
reduce-scattered as for the logits; verl's own fused backends read ``lm_head.weight`` directly and
fail there (verl issue #7520).

Refused, naming the key: vision-language models, ``actor_rollout_ref.actor.calculate_sum_pi_squared``,
non-FSDP strategies (Megatron has its own fused path), heads that scale or cap the logits, and
per-sample temperatures.
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Any

import torch

from rspo_kernels.integrations._common import when_imported, wrap
from rspo_kernels.integrations._fused_head import head_logprobs

__all__ = [
    "BACKEND",
    "check_fused_config",
    "check_model",
    "forward_with_rspo_backend",
    "register",
]

BACKEND = "rspo"
USE_KEY = "actor_rollout_ref.model.use_fused_kernels"
BACKEND_KEY = "actor_rollout_ref.model.fused_kernel_options.impl_backend"
_SELECTED = f"{USE_KEY}=True with {BACKEND_KEY}={BACKEND}"
_FSDP_STRATEGIES = ("fsdp", "fsdp2")
# Config attributes with which a model's logits are not ``hidden @ W.T + b``.
_HEAD_SCALING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")
_MONKEY_PATCH = "verl.models.transformers.monkey_patch"


def _get(config: Any, key: str, default: Any = None) -> Any:
    getter = getattr(config, "get", None)
    return getter(key, default) if getter is not None else getattr(config, key, default)


def _selected(model_config: Any) -> bool:
    options = _get(model_config, "fused_kernel_options") or {}
    return bool(_get(model_config, "use_fused_kernels", False)) and _get(options, "impl_backend") == BACKEND


def _refusal(what: str, fix: str) -> ValueError:
    return ValueError(f"{_SELECTED} {what}; {fix}")


def _check_text_config(config: Any, source: str) -> None:
    """Refuse a vision-language model or a head that changes the logits (``config`` is an HF config or its dict)."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    if get("vision_config") is not None:
        raise _refusal(
            f"supports text-only causal LMs, but {source} is a vision-language model "
            f"(model_type={get('model_type')!r})",
            f"set {BACKEND_KEY}=torch (verl's own fused path for VLMs) or {USE_KEY}=False",
        )
    text = get("text_config")
    if text is not None:
        _check_text_config(text, source)
    for name in _HEAD_SCALING:
        value = get(name)
        if value not in (None, 1.0):
            raise _refusal(
                f"computes hidden @ lm_head.weight.T (+ bias), but {source} sets {name}={value!r}",
                f"set {USE_KEY}=False for this model",
            )


def check_fused_config(config: Any) -> None:
    """Check a whole verl trainer config that selects ``impl_backend=rspo``; a no-op otherwise.

    Runs inside verl's ``validate_config`` (before Ray starts or any model loads), next to the
    adapter's other checks.

    Parameters
    ----------
    config : omegaconf.DictConfig
        verl's trainer config.

    Raises
    ------
    ValueError
        ``actor_rollout_ref.actor.strategy`` other than ``fsdp`` / ``fsdp2``,
        ``actor_rollout_ref.actor.calculate_sum_pi_squared=True`` (needs the full logits), or a
        vision-language model or logit-scaling head at ``actor_rollout_ref.model.path`` (when the
        path is a local directory; otherwise :func:`check_model` refuses it when the model loads).
        Each message names the key to change.
    """
    aro = _get(config, "actor_rollout_ref")
    model = _get(aro, "model") if aro is not None else None
    if model is None or not _selected(model):
        return
    actor = _get(aro, "actor") or {}
    strategy = _get(actor, "strategy", "fsdp")
    if strategy not in _FSDP_STRATEGIES:
        raise _refusal(
            f"patches the FSDP engine's HuggingFace model, not actor_rollout_ref.actor.strategy={strategy}",
            f"use actor_rollout_ref.actor.strategy=fsdp2 or unset {BACKEND_KEY}",
        )
    if _get(actor, "calculate_sum_pi_squared", False):
        raise _refusal(
            "never builds the logits, which actor_rollout_ref.actor.calculate_sum_pi_squared=True needs",
            f"set actor_rollout_ref.actor.calculate_sum_pi_squared=False or {USE_KEY}=False",
        )
    path = _get(model, "hf_config_path") or _get(model, "path")
    config_file = os.path.join(os.path.expanduser(str(path)), "config.json") if path else ""
    if config_file and os.path.isfile(config_file):
        with open(config_file) as f:
            _check_text_config(json.load(f), f"actor_rollout_ref.model.path={path}")


def check_model(model: Any) -> None:
    """Refuse a model the rspo backend cannot serve, when verl patches it (the model is built, not trained).

    Raises
    ------
    ValueError
        A vision-language model, a head that scales or caps the logits, or a model without an
        ``lm_head`` module of shape ``(V, H)``; the message names :data:`BACKEND_KEY`.
    """
    config = model.config
    _check_text_config(config, f"{type(model).__name__}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise _refusal(
            f"needs a causal LM whose output embedding is an nn.Linear lm_head; {type(model).__name__} has "
            f"{type(head).__name__}",
            f"set {BACKEND_KEY}=torch or {USE_KEY}=False",
        )


def _scalar_temperature(temperature: Any) -> float:
    """verl passes one float; a tensor is accepted only if all its values agree."""
    if isinstance(temperature, torch.Tensor):
        values = temperature.detach().flatten()
        if values.numel() == 0 or not bool((values == values[0]).all()):
            raise _refusal(
                "takes one sampling temperature for the whole batch, got per-sample temperatures",
                f"sample every response at actor_rollout_ref.rollout.temperature, or set {USE_KEY}=False",
            )
        return float(values[0])
    if isinstance(temperature, numbers.Real) and not isinstance(temperature, bool):
        return float(temperature)
    raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")


def forward_with_rspo_backend(
    self: Any,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.FloatTensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
    cache_position: torch.LongTensor | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    temperature: float = 1.0,
    shift_labels: torch.LongTensor | None = None,
    **loss_kwargs: Any,
) -> Any:
    """verl's ``forward_with_torch_backend`` contract, with the head fused by rspo_kernels.

    Parameters
    ----------
    input_ids, position_ids : torch.LongTensor
        ``(1, nnz)`` with remove-padding (``position_ids`` restart at each packed sequence), or
        ``(B, T)`` padded with ``attention_mask`` ``(B, T)``.
    labels, shift_labels : torch.LongTensor, optional
        ``shift_labels`` (labels already rolled by one over the global sequence, then sliced for
        Ulysses sequence parallelism) win over ``labels``, which win over ``input_ids``; the latter two
        are rolled here, as verl does.
    temperature : float
        The rollout's sampling temperature (one value).
    return_dict : bool
        Must be True, as for verl's own fused backends.

    Returns
    -------
    verl.models.transformers.dense_common.CausalLMOutputForPPO
        ``log_probs`` and ``entropy`` shaped like the labels: float32 (float64 for a float64 model),
        both differentiable in the backbone and the head.
    """
    from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model

    if not return_dict:
        raise NotImplementedError("forward_with_rspo_backend has to return_dict, as verl's fused backends do")
    outputs = forward_base_model(
        self,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        cache_position=cache_position,
    )
    hidden = outputs[0]
    rolled: torch.Tensor
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise RuntimeError("forward_with_rspo_backend needs labels, shift_labels or input_ids")
    log_probs: Any  # verl annotates its outputs as FloatTensor
    entropy: Any
    log_probs, entropy = head_logprobs(
        hidden, self.get_output_embeddings(), rolled, _scalar_temperature(temperature), entropy=True
    )
    return CausalLMOutputForPPO(
        log_probs=log_probs,
        entropy=entropy,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )


def _patch_forward_with_backends(original: Any) -> Any:
    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if not use_fused_kernels or fused_kernels_backend != BACKEND:
            return original(model, use_fused_kernels, fused_kernels_backend)
        check_model(model)
        model._verl_fused_kernels_backend = BACKEND
        # Class-level, as verl patches its own backends (FSDP wraps the instance's class later).
        model.__class__.forward = forward_with_rspo_backend
        print(f"Using rspo_kernels backend for fused kernels in {model.__class__.__name__}")

    return patch_forward_with_backends


def register() -> None:
    """Teach verl's ``patch_forward_with_backends`` the ``rspo`` backend, in this process; idempotent.

    Imports nothing from verl now: the patch is applied when ``verl.models.transformers.monkey_patch``
    is first imported (or now if it already is), before ``apply_monkey_patch`` can run.
    """
    when_imported(
        _MONKEY_PATCH, lambda module: wrap(module, "patch_forward_with_backends", _patch_forward_with_backends)
    )
