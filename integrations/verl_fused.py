"""verl: ``use_fused_kernels=True`` with ``fused_kernel_options.impl_backend=rspo``.

::

    actor_rollout_ref.model.use_fused_kernels=True \\
    actor_rollout_ref.model.fused_kernel_options.impl_backend=rspo

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

Also served:

- ``actor_rollout_ref.actor.calculate_sum_pi_squared=True`` (``algorithm.adv_estimator=
  optimal_token_baseline``): ``sum_v softmax(z / T)_v^2`` per token from the same fused pass. verl's
  FSDP engine raises ``NotImplementedError`` for it with every fused backend; :func:`register`
  patches the engine's ``prepare_model_inputs`` / ``prepare_model_outputs`` (for the rspo forward
  only) to ask for it and to lay it out as verl does on its logits path.
- soft-capped heads (``final_logit_softcapping``, Gemma 2/3): ``c * tanh(z / c)`` before the
  temperature, as the model's own forward and verl's logits path compute it;
- heads that multiply the logits by a constant, ``s = logit_scale`` (Cohere, Cohere2) or
  ``s = 1 / logits_scaling`` (Granite): the fused op runs at temperature ``T / s``, since
  ``(z * s) / T = z / (T / s)``;
- top-k distillation (``distillation.distillation_loss.loss_mode=forward_kl_topk``): verl's FSDP
  engine reads a fused forward's ``fused_linear_aux`` but hands the teacher's top-k ids to no fused
  backend; the engine patch passes them, the forward computes the student's log-probs at them in
  the same pass as the labels', and ``prepare_model_outputs`` forms verl's ``distillation_losses``,
  ``student_mass`` and ``teacher_mass`` from them.

Refused, naming the key: vision-language models, non-FSDP strategies (Megatron has its own fused
path), heads scaled by ``output_multiplier`` / ``lm_head_multiplier`` (no model to test them on),
non-positive or non-finite head factors and soft-caps, a head that sets more than one of them,
per-sample temperatures, and top-k distillation on padded sequences
(``actor_rollout_ref.model.use_remove_padding=False``, where verl does not read ``fused_linear_aux``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import types
from typing import Any

import torch

from rspo_kernels.integrations._common import when_imported, wrap
from rspo_kernels.integrations._fused_head import head_stats

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
# Config attributes with which a model's logits are not ``hidden @ W.T + b`` and that are not served.
_HEAD_SCALING = ("output_multiplier", "lm_head_multiplier")
# Served through the temperature, ``(z * s) / T = z / (T / s)``: the factor ``s`` each one means.
_LOGIT_FACTORS = {
    "logit_scale": lambda value: value,  # Cohere, Cohere2: logits * logit_scale
    "logits_scaling": lambda value: 1.0 / value,  # Granite: logits / logits_scaling
}
_SOFTCAP = "final_logit_softcapping"  # Gemma 2/3: logits = c * tanh(z / c), before verl's temperature
_SUM_PI_SQUARED_KEY = "actor_rollout_ref.actor.calculate_sum_pi_squared"
_TOPK_KEY = "distillation.distillation_loss.loss_mode"
_MONKEY_PATCH = "verl.models.transformers.monkey_patch"
_FSDP_ENGINE = "verl.workers.engine.fsdp.transformer_impl"


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
                f"computes hidden @ lm_head.weight.T (+ bias), scaled by {' or '.join(_LOGIT_FACTORS)} or "
                f"soft-capped by {_SOFTCAP}, but {source} sets {name}={value!r}",
                f"set {USE_KEY}=False for this model",
            )
    served: dict[str, Any] = {name: get(name) for name in (*_LOGIT_FACTORS, _SOFTCAP) if get(name) is not None}
    for name, value in served.items():
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and float(value) > 0):
            raise _refusal(
                f"reads {name} as a factor of the logits (or the c of c * tanh(z / c)), which needs a finite "
                f"positive number, but {source} sets {name}={value!r}",
                f"set {name} to a positive number or null",
            )
    if len(served) > 1:
        raise _refusal(
            f"serves one of {', '.join(served)} on a head, but {source} sets {len(served)} of them",
            f"set {USE_KEY}=False for this model",
        )


def _text_attribute(config: Any, name: str) -> Any:
    """``config.name``, or ``config.text_config.name`` when the first is unset."""
    value = getattr(config, name, None)
    if value is None and getattr(config, "text_config", None) is not None:
        value = getattr(config.text_config, name, None)
    return value


def _logit_softcap(config: Any) -> float | None:
    """``final_logit_softcapping`` of an HF config; None when the head is not capped."""
    cap = _text_attribute(config, _SOFTCAP)
    return None if cap is None else float(cap)


def _logit_factor(config: Any) -> float:
    """The constant the model multiplies its logits by (:data:`_LOGIT_FACTORS`); 1.0 for none."""
    for name, factor in _LOGIT_FACTORS.items():
        value = _text_attribute(config, name)
        if value is not None:
            return float(factor(float(value)))
    return 1.0


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
        ``actor_rollout_ref.actor.strategy`` other than ``fsdp`` / ``fsdp2``, a top-k distillation
        loss (``distillation.distillation_loss.loss_mode=forward_kl_topk``) with
        ``actor_rollout_ref.model.use_remove_padding=False``, or a vision-language
        model or logit-scaling head at ``actor_rollout_ref.model.path`` (when the path is a local
        directory; otherwise :func:`check_model` refuses it when the model loads). Each message
        names the key to change. ``actor_rollout_ref.actor.calculate_sum_pi_squared=True``,
        soft-capped heads (``final_logit_softcapping``) and heads scaled by ``logit_scale`` /
        ``logits_scaling`` are served.
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
    distillation = _get(config, "distillation")
    if distillation is not None and _get(distillation, "enabled", False):
        loss_mode = _get(_get(distillation, "distillation_loss") or {}, "loss_mode", "k3")
        if _uses_topk(loss_mode) and not _get(model, "use_remove_padding", True):
            raise _refusal(_TOPK_WHY.format(value=f"{_TOPK_KEY}={loss_mode}"), _TOPK_FIX)
    path = _get(model, "hf_config_path") or _get(model, "path")
    config_file = os.path.join(os.path.expanduser(str(path)), "config.json") if path else ""
    if config_file and os.path.isfile(config_file):
        with open(config_file) as f:
            _check_text_config(json.load(f), f"actor_rollout_ref.model.path={path}")


# verl's FSDP engine reads a fused forward's distillation outputs (fused_linear_aux) on packed
# sequences only; on padded ones it would go on without them.
_REMOVE_PADDING_KEY = "actor_rollout_ref.model.use_remove_padding"
_TOPK_WHY = (
    "serves verl's fused top-k distillation outputs (fused_linear_aux) on packed sequences only, which verl "
    f"reads there only, but {{value}} runs with {_REMOVE_PADDING_KEY}=False"
)
_TOPK_FIX = f"set {_REMOVE_PADDING_KEY}=True, or {USE_KEY}=False"


def _uses_topk(loss_mode: Any) -> bool:
    """Whether verl's distillation loss ``loss_mode`` reads the student's log-probs at the teacher's top-k ids."""
    try:
        from verl.trainer.distillation.losses import get_distillation_loss_settings
    except ImportError:  # a verl without distillation: the name is all there is to go by
        return "topk" in str(loss_mode)
    try:
        return bool(get_distillation_loss_settings(str(loss_mode)).use_topk)
    except ValueError:  # an unknown loss: verl's own check reports it
        return False


