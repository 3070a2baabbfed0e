"""The RSPO loss from hidden states and the ``lm_head``.

``rspo_linear_loss``, ``token_logprobs_linear``, ``RSPOLinearLoss``.

``logits = (hidden @ lm_head.weight.T + bias) / temperature`` is never materialised for all tokens.
Two routes, chosen per call:

- one pass (:class:`~rspo_kernels.loss.linear_fused.LinearFusedLoss`): a token-local policy loss
  whose gradients are wanted, in eager autograd, forms them block by block during the forward from
  the registry's per-token ``dL/dlogp`` and ``dL/dentropy``
  (:func:`~rspo_kernels.loss.policy.token_grads`) and only scales them in backward: three
  ``N x V x H`` matmuls;
- two passes (:class:`~rspo_kernels.loss.linear_chunked.LinearTokenLogprobs`): the log-probs block
  by block, each block recomputed in backward (four matmuls), then autograd through
  :func:`~rspo_kernels.loss.policy.policy_loss`. It serves ``token_logprobs_linear``, losses that
  are not token-local, ``tp_group``, ``no_grad``, ``torch.func`` and ``torch.compile``.

Inputs are validated here, once, and normalised into the same
:class:`~rspo_kernels.loss.layout.TokenBatch` as the logits loss; the loss algebra is the policy-loss
registry's (:mod:`rspo_kernels.loss.policy`), shared with :func:`rspo_kernels.rspo_loss`.
``RSPO_KERNELS_BACKEND=reference`` computes the logits unfused instead (for debugging, and for
second derivatives).

The head is given either as its weight tensor or as the module that owns it (``nn.Linear``, an
FSDP2 ``fully_shard``-ed or a DeepSpeed ZeRO-3 partitioned one). A module's fused op runs as that
module's forward (:func:`rspo_kernels.distributed.forward_redirect`), so the sharding hooks gather its
parameters in forward and backward and reduce its gradients as they would for the logits.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, TypeAlias, overload

import torch
from torch import nn

import rspo_kernels.loss._checks as _checks
from rspo_kernels._dispatch import implementation
from rspo_kernels.distributed import forward_redirect, is_dtensor, is_zero3_param
from rspo_kernels.loss.api import RSPOLoss, _validate_loss_inputs, check_generator, global_batch
from rspo_kernels.loss.layout import TokenBatch, compute_dtype, token_batch
from rspo_kernels.loss.linear_chunked import linear_token_logprobs
from rspo_kernels.loss.linear_fused import fused_linear_loss, use_one_pass
from rspo_kernels.loss.options import LossOptions
from rspo_kernels.loss.policy import policy_loss
from rspo_kernels.loss.softcap import check_softcap
from rspo_kernels.loss.token_stats import (
    TokenStats,
    check_target_ids,
    check_topk,
    linear_token_stats,
    shape_stats,
    token_stats,
    topk_bound,
)
from rspo_kernels.loss.vocab_parallel import VocabShard, id_bound, vocab_shard

__all__ = ["RSPOLinearLoss", "rspo_linear_loss", "rspo_linear_loss_with_options", "token_logprobs_linear"]

Head: TypeAlias = "torch.Tensor | nn.Module"
_PASS_MODULE = (
    "pass the module that owns it instead (model.lm_head, tied or not), so the fused op runs as that "
    "module's forward and its sharding hooks gather the weight and reduce its gradient"
)


def _check_not_sharded(weight: Any, bias: Any) -> None:
    """A bare weight or bias is a whole local tensor, not a DTensor (FSDP2, tensor parallel) or a ZeRO-3 parameter."""
    for name, x in (("lm_head", weight), ("bias", bias)):
        if is_dtensor(x):
            raise ValueError(
                f"{name} is a DTensor (placements {tuple(x.placements)}): outside its module's forward an FSDP2 "
                f"parameter is a shard, and .full_tensor() would leave its gradient unreduced; {_PASS_MODULE}. "
                "For a vocab-parallel (tensor-parallel) shard pass its .to_local() rows with tp_group= and vocab_start="
            )
        if is_zero3_param(x):
            raise ValueError(
                f"{name} is a DeepSpeed ZeRO-3 partitioned parameter (shape {tuple(x.ds_shape)}, {x.numel()} "
                f"elements held here, status {x.ds_status.name}): it is gathered only inside its module's forward "
                f"and the backward recomputes with it; {_PASS_MODULE}"
            )


# Modules whose forward hooks on the head are the data-parallel wrappers' own: FSDP2's fully_shard
# (bound methods of its FSDPState, or its group hooks) and DeepSpeed ZeRO-3's gather / release
# hooks. They move parameters, never change the output, and must see the fused op run.
_WRAPPER_HOOK_MODULES = ("torch.distributed.", "deepspeed.")


def _hook_origin(hook: Any) -> str:
    """The module that defined ``hook`` (through ``functools.partial`` and bound methods)."""
    fn = hook
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    return str(getattr(fn, "__module__", None) or getattr(type(fn), "__module__", ""))


def _foreign_forward_hooks(module: nn.Module) -> list[str]:
    """The forward (pre-)hooks on ``module`` that are not a data-parallel wrapper's own, by name."""
    found = []
    for kind, hooks in (("forward pre-hook", module._forward_pre_hooks), ("forward hook", module._forward_hooks)):
        for hook in hooks.values():
            if not _hook_origin(hook).startswith(_WRAPPER_HOOK_MODULES):
                found.append(f"{kind} {getattr(hook, '__qualname__', type(hook).__name__)}")
    return found


