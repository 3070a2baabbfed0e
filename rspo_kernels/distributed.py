"""Running the fused loss inside a distributed wrapper's forward.

Data-parallel wrappers prepare gradient synchronisation in their ``forward``: DDP's reducer arms
its all-reduce hooks (``prepare_for_backward``), an FSDP2 unit all-gathers its parameters and
registers the reduce-scatter that runs after backward, DeepSpeed ZeRO-3 gathers a module's
partitioned parameters in its forward and again in backward. A loss computed from the hidden states
and ``lm_head`` outside that forward skips all of it: DDP replicas drift apart, FSDP2 sees sharded
DTensors, ZeRO-3 sees empty placeholders.

:func:`forward_redirect` runs any function as the forward of the module a wrapper holds (the
*forward redirection* of PyTorch Lightning and TRL's ``_ForwardRedirection``): the wrapper's own
``forward`` runs, its hooks fire, and where it would call the model it calls the function instead.
The fused-linear losses use the same mechanism on the head module itself when given
``lm_head`` (a module) rather than ``lm_head.weight``.

The rule: the backbone and the fused loss run together inside one redirected forward of the
outermost wrapper.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["forward_redirect", "inner_module", "is_dtensor", "is_zero3_param"]

R = TypeVar("R")


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 shard, a tensor-parallel shard)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def is_zero3_param(x: Any) -> bool:
    """Whether ``x`` is a DeepSpeed ZeRO-3 partitioned parameter (it carries ``ds_id`` and ``ds_status``).

    Outside its module's forward such a parameter is a placeholder with ``numel() == 0``; its
    full shape is ``x.ds_shape``.
    """
    return isinstance(x, torch.Tensor) and hasattr(x, "ds_id") and hasattr(x, "ds_status")


def _wrapper_types() -> tuple[type, ...]:
    """Wrappers whose forward calls ``self.module``; DeepSpeed only when already imported (it is slow to import)."""
    types: list[type] = [nn.parallel.DistributedDataParallel]
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    deepspeed = sys.modules.get("deepspeed")
    engine = getattr(deepspeed, "DeepSpeedEngine", None)
    if isinstance(engine, type):
        types.append(engine)
    return tuple(types)


def inner_module(wrapper: nn.Module) -> nn.Module:
    """The module whose ``forward`` :func:`forward_redirect` replaces.

    ``wrapper.module`` for ``DistributedDataParallel``, FSDP1's ``FullyShardedDataParallel`` and a
    DeepSpeed engine (whose forward calls it); ``wrapper`` itself otherwise: an FSDP2
    ``fully_shard``-ed module (the sharding lives in hooks on the module itself), a plain module.
    """
    if isinstance(wrapper, _wrapper_types()):
        inner = wrapper.module
        assert isinstance(inner, nn.Module)
        return inner
    return wrapper


def forward_redirect(wrapper: nn.Module, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """Run ``fn(*args, **kwargs)`` as the forward of the model that ``wrapper`` holds.

    ``wrapper(*args, **kwargs)`` is called with the inner module's ``forward`` temporarily replaced
    by ``fn``: the wrapper's forward and every hook registered on it run as for a normal call, so
    DDP prepares its gradient all-reduce, an FSDP2 root unshards its parameters and arms its
    reduce-scatter, and a DeepSpeed engine runs its ZeRO bookkeeping. The original ``forward`` is
    restored before ``fn`` starts (so ``fn`` may call the model itself) and again on any error.

    Parameters
    ----------
    wrapper : torch.nn.Module
        A ``DistributedDataParallel`` module, an FSDP2 root (``fully_shard``-ed module), FSDP1's
        ``FullyShardedDataParallel``, a ``deepspeed.DeepSpeedEngine`` or a plain module (then the
        call only runs its forward hooks). Use the outermost wrapper: the one the optimizer step
        and ``backward`` go through.
    fn : callable
        Computes what the model's forward would: typically the backbone's hidden states and the
        fused loss from them, e.g. ``rk.rspo_linear_loss(model.model(ids).last_hidden_state,
        model.lm_head, ...)``.
    *args, **kwargs
        Passed to ``fn`` through the wrapper's forward, which processes them as model inputs: it
        may move tensors to its device and, with FSDP2's ``MixedPrecisionPolicy`` or DeepSpeed's
        fp16 auto-cast, cast floating tensors to the parameter dtype. Capture tensors whose
        precision matters (advantages, old log-probs) in ``fn``'s closure instead.

    Returns
    -------
    object
        ``fn``'s result as the wrapper returns it (after its post-forward processing: DDP and FSDP2
        attach their backward hooks to the tensors in it, so use this result, not a copy made
        inside ``fn``).

    Raises
    ------
    TypeError
        ``wrapper`` is not a module or ``fn`` is not callable.
    RuntimeError
        The wrapper's forward never called its inner module (nothing was computed).

    Notes
    -----
    Everything that needs the wrapper's synchronisation must happen inside ``fn``: the backbone
    and the fused loss together. Calling the unwrapped backbone outside and only the loss inside
    (or the reverse) leaves the parameters used outside unsynchronised: under DDP their gradients
    are never all-reduced and the replicas drift apart; under FSDP2 they are sharded DTensors
    there. The same mechanism as PyTorch Lightning's and TRL's ``_ForwardRedirection``.

    Examples
    --------
    >>> import torch, rspo_kernels as rk
    >>> from rspo_kernels.distributed import forward_redirect
    >>> model = torch.nn.Linear(2, 3)  # single process: the plain module is its own wrapper
    >>> def loss_fn(x):
    ...     return rk.rspo_linear_loss(x, model, torch.tensor([[0, 2]]), torch.tensor([1.0]))
    >>> loss = forward_redirect(model, loss_fn, torch.zeros(1, 2, 2))
    >>> loss  # on-policy (ratio 1): minus the response's weight
    tensor(-1., grad_fn=<LinearFusedLossBackward>)
    """
    if not isinstance(wrapper, nn.Module):
        raise TypeError(
            f"wrapper must be a torch.nn.Module (DDP, FSDP2 root, DeepSpeed engine), got {type(wrapper).__name__}"
        )
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    inner = inner_module(wrapper)
    # An instance-level forward (accelerate and others patch one in) is restored as it was; the
    # class's forward is restored by removing our instance attribute.
    had_own = "forward" in inner.__dict__
    own = inner.__dict__.get("forward")
    called = False

    def restore() -> None:
        if had_own:
            inner.__dict__["forward"] = own
        else:
            inner.__dict__.pop("forward", None)

    def redirected(*a: Any, **kw: Any) -> R:
        nonlocal called
        restore()
        called = True
        return fn(*a, **kw)

    inner.__dict__["forward"] = redirected
    try:
        out: R = wrapper(*args, **kwargs)
    finally:
        restore()
    if not called:
        raise RuntimeError(
            f"forward_redirect: {type(wrapper).__name__}.forward did not call its inner module "
            f"{type(inner).__name__}, so fn never ran; pass the outermost wrapper whose forward calls the model"
        )
    return out