def check_model(model: Any) -> None:
    """Refuse a model the rspo backend cannot serve, when verl patches it (the model is built, not trained).

    Raises
    ------
    ValueError
        A vision-language model, a head scaled by ``output_multiplier`` / ``lm_head_multiplier``, a
        ``logit_scale`` / ``logits_scaling`` / ``final_logit_softcapping`` that is not a finite
        positive number (or more than one of them), or a model without an ``lm_head``
        module of shape ``(V, H)``; the message names :data:`BACKEND_KEY`.
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


@functools.cache
def _output_class() -> Any:
    """verl's ``CausalLMOutputForPPO`` with a ``sum_pi_squared`` field (built when verl is first needed)."""
    from verl.models.transformers.dense_common import CausalLMOutputForPPO

    @dataclasses.dataclass
    class CausalLMOutputForRSPO(CausalLMOutputForPPO):
        sum_pi_squared: torch.FloatTensor | None = None
        teacher_topk_student_log_probs: torch.FloatTensor | None = None
        fused_linear_aux: Any = None  # set by the engine patch from the field above

    return CausalLMOutputForRSPO


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
    return_sum_pi_squared: bool = False,
    teacher_topk_ids: torch.LongTensor | None = None,
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
    return_sum_pi_squared : bool
        Also compute ``sum_v softmax(z / T)_v^2`` per token (verl's ``calculate_sum_pi_squared``);
        the engine patch of :func:`register` asks for it.
    teacher_topk_ids : torch.LongTensor, optional
        ``labels.shape + (K,)``: a teacher's top-k token ids (verl's top-k distillation; the engine
        patch passes them). The student's log-probs at these ids, differentiable, are returned
        as ``teacher_topk_student_log_probs``, from the same pass as the labels' (``K + 1``
        targets per token).

    Returns
    -------
    CausalLMOutputForPPO
        verl's output class with one more field: ``log_probs`` and ``entropy`` shaped like the
        labels, float32 (float64 for a float64 model), both differentiable in the backbone and the
        head; ``sum_pi_squared`` (same shape and dtype, detached) when asked for, else None;
        ``teacher_topk_student_log_probs`` ``(..., K)`` with ``teacher_topk_ids``, else None. The
        logits are the model's own: ``hidden @ W.T (+ b)``, soft-capped when the config sets
        ``final_logit_softcapping`` (Gemma 2/3) or scaled by ``logit_scale`` (Cohere) /
        ``logits_scaling`` (Granite), divided by the temperature.
    """
    from verl.models.transformers.dense_common import forward_base_model

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
    targets = rolled if teacher_topk_ids is None else torch.cat([rolled.unsqueeze(-1), teacher_topk_ids], dim=-1)
    stats = head_stats(
        hidden,
        self.get_output_embeddings(),
        targets,
        _scalar_temperature(temperature) / _logit_factor(self.config),  # (z * s) / T = z / (T / s)
        entropy=True,
        sum_pi_squared=return_sum_pi_squared,
        logit_softcap=_logit_softcap(self.config),
    )
    log_probs, teacher_topk = stats.log_probs, None
    if teacher_topk_ids is not None:
        log_probs, teacher_topk = log_probs[..., 0], log_probs[..., 1:]
    return _output_class()(
        log_probs=log_probs,
        entropy=stats.entropy,
        sum_pi_squared=stats.sum_pi_squared,
        teacher_topk_student_log_probs=teacher_topk,
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


def _flag(micro_batch: Any, key: str, default: bool) -> bool:
    from verl.utils import tensordict_utils as tu

    return bool(tu.get_non_tensor_data(data=micro_batch, key=key, default=default))


def _rspo_serves(engine: Any, micro_batch: Any) -> bool:
    """Whether this micro-batch runs through :func:`forward_with_rspo_backend` (FSDP1 forwards the attribute)."""
    backend = getattr(getattr(engine, "module", None), "_verl_fused_kernels_backend", None)
    return backend == BACKEND and _flag(micro_batch, "use_fused_kernels", False)


def _local_tokens(engine: Any, nested: torch.Tensor) -> torch.Tensor:
    """A nested ``(B, j, K)`` teacher tensor as the packed ``(1, local tokens, K)`` this rank's forward
    sees: Ulysses-sliced along the tokens as verl slices ``input_ids`` (padded to a multiple of
    the group), as verl's VeOmni engine slices the same tensors."""
    packed = nested.values().unsqueeze(0)
    if getattr(engine, "use_ulysses_sp", False):
        from verl.utils.ulysses import slice_input_tensor

        packed = slice_input_tensor(packed, dim=1, padding=True)
    return packed