def _check_head_forward(module: nn.Module) -> None:
    """``module`` computes exactly ``nn.Linear``'s ``hidden @ weight.T + bias``; else ValueError naming its type.

    The fused op reads the parameters and never calls the module's own forward, so an overridden
    forward (mup's ``MuReadout``, a logit scale or soft-cap) or an output-changing forward hook
    would be skipped silently.
    """
    name = type(module).__name__
    fix = (
        "The fused op computes hidden @ weight.T + bias from the parameters and would skip it. Pass the weight "
        "tensor and apply the transform to it or to hidden yourself (e.g. a logit scale s: pass hidden * s; a "
        "final-logit soft-cap c: pass logit_softcap=c), or compute the logits and use rk.rspo_loss"
    )
    forward = type(module).forward
    if forward is not nn.Linear.forward or "forward" in module.__dict__:
        where = "an instance forward" if "forward" in module.__dict__ else f"its own forward {forward.__qualname__}"
        raise ValueError(f"lm_head module {name} has {where}, not nn.Linear.forward. {fix}")
    hooks = _foreign_forward_hooks(module)
    if hooks:
        raise ValueError(
            f"lm_head module {name} carries {', '.join(hooks)}, which may change its output (only FSDP2's and "
            f"DeepSpeed ZeRO-3's own hooks are run with the fused op). {fix}; or remove the hooks"
        )


def _check_head_module(hidden: torch.Tensor, module: nn.Module, bias: Any) -> int:
    """``module`` computes ``hidden @ weight.T + bias`` from its own parameters; returns its vocabulary size V.

    Only the global shape is checked here: dtype and device are those of the gathered parameters,
    known inside the module's forward (FSDP2 mixed precision casts both weight and hidden there).
    """
    if bias is not None:
        raise ValueError(
            f"bias= must not be given with an lm_head module ({type(module).__name__}): the bias is the "
            "module's own (module.bias; None for nn.Linear(..., bias=False))"
        )
    names = [n for n, _ in module.named_parameters()]
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not set(names) <= {"weight", "bias"}:
        raise TypeError(
            f"an lm_head module must compute hidden @ weight.T + bias from its own weight (and bias) parameters, "
            f"like nn.Linear; {type(module).__name__} has parameters {names}. Pass its weight tensor and "
            "apply the rest yourself"
        )
    _check_head_forward(module)
    shape = tuple(getattr(weight, "ds_shape", weight.shape))
    H = hidden.shape[-1]
    if len(shape) != 2 or shape[1] != H or shape[0] == 0:
        raise ValueError(
            f"lm_head.weight must be (V, H) = (vocab, {H}) to match hidden's last dimension H={H}, got shape {shape}"
        )
    return shape[0]


def _module_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module``'s weight and bias inside its forward, where its sharding hooks have gathered them."""
    weight, bias = module.weight, getattr(module, "bias", None)
    x: Any
    for name, x in (("weight", weight), ("bias", bias)):
        if is_dtensor(x):
            raise ValueError(
                f"lm_head.{name} is still a DTensor (placements {tuple(x.placements)}) inside its module's forward: "
                "a tensor-parallel placement, not FSDP2's. Pass its .to_local() rows with tp_group= and "
                "vocab_start= (docs/tensor-parallel.md)"
            )
        if isinstance(x, torch.Tensor) and is_zero3_param(x) and x.numel() == 0:
            raise RuntimeError(
                f"lm_head.{name} is an empty ZeRO-3 placeholder inside its module's forward: DeepSpeed did not "
                "gather it. Compute the loss inside the engine's forward, forward_redirect(engine, fn, ...), with "
                "lm_head a module of the model given to deepspeed.initialize (docs/distributed.md)"
            )
    assert isinstance(weight, torch.Tensor)
    return weight, bias


def _check_lm_head(hidden: torch.Tensor, lm_head: Any, bias: Any) -> int:
    """The public ``lm_head`` (a weight tensor or the module owning it) and ``bias``; returns the vocabulary size."""
    if isinstance(lm_head, nn.Module):
        return _check_head_module(hidden, lm_head, bias)
    _check_not_sharded(lm_head, bias)
    _check_head(hidden, lm_head, bias)
    return int(lm_head.shape[0])


def _check_head(hidden: torch.Tensor, weight: Any, bias: Any) -> None:
    """``weight`` ``(V, H)`` and ``bias`` ``(V,)`` agree with ``hidden`` in size, dtype and device."""
    H = hidden.shape[-1]
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            "lm_head must be a torch.Tensor (lm_head.weight) or the torch.nn.Module owning it, "
            f"got {type(weight).__name__}"
        )
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(
            f"lm_head must be (V, H) = (vocab, {H}) to match hidden's last dimension H={H}, got shape "
            f"{tuple(weight.shape)} (pass lm_head.weight, not its transpose)"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"lm_head is {weight.dtype} but hidden is {hidden.dtype}; cast one to the other "
            "(e.g. hidden.to(lm_head.weight.dtype)) so the logits are computed in one dtype"
        )
    if weight.device != hidden.device:
        raise ValueError(f"lm_head is on {weight.device} but hidden is on {hidden.device}; move them together")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (V,) = ({weight.shape[0]},) like lm_head's rows, got {tuple(bias.shape)}")
    if bias.dtype != hidden.dtype:
        raise TypeError(f"bias is {bias.dtype} but hidden is {hidden.dtype}; cast it with bias.to(hidden.dtype)")
    if bias.device != hidden.device:
        raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}; move them together")


def _check_blocks(chunk_rows: Any, vocab_block: Any) -> None:
    for name, v in (("chunk_rows", chunk_rows), ("vocab_block", vocab_block)):
        _checks.check_block_size(name, v)  # numpy integers pass, as for k


def _logprobs(
    hidden3: torch.Tensor,
    weight: Head,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    live: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    chunk_rows: int | None,
    vocab_block: int | None,
    shard: VocabShard | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat ``(N,)`` log-probs (and entropies) of ``(B, T, H)`` hidden states, blocked or, when forced, unfused.

    A head module is called on ``hidden3`` with this computation as its forward, so its hooks see
    the hidden states go in and the log-probs come out as they would see logits.
    """
    if isinstance(weight, nn.Module):
        module = weight

        def fused(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            w, b = _module_parts(module)
            _check_head(h, w, b)
            return _logprobs(h, w, b, ids, live, temperature, with_entropy, chunk_rows, vocab_block, shard, softcap)

        return forward_redirect(module, fused, hidden3)
    backend, reference = implementation("token_logprobs", hidden3.device.type, hidden3.dtype)
    if backend == "reference" and shard is not None:
        raise NotImplementedError(
            "RSPO_KERNELS_BACKEND=reference computes one process's unfused logits: it does not support tp_group, "
            "vocab_start or vocab_size. Unset it to use the fused-linear path."
        )
    if backend == "reference":
        cdt = compute_dtype(hidden3.dtype)
        # Dead rows may hold NaN: 0 * NaN in dW = G^T hidden would leak it, so they become zeros.
        h = torch.where(live.view(hidden3.shape[:-1]).unsqueeze(-1), hidden3, torch.zeros((), dtype=hidden3.dtype))
        logits = torch.nn.functional.linear(h.to(cdt), weight.to(cdt), None if bias is None else bias.to(cdt))
        return reference(logits, ids, live, temperature=temperature, with_entropy=with_entropy, softcap=softcap)
    return linear_token_logprobs(
        hidden3,
        weight,
        bias,
        ids,
        live,
        temperature=temperature,
        with_entropy=with_entropy,
        chunk_rows=chunk_rows,
        vocab_block=vocab_block,
        shard=shard,
        softcap=softcap,
    )


def _one_pass(hidden3: torch.Tensor, head: Head, bias: torch.Tensor | None, options: LossOptions) -> bool:
    """Whether the loss takes the one-pass route (:mod:`rspo_kernels.loss.linear_fused`).

    A token-local loss whose gradients are wanted, in eager autograd, with the fused backend
    (``RSPO_KERNELS_BACKEND=reference`` computes the unfused logits instead, for second derivatives).
    """
    params = tuple(head.parameters()) if isinstance(head, nn.Module) else (head, bias)
    if not use_one_pass(options, (hidden3, *params)):
        return False
    backend, _ = implementation("token_logprobs", hidden3.device.type, hidden3.dtype)
    return backend != "reference"


def _fused_loss(
    hidden3: torch.Tensor,
    head: Head,
    bias: torch.Tensor | None,
    batch: TokenBatch,
    options: LossOptions,
    with_entropy: bool,
    chunk_rows: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The one-pass loss and the detached ``(N,)`` log-probs (entropies); a head module's forward when given one."""
    if isinstance(head, nn.Module):
        module = head

        def fused(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            w, b = _module_parts(module)
            _check_head(h, w, b)
            return fused_linear_loss(h, w, b, batch, options, with_entropy=with_entropy, chunk_rows=chunk_rows)

        return forward_redirect(module, fused, hidden3)
    return fused_linear_loss(hidden3, head, bias, batch, options, with_entropy=with_entropy, chunk_rows=chunk_rows)


def _stats(
    hidden3: torch.Tensor,
    weight: Head,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    live: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    sum_pi2: bool,
    topk: int | None,
    softcap: float | None,
    chunk_rows: int | None,
    vocab_block: int | None,
    shard: VocabShard | None,
) -> TokenStats:
    """Flat :class:`TokenStats` (multi-target ``(N, K)`` ids) of ``(B, T, H)`` hidden states; see :func:`_logprobs`."""
    if isinstance(weight, nn.Module):
        module = weight

        def fused(h: torch.Tensor) -> tuple[torch.Tensor, ...]:
            w, b = _module_parts(module)
            _check_head(h, w, b)
            st = _stats(
                h, w, b, ids, live, temperature, with_entropy, sum_pi2, topk, softcap, chunk_rows, vocab_block, shard
            )
            # Plain tensors through the module's forward (wrappers walk its outputs): None -> empty.
            return tuple(h.new_empty(0) if v is None else v for v in st)

        out = forward_redirect(module, fused, hidden3)
        _, e_ok, q_ok, k_ok, _ = _asked(with_entropy, sum_pi2, topk)
        return TokenStats(
            out[0],
            out[1] if e_ok else None,
            out[2] if q_ok else None,
            out[3] if k_ok else None,
            out[4] if k_ok else None,
        )
    backend, _ = implementation("token_logprobs", hidden3.device.type, hidden3.dtype)
    if backend == "reference":
        if shard is not None:
            raise NotImplementedError(
                "RSPO_KERNELS_BACKEND=reference computes one process's unfused logits: it does not support "
                "tp_group, vocab_start or vocab_size. Unset it to use the fused-linear path."
            )
        cdt = compute_dtype(hidden3.dtype)
        h = torch.where(live.view(hidden3.shape[:-1]).unsqueeze(-1), hidden3, torch.zeros((), dtype=hidden3.dtype))
        logits = torch.nn.functional.linear(h.to(cdt), weight.to(cdt), None if bias is None else bias.to(cdt))
        return token_stats(
            logits,
            ids,
            live,
            temperature=temperature,
            with_entropy=with_entropy,
            sum_pi2=sum_pi2,
            topk=topk,
            softcap=softcap,
        )
    return linear_token_stats(
        hidden3,
        weight,
        bias,
        ids,
        live,
        temperature=temperature,
        with_entropy=with_entropy,
        sum_pi2=sum_pi2,
        topk=topk,
        softcap=softcap,
        shard=shard,
        chunk_rows=chunk_rows,
        vocab_block=vocab_block,
    )


def _asked(with_entropy: bool, sum_pi2: bool, topk: int | None) -> tuple[bool, ...]:
    return (True, with_entropy, sum_pi2, topk is not None, topk is not None)


@overload
def token_logprobs_linear(
    hidden: torch.Tensor,
    lm_head: Head,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = ...,
    temperature: float = ...,
    return_entropy: bool = ...,
    mask: torch.Tensor | None = ...,
    chunk_rows: int | None = ...,
    vocab_block: int | None = ...,
    tp_group: Any = ...,
    vocab_start: int = ...,
    vocab_size: int | None = ...,
    sequence_parallel: bool = ...,
    logit_softcap: float | None = ...,
    return_sum_pi_squared: Literal[False] = ...,
    topk: None = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


@overload
def token_logprobs_linear(
    hidden: torch.Tensor,
    lm_head: Head,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = ...,
    temperature: float = ...,
    return_entropy: bool = ...,
    mask: torch.Tensor | None = ...,
    chunk_rows: int | None = ...,
    vocab_block: int | None = ...,
    tp_group: Any = ...,
    vocab_start: int = ...,
    vocab_size: int | None = ...,
    sequence_parallel: bool = ...,
    logit_softcap: float | None = ...,
    return_sum_pi_squared: Literal[True],
    topk: int | None = ...,
) -> TokenStats: ...


@overload
def token_logprobs_linear(
    hidden: torch.Tensor,
    lm_head: Head,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = ...,
    temperature: float = ...,
    return_entropy: bool = ...,
    mask: torch.Tensor | None = ...,
    chunk_rows: int | None = ...,
    vocab_block: int | None = ...,
    tp_group: Any = ...,
    vocab_start: int = ...,
    vocab_size: int | None = ...,
    sequence_parallel: bool = ...,
    logit_softcap: float | None = ...,
    return_sum_pi_squared: bool = ...,
    topk: int,
) -> TokenStats: ...


@overload
def token_logprobs_linear(
    hidden: torch.Tensor,
    lm_head: Head,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = ...,
    temperature: float = ...,
    return_entropy: bool = ...,
    mask: torch.Tensor | None = ...,
    chunk_rows: int | None = ...,
    vocab_block: int | None = ...,
    tp_group: Any = ...,
    vocab_start: int = ...,
    vocab_size: int | None = ...,
    sequence_parallel: bool = ...,
    logit_softcap: float | None = ...,
    return_sum_pi_squared: bool = ...,
    topk: int | None = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | TokenStats: ...


def token_logprobs_linear(
    hidden: torch.Tensor,
    lm_head: Head,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    vocab_block: int | None = None,
    tp_group: Any = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    sequence_parallel: bool = False,
    logit_softcap: float | None = None,
    return_sum_pi_squared: bool = False,
    topk: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | TokenStats:
    """Log-probabilities of ``target_ids`` under ``softmax((hidden @ W.T + bias) / temperature)``.

    The logits are computed block by block and never exist for all tokens at once. Unlike
    :func:`rspo_kernels.token_logprobs`, the result is differentiable in ``hidden``, the
    head's weight and ``bias`` (the backward recomputes the blocks), so a custom actor can
    feed it to its own policy loss.

    Parameters
    ----------
    hidden : torch.Tensor
        ``(B, T, H)`` padded or ``(N, H)`` packed last hidden states (after the final norm);
        float16, bfloat16, float32 or float64. Strided views such as ``hidden[:, :-1]`` are read
        row by row, never copied whole.
    lm_head : torch.Tensor or torch.nn.Module
        The ``(V, H)`` weight (``lm_head.weight``; may be tied to the input embedding), the dtype
        and device of ``hidden``; or the module that owns it (``nn.Linear``, possibly FSDP2
        ``fully_shard``-ed or ZeRO-3 partitioned): the op then runs as that module's forward and
        the bias is the module's. Pass the module whenever the weight is sharded.
    target_ids : torch.Tensor
        ``hidden.shape[:-1]`` integer ids in ``[0, V)`` (wherever ``mask`` is nonzero); or
        ``hidden.shape[:-1] + (K,)`` multi-target ids, giving ``(..., K)`` differentiable log-probs
        (as in :func:`rspo_kernels.token_logprobs`).
    bias : torch.Tensor, optional
        ``(V,)`` output bias, with a weight tensor only.
    temperature : float, default 1.0
        Divides the logits (use the sampling temperature).
    return_entropy : bool, default False
        Also return each token's entropy, differentiable like the log-probs (its gradient,
        ``-p (x - E_p[x]) / temperature`` per logit, is formed in the same recomputing backward).
    mask : torch.Tensor, optional
        ``hidden.shape[:-1]``; tokens where it is 0 are skipped (log-prob 0, zero gradient) and
        may hold any id and any hidden state.
    chunk_rows, vocab_block : int, optional
        Block shape (tokens x vocabulary entries) of the logits; by default about 8 MiB of
        float32 on a CPU (512 x 4096) and 256 MiB on a GPU.
    tp_group : torch.distributed.ProcessGroup, optional
        Vocabulary-parallel head (Megatron's ``ColumnParallelLinear``): ``lm_head_weight`` (and
        ``bias``) hold this rank's rows ``[vocab_start, vocab_start + V_local)``; ``hidden`` and the
        global ``target_ids`` are the same on every rank of the group. The outputs are the
        full-vocabulary ones on every rank; the weight's gradient is this slice's, and ``hidden``'s
        gradient is all-reduced over the group (docs/tensor-parallel.md).
    vocab_start : int, default 0
        Global index of the first local row.
    vocab_size : int, optional
        Real vocabulary size of a padded vocabulary: rows at global index ``>= vocab_size`` are
        masked (probability 0, gradient 0).
    sequence_parallel : bool, default False
        Megatron's sequence parallelism: ``hidden`` is the all-gathered sequence, whose backward
        reduce-scatters; ``hidden``'s gradient is then returned unreduced (this slice's share).
    logit_softcap : float, optional
        Final-logit soft-capping ``z -> c * tanh(z / c)`` of ``z = hidden @ W.T + bias`` before the
        temperature (Gemma 2/3), with its gradient; see :func:`rspo_kernels.token_logprobs`.
    return_sum_pi_squared : bool, default False
        Also return ``sum_v softmax(x)_v^2`` per token (detached).
    topk : int, optional
        Also return the ``topk`` largest log-probs per token and their (global) ids (detached).

    Returns
    -------
    torch.Tensor or tuple of torch.Tensor or TokenStats
        ``target_ids.shape`` float32 log-probabilities (float64 for float64 inputs), and the
        entropies when asked; with ``return_sum_pi_squared`` or ``topk`` a :class:`TokenStats`
        (None where not asked; masked tokens hold 0 everywhere, ids included). Multi-target ids
        and the statistics run one blocked pass of their own
        (:class:`rspo_kernels.loss.token_stats.StatsLinearLogprobs`).

    Raises
    ------
    TypeError
        Non-tensor inputs, non-float ``hidden``, a weight or bias of another dtype, a head module
        with parameters other than ``weight`` and ``bias``.
    ValueError
        Mismatched shapes or devices, ``temperature <= 0``, ids out of range (checked on CPU; on a
        GPU an out-of-range id gives NaN), ``bias`` given with a module, a DTensor or ZeRO-3
        parameter given as the bare weight (pass its module), a head module whose forward is not
        ``nn.Linear.forward`` (a subclass such as mup's ``MuReadout``) or that carries forward hooks
        other than FSDP2's and DeepSpeed ZeRO-3's own (the fused op would skip them), ``vocab_size``
        above the rows given without ``tp_group``.

    Notes
    -----
    Logits are accumulated in float32 for float16 / bfloat16 inputs. Each block is recomputed in
    backward, so the op costs one more ``N x V x H`` matmul than an unfused linear layer (see
    :mod:`rspo_kernels.loss.linear_chunked`). ``create_graph=True`` raises in backward; use
    ``RSPO_KERNELS_BACKEND=reference`` for second derivatives.

    Examples
    --------
    >>> import torch, rspo_kernels as rk
    >>> hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> W = torch.tensor([[0.0, 0.0], [0.0, 2.0]])  # logits [0, 0] and [0, 2]
    >>> rk.token_logprobs_linear(hidden, W, torch.tensor([0, 1]))
    tensor([-0.6931, -0.1269])
    >>> head = torch.nn.Linear(2, 2, bias=False)  # the module: its forward runs the op
    >>> _ = head.weight.data.copy_(W)
    >>> rk.token_logprobs_linear(hidden, head, torch.tensor([0, 1]))
    tensor([-0.6931, -0.1269], grad_fn=<ViewBackward0>)
    """
    _checks.check_logits("hidden", hidden)
    K = check_target_ids(target_ids, tuple(hidden.shape[:-1]), hidden.device)
    vocab = _check_lm_head(hidden, lm_head, bias)
    _check_blocks(chunk_rows, vocab_block)
    return_entropy = _checks.check_flag("return_entropy", return_entropy)
    return_sum_pi_squared = _checks.check_flag("return_sum_pi_squared", return_sum_pi_squared)
    softcap = check_softcap(logit_softcap)
    temperature = LossOptions(temperature=temperature).temperature
    if mask is not None:
        _checks.check_token_tensor("mask", mask, tuple(hidden.shape[:-1]), hidden.device, floating=False)
    V_local = vocab
    shard = vocab_shard(tp_group, vocab_start, vocab_size, sequence_parallel, V_local)
    _checks.check_ids_in_range(target_ids, id_bound(vocab_size, tp_group, V_local), mask)
    topk = check_topk(topk, topk_bound(vocab_size, tp_group, V_local))
    hidden3 = hidden.unsqueeze(0) if hidden.dim() == 2 else hidden
    shape = tuple(target_ids.shape)
    token_shape = tuple(hidden.shape[:-1])
    n_tokens = hidden3.shape[0] * hidden3.shape[1]
    live = torch.ones(n_tokens, dtype=torch.bool, device=hidden.device) if mask is None else (mask != 0).reshape(-1)
    if K is not None or return_sum_pi_squared or topk is not None:
        stats = _stats(
            hidden3,
            lm_head,
            bias,
            target_ids.reshape(n_tokens, K or 1).long(),
            live,
            temperature,
            return_entropy,
            return_sum_pi_squared,
            topk,
            softcap,
            chunk_rows,
            vocab_block,
            shard,
        )
        stats = shape_stats(stats, shape, token_shape)
        if return_sum_pi_squared or topk is not None:
            return stats
        if return_entropy:
            assert stats.entropy is not None
            return stats.logprobs, stats.entropy
        return stats.logprobs
    ids = target_ids.reshape(-1).long()
    logp, entropy = _logprobs(
        hidden3, lm_head, bias, ids, live, temperature, return_entropy, chunk_rows, vocab_block, shard, softcap
    )
    if return_entropy:
        assert entropy is not None
        return logp.view(shape), entropy.view(shape)
    return logp.view(shape)


def rspo_linear_loss(
    hidden: torch.Tensor,
    lm_head: Head,
    target_ids: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    temperature: float = 1.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    clip_ratio_c: float | None = None,
    beta: float = 0.0,
    loss_agg_mode: str = "token-mean",
    max_response_length: int | None = None,
    return_stats: bool = False,
    chunk_rows: int | None = None,
    vocab_block: int | None = None,
    weights_per: str | None = None,
    entropy_coeff: float = 0.0,
    tp_group: Any = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    sequence_parallel: bool = False,
    logit_softcap: float | None = None,
    policy_loss: str = "vanilla",
    policy_loss_options: Any = None,
    kl_penalty: str = "k3_unclamped",
    rollout_is_weights: torch.Tensor | None = None,
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped RSPO policy loss from the last hidden states and the ``lm_head``, never building the logits.

    Equals ``rspo_loss(hidden @ lm_head.weight.T + bias, ...)`` while keeping only about one
    block of logits (tens of MiB of float32 on a CPU) alive at a time; gradients flow to ``hidden``,
    the head's weight and its bias.

    Parameters
    ----------
    hidden : torch.Tensor
        ``(B, T, H)`` padded or ``(N, H)`` packed last hidden states (after the final norm) at
        the positions that predict ``target_ids``; float16, bfloat16, float32 or float64.
    lm_head : torch.Tensor or torch.nn.Module
        The ``(V, H)`` output projection (``lm_head.weight``, possibly tied to the embedding), the
        dtype and device of ``hidden``; or the module that owns it (``nn.Linear``, possibly FSDP2
        ``fully_shard``-ed or ZeRO-3 partitioned), whose bias is then used and whose forward the
        op runs as, so its parameters are gathered and its gradients reduced as for the logits.
        Under DDP / FSDP2 / ZeRO-3, also run the backbone and this loss inside one
        :func:`rspo_kernels.distributed.forward_redirect` (docs/distributed.md).
    target_ids, weights, mask, old_logprobs, ref_logprobs, cu_seqlens
        As in :func:`rspo_kernels.rspo_loss`, with ``hidden.shape[:-1]`` as the token shape.
        Masked tokens contribute nothing: their hidden states are never read.
    bias : torch.Tensor, optional
        ``(V,)`` output bias, with a weight tensor only.
    temperature, epsilon_low, epsilon_high, clip_ratio_c, beta, loss_agg_mode, max_response_length
        Hyper-parameters; see :class:`rspo_kernels.loss.LossOptions`.
    return_stats : bool, default False
        Also return the statistics dict of :func:`rspo_kernels.rspo_loss`.
    chunk_rows, vocab_block : int, optional
        Block shape of the logits (tokens x vocabulary entries); picked from the shapes when
        absent. The one-pass route keeps ``chunk_rows`` rows over the whole vocabulary
        (:func:`rspo_kernels.loss.linear_fused.fused_rows`) and reads no ``vocab_block``; the
        two-pass route uses both (:func:`rspo_kernels.loss.linear_chunked.default_blocks`).
    weights_per : {"sequence", "token"}, optional
        How to read ``weights``, as in :func:`rspo_kernels.rspo_loss` (packed ``(S,)`` weights are
        per sequence, also when ``S == N``, unless ``"token"``).
    entropy_coeff : float, default 0.0
        Entropy bonus: ``loss = pg_loss - entropy_coeff * agg(entropy)`` with ``loss_agg_mode``
        (verl's ``actor.entropy_coeff``); its gradient reaches ``hidden``, the weight and the bias.
    tp_group, vocab_start, vocab_size, sequence_parallel
        Vocabulary-parallel head and padded vocabularies, as in :func:`token_logprobs_linear`:
        the loss and every gradient equal the single-process ones (the weight's and bias's for this
        rank's rows).
    logit_softcap : float, optional
        Final-logit soft-capping ``z -> c * tanh(z / c)`` before the temperature (Gemma 2/3's
        ``final_logit_softcapping``); gradients include the cap's ``1 - tanh(z / c)^2``.
    policy_loss, policy_loss_options, kl_penalty, rollout_is_weights
        As in :func:`rspo_kernels.rspo_loss`.
    dp_size, batch_num_tokens, global_batch_size, generator
        As in :func:`rspo_kernels.rspo_loss`: any of verl's policy losses, its KL estimators,
        rollout importance weights and global-batch normalisation (docs/loss.md).

    Returns
    -------
    torch.Tensor or tuple
        The 0-d loss (float32; float64 for float64 inputs), and the stats dict when asked.

    Raises
    ------
    TypeError
        Non-tensor inputs or wrong dtypes (the head's weight and bias must share ``hidden``'s
        dtype), non-numeric hyper-parameters, a head module with parameters other than ``weight``
        and ``bias``.
    ValueError
        Shapes, devices or hyper-parameters out of range; each message names the argument.
        ``bias`` given with a module; a DTensor or ZeRO-3 parameter given as the bare weight; a head
        module whose forward is not ``nn.Linear.forward`` or that carries forward hooks other than
        FSDP2's and ZeRO-3's own (see :func:`token_logprobs_linear`).
    RuntimeError
        In backward with ``create_graph=True`` (use ``RSPO_KERNELS_BACKEND=reference``).

    Notes
    -----
    With gradients wanted (grad mode on, an input requiring grad) the forward takes the live tokens
    a block of rows at a time, keeps that block's logits over the whole vocabulary (float32
    accumulation for half inputs; about 32 MiB per block on a CPU, ``chunk_rows`` rows when given),
    computes their log-sum-exp, target logits and entropies, asks the policy loss for each token's
    ``g = dL/dlogp`` and ``g_H = dL/dentropy``, forms
    ``G = (g (onehot - p) - g_H p (log p + H)) / T`` in place and accumulates ``dhidden = G W``,
    ``dW += G^T hidden``, ``db += sum G`` (docs/math.md, "The loss"): three logits-sized matmuls,
    as an unfused step. Backward only multiplies the saved gradients by grad_output, so loss
    scaling is exact (half inputs keep them in float32 until then), ``retain_graph`` reuses them,
    and the weight's gradient exists from the forward on. Under ``no_grad``, ``torch.func``,
    ``torch.compile`` or ``tp_group`` the log-probs are computed first and each block is recomputed
    in backward (one more matmul). ``create_graph=True`` raises in backward on both routes. The
    per-token objective and the aggregation are those of :func:`rspo_kernels.rspo_loss`.

    Examples
    --------
    >>> import torch, rspo_kernels as rk
    >>> hidden = torch.zeros(1, 2, 3, requires_grad=True)
    >>> W = torch.randn(4, 3, requires_grad=True)
    >>> loss = rk.rspo_linear_loss(hidden, W, torch.tensor([[0, 1]]), torch.tensor([2.0]))
    >>> loss  # -2 * 1: on-policy ratio = 1
    tensor(-2., grad_fn=<LinearFusedLossBackward>)
    >>> loss.backward(); W.grad.shape
    torch.Size([4, 3])
    """
    options = LossOptions(
        temperature=temperature,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        clip_ratio_c=clip_ratio_c,
        beta=beta,
        loss_agg_mode=loss_agg_mode,
        max_response_length=max_response_length,
        entropy_coeff=entropy_coeff,
        policy_loss=policy_loss,
        policy_loss_options=policy_loss_options,
        kl_penalty=kl_penalty,
    )
    return rspo_linear_loss_with_options(
        hidden,
        lm_head,
        target_ids,
        weights,
        mask,
        options,
        bias=bias,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        cu_seqlens=cu_seqlens,
        return_stats=return_stats,
        chunk_rows=chunk_rows,
        vocab_block=vocab_block,
        weights_per=weights_per,
        tp_group=tp_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        sequence_parallel=sequence_parallel,
        logit_softcap=logit_softcap,
        rollout_is_weights=rollout_is_weights,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        generator=generator,
    )


def rspo_linear_loss_with_options(
    hidden: torch.Tensor,
    lm_head: Head,
    target_ids: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    options: LossOptions,
    *,
    bias: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_stats: bool = False,
    chunk_rows: int | None = None,
    vocab_block: int | None = None,
    weights_per: str | None = None,
    tp_group: Any = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    sequence_parallel: bool = False,
    logit_softcap: float | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`rspo_linear_loss` with its hyper-parameters in one :class:`LossOptions`.

    What :class:`RSPOLinearLoss` calls.
    """
    if not isinstance(options, LossOptions):
        raise TypeError(f"options must be a rspo_kernels.loss.LossOptions, got {type(options).__name__}")
    _checks.check_logits("hidden", hidden)
    vocab = _check_lm_head(hidden, lm_head, bias)
    _check_blocks(chunk_rows, vocab_block)
    return_stats = _checks.check_flag("return_stats", return_stats)
    softcap = check_softcap(logit_softcap)
    V_local = vocab
    shard = vocab_shard(tp_group, vocab_start, vocab_size, sequence_parallel, V_local)
    _validate_loss_inputs(
        hidden,
        target_ids,
        weights,
        mask,
        old_logprobs,
        ref_logprobs,
        cu_seqlens,
        options,
        id_bound(vocab_size, tp_group, V_local),
        name="hidden",
        weights_per=weights_per,
        rollout_is_weights=rollout_is_weights,
    )
    batch = token_batch(
        hidden,
        target_ids,
        weights,
        mask,
        old_logprobs,
        ref_logprobs,
        cu_seqlens,
        options,
        weights_per,
        rollout_is_weights=rollout_is_weights,
        global_batch=global_batch(options, dp_size, batch_num_tokens, global_batch_size),
        generator=check_generator(generator),
    )
    with_entropy = return_stats or options.entropy_coeff != 0.0
    if shard is None and softcap is None and _one_pass(batch.rows, lm_head, bias, options):
        loss, logp1, entropy1 = _fused_loss(batch.rows, lm_head, bias, batch, options, with_entropy, chunk_rows)
        if not return_stats:
            return loss
        with torch.no_grad():  # the statistics of the detached log-probs; the loss is the fused one
            _, stats = policy_loss(batch, logp1, entropy1, options, True)
        return loss, stats
    logp, entropy = _logprobs(
        batch.rows,
        lm_head,
        bias,
        batch.ids,
        batch.live,
        options.temperature,
        with_entropy,
        chunk_rows,
        vocab_block,
        shard,
        softcap,
    )
    return policy_loss(batch, logp, entropy, options, return_stats)


class RSPOLinearLoss(RSPOLoss):
    """Rewards in, RSPO-weighted policy loss out, from hidden states and the ``lm_head``.

    :class:`rspo_kernels.RSPOLoss` for :func:`rspo_linear_loss`: the same weights, options and
    validation at construction, and the same unbiased default ``loss_agg_mode="seq-mean-token-sum"``
    (one weight per response; ``token-mean`` would bias the Pass@k / Max@k gradient).

    Parameters
    ----------
    objective : {"pass@k", "max@k"}, default "pass@k"
        Which objective's gradient the weights estimate.
    k : int, default 4
        Sample size of the objective.
    estimator : str, default "rspo"
        Weight estimator (see :data:`rspo_kernels.ESTIMATORS`).
    chunk_rows, vocab_block : int, optional
        Block shape of the logits (see :func:`rspo_linear_loss`).
    **loss_kwargs
        The :class:`LossOptions` fields, ``return_stats``, ``logit_softcap`` and the tensor-parallel
        ``tp_group``, ``vocab_start``, ``vocab_size``, ``sequence_parallel`` (as in :func:`rspo_linear_loss`).

    Raises
    ------
    TypeError, ValueError
        At construction: an unknown keyword (``inplace_backward`` has no meaning here), objective
        or estimator, a bad ``k``, block size or hyper-parameter.

    Examples
    --------
    >>> import torch, rspo_kernels as rk
    >>> crit = rk.RSPOLinearLoss("pass@k", k=2)
    >>> hidden = torch.zeros(4, 3, 8, requires_grad=True)
    >>> W = torch.randn(5, 8, requires_grad=True)
    >>> rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])  # one group of 4 responses
    >>> crit(hidden, W, torch.zeros(4, 3, dtype=torch.long), rewards, group_size=4)  # -(2 * 3 tokens) / 4
    tensor(-1.5000, grad_fn=<LinearFusedLossBackward>)
    """

    _SHARD_KWARGS = (*RSPOLoss._SHARD_KWARGS, "sequence_parallel")
    _FUNCTION = "rspo_linear_loss"

    def __init__(
        self,
        objective: str = "pass@k",
        k: int = 4,
        estimator: str = "rspo",
        *,
        chunk_rows: int | None = None,
        vocab_block: int | None = None,
        **loss_kwargs: Any,
    ):
        if "inplace_backward" in loss_kwargs:
            raise TypeError("RSPOLinearLoss has no inplace_backward: the logits it would overwrite never exist")
        _check_blocks(chunk_rows, vocab_block)
        super().__init__(objective, k, estimator, **loss_kwargs)
        self.chunk_rows = chunk_rows
        self.vocab_block = vocab_block

    def forward(  # type: ignore[override]
        self,
        hidden: torch.Tensor,
        lm_head: Head,
        target_ids: torch.Tensor,
        rewards: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        group_size: int | None = None,
        group_ids: Any = None,
        mask: torch.Tensor | None = None,
        old_logprobs: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        rollout_is_weights: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: Any = None,
        global_batch_size: Any = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for one reward per response.

        Parameters
        ----------
        hidden, lm_head, target_ids, bias, mask, old_logprobs, ref_logprobs, cu_seqlens
            As in :func:`rspo_linear_loss`.
        rollout_is_weights, dp_size, batch_num_tokens, global_batch_size, generator
            Per-batch inputs, as in :func:`rspo_kernels.rspo_loss`.
        rewards : torch.Tensor
            One reward per response (``B`` padded, ``S`` packed), as in :class:`rspo_kernels.RSPOLoss`.
        group_size, group_ids
            Group layout, as in :func:`rspo_kernels.pass_at_k_weights`.

        Returns
        -------
        torch.Tensor or tuple
            What :func:`rspo_linear_loss` returns.
        """
        w = self.response_weights("hidden", hidden, rewards, group_size, group_ids, cu_seqlens)
        return rspo_linear_loss_with_options(
            hidden,
            lm_head,
            target_ids,
            w,
            mask,
            self.options,
            bias=bias,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            cu_seqlens=cu_seqlens,
            return_stats=self.return_stats,
            chunk_rows=self.chunk_rows,
            vocab_block=self.vocab_block,
            weights_per="sequence",
            logit_softcap=self.logit_softcap,
            **self.shard_kwargs,
            rollout_is_weights=rollout_is_weights,
            dp_size=dp_size,
            batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size,
            generator=generator,
        )