def _patch_prepare_model_inputs(original: Any) -> Any:
    def prepare_model_inputs(self, micro_batch):
        model_inputs, output_args = original(self, micro_batch)
        if not _rspo_serves(self, micro_batch):
            return model_inputs, output_args
        if _flag(micro_batch, "calculate_sum_pi_squared", False):
            model_inputs["return_sum_pi_squared"] = True  # keywords of forward_with_rspo_backend
        if _flag(micro_batch, "distillation_use_topk", False):
            if not _flag(micro_batch, "use_remove_padding", True):
                raise _refusal(_TOPK_WHY.format(value="distillation_use_topk=True"), _TOPK_FIX)
            missing = [key for key in ("teacher_ids", "teacher_logprobs") if key not in micro_batch.keys()]
            if missing:
                raise RuntimeError(
                    f"{_SELECTED}: the micro-batch says distillation_use_topk=True but has no {' or '.join(missing)}"
                )
            model_inputs["teacher_topk_ids"] = _local_tokens(self, micro_batch["teacher_ids"]).long()
        return model_inputs, output_args

    return prepare_model_inputs


def _topk_distillation(output: Any, micro_batch: Any, engine: Any, loss_function: Any) -> Any:
    """verl's top-k distillation outputs (``distillation_losses``, ``student_mass``, ``teacher_mass``)
    from the student's log-probs at the teacher's top-k ids.

    The definition is verl's ``verl.trainer.distillation.fsdp.losses.compute_forward_kl_topk``, which
    forms them from the logits and against which tests/test_fused_verl.py checks these: the masses
    ``sum_k exp(log p_k)`` first, then verl's ``kl_divergence`` after clamping both sides at
    ``distillation.distillation_loss.log_prob_min_clamp``. Each is ``(1, local tokens)``.
    """
    from verl.trainer.distillation.fsdp.losses import kl_divergence

    student = output.teacher_topk_student_log_probs
    # The engine's worker builds its loss as partial(distillation_ppo_loss, config=..., distillation_config=...).
    config = getattr(loss_function, "keywords", {}).get("distillation_config")
    if student is None or config is None:
        raise RuntimeError(
            f"{_SELECTED}: top-k distillation needs the teacher's ids in the forward and verl's "
            "distillation_config in the engine's loss function; got "
            f"{'no' if student is None else 'the'} student log-probs and loss function {loss_function!r}"
        )
    teacher = _local_tokens(engine, micro_batch["teacher_logprobs"])
    student_mass, teacher_mass = student.exp().sum(dim=-1), teacher.exp().sum(dim=-1)
    clamp = config.distillation_loss.log_prob_min_clamp
    if clamp is not None:
        student, teacher = student.clamp_min(clamp), teacher.clamp_min(clamp)
    return types.SimpleNamespace(
        distillation_losses=kl_divergence(log_q=student, log_p=teacher),
        student_mass=student_mass,
        teacher_mass=teacher_mass,
    )


def _patch_prepare_model_outputs(original: Any) -> Any:
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        if not _rspo_serves(self, micro_batch):
            return original(self, output, output_args, micro_batch, logits_processor_func)
        if _flag(micro_batch, "distillation_use_topk", False):
            output.fused_linear_aux = _topk_distillation(output, micro_batch, self, logits_processor_func)
        if not _flag(micro_batch, "calculate_sum_pi_squared", False):
            return original(self, output, output_args, micro_batch, logits_processor_func)
        sum_pi_squared = getattr(output, "sum_pi_squared", None)
        if sum_pi_squared is None:
            raise RuntimeError(
                f"{_SELECTED}: the model's forward returned no sum_pi_squared although "
                f"{_SUM_PI_SQUARED_KEY}=True; was {type(self).__name__}.prepare_model_inputs replaced after "
                "rspo_kernels.integrations.verl registered its patch?"
            )
        from verl.utils import tensordict_utils as tu

        # verl's method raises for Σπ² with any fused backend; it does everything else unchanged.
        tu.assign_non_tensor(micro_batch, calculate_sum_pi_squared=False)
        try:
            model_output = original(self, output, output_args, micro_batch, logits_processor_func)
        finally:
            tu.assign_non_tensor(micro_batch, calculate_sum_pi_squared=True)
        model_output["sum_pi_squared"] = _nested_like_log_probs(self, sum_pi_squared, output_args, micro_batch)
        return model_output

    return prepare_model_outputs


def _nested_like_log_probs(engine: Any, values: torch.Tensor, output_args: dict, micro_batch: Any) -> torch.Tensor:
    """One per-token output of the fused forward laid out as verl's method lays out ``log_probs``.

    Remove-padding: ``(1, local tokens)`` gathered over the Ulysses group and stripped of the
    packed pad; padded: ``(B, T)`` with each row's first ``len`` columns kept. Then nested (jagged)
    on the batch's ``input_ids`` offsets.
    """
    cu_seqlens = micro_batch["input_ids"].offsets()
    if _flag(micro_batch, "use_remove_padding", True):
        flat = engine._gather_and_unpad_packed(values.squeeze(0), output_args["pad_size"])
    else:
        columns = torch.arange(values.shape[1], device=values.device)
        flat = values[columns < cu_seqlens.diff().to(values.device).unsqueeze(1)]
    return torch.nested.nested_tensor_from_jagged(flat, cu_seqlens)


def _patch_fsdp_engine(module: Any) -> None:
    engine = getattr(module, "FSDPEngineWithLMHead", None)
    if engine is None:  # another verl: nothing to adapt
        return
    wrap(engine, "prepare_model_inputs", _patch_prepare_model_inputs)
    wrap(engine, "prepare_model_outputs", _patch_prepare_model_outputs)


def register() -> None:
    """Teach verl the ``rspo`` backend, in this process; idempotent.

    Two patches, each applied when its verl module is first imported (or now if it already is),
    so that nothing is imported from verl here:

    - ``verl.models.transformers.monkey_patch.patch_forward_with_backends``: for
      ``impl_backend=rspo`` the causal LM's ``forward`` becomes :func:`forward_with_rspo_backend`
      (verl knows only its own backends and skips any other name);
    - ``verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead``'s
      ``prepare_model_inputs`` / ``prepare_model_outputs``, only for a micro-batch that runs through
      the rspo forward: with ``calculate_sum_pi_squared`` the first asks the forward for
      ``sum_pi_squared`` and the second, instead of raising verl's ``NotImplementedError`` for
      fused kernels, runs verl's method without Σπ² and adds the forward's Σπ² laid out as verl
      lays out ``log_probs`` (gathered over Ulysses, unpadded, nested); with top-k distillation
      (``distillation_use_topk``) the first passes the teacher's ids to the forward and the second
      sets the ``fused_linear_aux`` that verl's method reads. Other backends and engines call
      verl's methods unchanged.
    """
    when_imported(
        _MONKEY_PATCH, lambda module: wrap(module, "patch_forward_with_backends", _patch_forward_with_backends)
    )
    when_imported(_FSDP_ENGINE, _patch_fsdp_engine)
