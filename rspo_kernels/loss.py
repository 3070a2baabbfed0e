"""Public fused-loss API: ``token_logprobs``, ``rspo_loss`` and the ``RSPOLoss`` module.

Inputs are validated here, once; then :func:`rspo_kernels._dispatch.implementation` picks the
backend: Triton kernels for CUDA tensors, the chunked torch path for CPU tensors, and the unfused
reference when ``RSPO_KERNELS_BACKEND=reference``. Every backend has one signature (that of
:func:`rspo_kernels.loss_reference.rspo_loss_reference`). Validation never reads tensor values
from a GPU, so a training step stays free of host synchronisations.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from rspo_kernels._dispatch import implementation
from rspo_kernels.loss_reference import LOSS_AGG_MODES

__all__ = ["LOSS_AGG_MODES", "token_logprobs", "rspo_loss", "RSPOLoss"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- validation
def _check_logits(logits: Any, ndims: Sequence[int]) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() not in ndims:
        shapes = " or ".join({2: "(N, V)", 3: "(B, T, V)"}[d] for d in ndims)
        hint = (
            "; for packed (N, V) logits pass logits[None] and add a leading 1 to the other inputs"
            if 2 not in ndims
            else ""
        )
        raise ValueError(f"logits must be {shapes}, got shape {tuple(logits.shape)}{hint}")
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")


def _check_ids(target_ids: Any, logits: torch.Tensor) -> None:
    if not isinstance(target_ids, torch.Tensor):
        raise TypeError(f"target_ids must be a torch.Tensor, got {type(target_ids).__name__}")
    if target_ids.dtype.is_floating_point or target_ids.dtype == torch.bool or target_ids.is_complex():
        raise TypeError(f"target_ids must be an integer tensor, got {target_ids.dtype}; use target_ids.long()")
    if tuple(target_ids.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target_ids must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(target_ids.shape)}"
        )
    if target_ids.device != logits.device:
        raise ValueError(f"target_ids is on {target_ids.device} but logits is on {logits.device}; move them together")


def _check_ids_in_range(target_ids: torch.Tensor, vocab: int, mask: torch.Tensor | None) -> None:
    # Reading values needs a host sync on a GPU; only CPU tensors are checked (the kernels clamp).
    if target_ids.device.type != "cpu" or target_ids.numel() == 0:
        return
    live = target_ids if mask is None else target_ids[mask != 0]
    if live.numel() and (int(live.min()) < 0 or int(live.max()) >= vocab):
        raise ValueError(
            f"target_ids must lie in [0, V={vocab}) wherever the mask is nonzero; found values in "
            f"[{int(live.min())}, {int(live.max())}]. Mask padding positions (mask=0) instead of using "
            "out-of-range ids."
        )


def _check_bt(name: str, x: Any, shape: tuple[int, int], device: torch.device, *, allow_b: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ok = tuple(x.shape) == shape or (allow_b and tuple(x.shape) == shape[:1])
    if not ok:
        want = f"({shape[0]},) per response or {shape} per token" if allow_b else f"{shape}"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but logits is on {device}; move it with .to(logits.device)")


def _check_float(name: str, x: torch.Tensor) -> None:
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}; convert it with .float()")


def _check_scalars(
    temperature: float,
    epsilon_low: float,
    epsilon_high: float | None,
    beta: float,
    loss_agg_mode: str,
    max_response_length: int | None,
    ref_logprobs: torch.Tensor | None,
) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= epsilon_low < 1:
        raise ValueError(f"epsilon_low must lie in [0, 1), got {epsilon_low}")
    if epsilon_high is not None and not epsilon_high >= 0:
        raise ValueError(f"epsilon_high must be >= 0 (or None for epsilon_low), got {epsilon_high}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logprobs (e.g. rk.token_logprobs(ref_logits, target_ids))")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not one of {LOSS_AGG_MODES}")
    if max_response_length is not None:
        if isinstance(max_response_length, bool) or not isinstance(max_response_length, int):
            raise TypeError(f"max_response_length must be an int or None, got {type(max_response_length).__name__}")
        if max_response_length < 1:
            raise ValueError(f"max_response_length must be >= 1, got {max_response_length}")


# --------------------------------------------------------------------------- public functions
def token_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``target_ids`` under ``softmax(logits / temperature)``, forward only.

    For the old-policy and reference log-probs a trainer feeds to :func:`rspo_loss`. Never
    materialises a float32 copy of the logits.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, T, V)`` or ``(N, V)``, float16, bfloat16, float32 or float64, any device. Strided
        views such as ``logits[:, :-1]`` are read without a copy.
    target_ids : torch.Tensor
        ``logits.shape[:-1]`` integer ids in ``[0, V)``.
    temperature : float, default 1.0
        Divides the logits (use the sampling temperature).
    return_entropy : bool, default False
        Also return the entropy of each token's distribution.

    Returns
    -------
    torch.Tensor or tuple of torch.Tensor
        ``(B, T)`` or ``(N,)`` float32 log-probabilities (float64 for float64 logits on the
        CPU), and the entropies in the same shape when asked. Never requires grad.

    Raises
    ------
    TypeError
        Non-tensor inputs, non-float logits or non-integer ids.
    ValueError
        Mismatched shapes or devices, ``temperature <= 0``, ids out of range (checked on CPU).

    Examples
    --------
    >>> import torch, rspo_kernels as rk
    >>> logits = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    >>> rk.token_logprobs(logits, torch.tensor([0, 1]))
    tensor([-0.6931, -0.1269])
    """
    _check_logits(logits, (2, 3))
    _check_ids(target_ids, logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_ids_in_range(target_ids, logits.shape[-1], None)
    packed = logits.dim() == 2
    logits3 = logits.unsqueeze(0) if packed else logits
    ids3 = (target_ids.unsqueeze(0) if packed else target_ids).long()
    _, fn = implementation("token_logprobs", logits.device.type)
    with torch.no_grad():
        out = fn(logits3.detach(), ids3, temperature=float(temperature), return_entropy=return_entropy)
    outs = out if isinstance(out, tuple) else (out,)
    outs = tuple((o.squeeze(0) if packed else o).detach() for o in outs)
    return outs if return_entropy else outs[0]


def rspo_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    loss_agg_mode: str = "token-mean",
    max_response_length: int | None = None,
    inplace_backward: bool = False,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fused clipped policy-gradient loss driven by RSPO weights.

    The logits' gradient is computed during the forward pass, chunk by chunk (CPU) or row by row
    (Triton), so the float32 ``(tokens, vocab)`` softmax never exists.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, T, V)`` float16, bfloat16, float32 or float64 (CPU), the policy's logits for the
        response tokens; last dimension contiguous for the Triton path (other strides free).
    target_ids : torch.Tensor
        ``(B, T)`` integer ids of the sampled tokens, in ``[0, V)`` where ``mask`` is nonzero.
    weights : torch.Tensor
        ``(B,)`` one weight per response (e.g. :func:`rspo_kernels.pass_at_k_weights`) or
        ``(B, T)`` per token. Used as the advantage; treated as a constant.
    mask : torch.Tensor, optional
        ``(B, T)`` response mask (bool, integer or float); all ones when absent. Rows that are
        entirely masked contribute zero loss and zero gradient.
    old_logprobs : torch.Tensor, optional
        ``(B, T)`` behaviour-policy log-probs. None means on-policy: ``ratio = 1`` and the
        gradient is the plain weighted log-prob gradient.
    ref_logprobs : torch.Tensor, optional
        ``(B, T)`` reference-policy log-probs for the KL term (needed when ``beta > 0``).
    temperature : float, default 1.0
        Divides the logits.
    epsilon_low, epsilon_high : float, default 0.2 and None
        Clip range ``[1 - epsilon_low, 1 + epsilon_high]``; ``epsilon_high=None`` means
        ``epsilon_low``.
    beta : float, default 0.0
        Weight of the k3 KL estimator ``exp(ref - logp) - (ref - logp) - 1``.
    loss_agg_mode : str, default "token-mean"
        ``"token-mean"``, ``"token-sum"``, ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"``
        or ``"seq-mean-token-sum-norm"``, as verl's ``agg_loss``.
    max_response_length : int, optional
        Divisor of ``"seq-mean-token-sum-norm"``; ``T`` when absent.
    inplace_backward : bool, default False
        Write the gradient over ``logits`` (as Liger-Kernel does): saves one logits-sized buffer when
        ``logits`` is an intermediate such as an lm_head output (autograd copies it for a leaf).
        ``logits`` must not be used afterwards. Backward may run only once.
    return_stats : bool, default False
        Also return a dict of detached 0-d tensors: ``logprob_mean``, ``entropy_mean``,
        ``clip_fraction`` (verl's ``pg_clipfrac``), ``approx_kl`` (verl's ``ppo_kl``, mean of
        ``old - logp``) and, with ``ref_logprobs``, ``ref_kl`` (mean k3 KL); all masked token means.

    Returns
    -------
    torch.Tensor or tuple
        The scalar loss (float32; float64 for float64 logits), and the stats dict when asked.

    Raises
    ------
    TypeError
        Non-tensor inputs or wrong dtypes.
    ValueError
        Shapes, devices or hyper-parameters out of range; each message names the argument.

    Notes
    -----
    Per token (docs/math.md § The loss the weights feed), with ``r = exp(logp - old_logp)`` and
    weight ``A``: ``loss_tok = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta KL``.
    The aggregation is linear in ``loss_tok`` with mask-only coefficients ``c``, so
    ``dL/dlogits = c dloss_tok/dlogp (onehot(target) - softmax(logits / T)) / T``.

    Examples
    --------
    >>> import torch, rspo_kernels as rk
    >>> logits = torch.zeros(1, 2, 4, requires_grad=True)
    >>> loss = rk.rspo_loss(logits, torch.tensor([[0, 1]]), torch.tensor([2.0]))
    >>> loss  # -2 * 1, on-policy ratio = 1
    tensor(-2., grad_fn=<ChunkedRSPOLossFunctionBackward>)
    >>> loss.backward(); logits.grad[0, 0]  # -2 / 2 tokens * (onehot - 1/4)
    tensor([-0.7500,  0.2500,  0.2500,  0.2500])
    """
    _check_logits(logits, (3,))
    _check_ids(target_ids, logits)
    B, T, V = logits.shape
    dev = logits.device
    _check_bt("weights", weights, (B, T), dev, allow_b=True)
    _check_float("weights", weights)
    if mask is not None:
        _check_bt("mask", mask, (B, T), dev)
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if x is not None:
            _check_bt(name, x, (B, T), dev)
            _check_float(name, x)
    _check_scalars(temperature, epsilon_low, epsilon_high, beta, loss_agg_mode, max_response_length, ref_logprobs)
    _check_ids_in_range(target_ids, V, mask)
    backend, fn = implementation("rspo_loss", dev.type)
    return fn(
        logits,
        target_ids.long(),
        weights,
        mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        temperature=float(temperature),
        epsilon_low=float(epsilon_low),
        epsilon_high=None if epsilon_high is None else float(epsilon_high),
        beta=float(beta),
        loss_agg_mode=loss_agg_mode,
        max_response_length=max_response_length,
        inplace_backward=bool(inplace_backward) and backend != "reference",
        return_stats=return_stats,
    )


# --------------------------------------------------------------------------- module
_LOSS_KWARGS = (
    "temperature",
    "epsilon_low",
    "epsilon_high",
    "beta",
    "loss_agg_mode",
    "max_response_length",
    "inplace_backward",
    "return_stats",
)


class RSPOLoss(nn.Module):
    """Rewards in, RSPO-weighted policy loss out: weights and loss in one module.

    Parameters
    ----------
    objective : {"pass@k", "max@k"}, default "pass@k"
        Which objective's gradient the weights estimate (:func:`rspo_kernels.pass_at_k_weights`
        or :func:`rspo_kernels.max_at_k_weights`).
    k : int, default 4
        Sample size of the objective.
    estimator : str, default "rspo"
        Weight estimator (see :data:`rspo_kernels.ESTIMATORS`).
    **rspo_loss_kwargs
        Fixed keyword arguments of :func:`rspo_loss` (``temperature``, ``epsilon_low``,
        ``epsilon_high``, ``beta``, ``loss_agg_mode``, ``max_response_length``,
        ``inplace_backward``, ``return_stats``).

    Notes
    -----
    The weights are computed on the rewards' device with ``validate=False``: no host
    synchronisation and no Python loop over groups. Validate rewards once, upstream, if needed.

    Examples
    --------
    >>> import torch, rspo_kernels as rk
    >>> crit = rk.RSPOLoss("pass@k", k=2)
    >>> logits = torch.zeros(4, 3, 5, requires_grad=True)
    >>> rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])  # one group of 4 responses
    >>> crit(logits, torch.zeros(4, 3, dtype=torch.long), rewards, group_size=4)
    tensor(-0.5000, grad_fn=<ChunkedRSPOLossFunctionBackward>)
    """

    def __init__(self, objective: str = "pass@k", k: int = 4, estimator: str = "rspo", **rspo_loss_kwargs: Any):
        super().__init__()
        if objective not in ("pass@k", "max@k"):
            raise ValueError(f"objective must be 'pass@k' or 'max@k', got {objective!r}")
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        unknown = sorted(set(rspo_loss_kwargs) - set(_LOSS_KWARGS))
        if unknown:
            raise TypeError(f"RSPOLoss got unknown rspo_loss arguments {unknown}; allowed: {list(_LOSS_KWARGS)}")
        self.objective = objective
        self.k = k
        self.estimator = estimator
        self.loss_kwargs = dict(rspo_loss_kwargs)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.loss_kwargs.items())
        return f"objective={self.objective!r}, k={self.k}, estimator={self.estimator!r}{extra}"

    def weights(self, rewards: torch.Tensor, *, group_size: int | None = None, group_ids: Any = None) -> torch.Tensor:
        """The ``(B,)`` float32 per-response weights this module feeds to :func:`rspo_loss`."""
        from rspo_kernels.api import max_at_k_weights, pass_at_k_weights

        if not isinstance(rewards, torch.Tensor):
            raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
        fn = pass_at_k_weights if self.objective == "pass@k" else max_at_k_weights
        w = fn(
            rewards.detach(),
            self.k,
            group_size=group_size,
            group_ids=group_ids,
            estimator=self.estimator,
            validate=False,
        )
        return w.reshape(-1)

    def forward(
        self,
        logits: torch.Tensor,
        target_ids: torch.Tensor,
        rewards: torch.Tensor,
        *,
        group_size: int | None = None,
        group_ids: Any = None,
        mask: torch.Tensor | None = None,
        old_logprobs: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for ``(B, T, V)`` logits and one reward per response.

        Parameters
        ----------
        logits, target_ids, mask, old_logprobs, ref_logprobs
            As in :func:`rspo_loss`.
        rewards : torch.Tensor
            ``(B,)`` with ``group_size`` or ``group_ids``, or ``(G, n)`` with ``G * n = B``
            (responses of a prompt consecutive, in the order of ``logits``).
        group_size, group_ids
            Group layout, as in :func:`rspo_kernels.pass_at_k_weights`.

        Returns
        -------
        torch.Tensor or tuple
            What :func:`rspo_loss` returns.
        """
        _check_logits(logits, (3,))
        if isinstance(rewards, torch.Tensor) and rewards.numel() != logits.shape[0]:
            raise ValueError(
                f"rewards has {rewards.numel()} entries but logits has B={logits.shape[0]} responses; "
                "pass one reward per response"
            )
        w = self.weights(rewards, group_size=group_size, group_ids=group_ids).to(logits.device)
        return rspo_loss(
            logits,
            target_ids,
            w,
            mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            **self.loss_kwargs,
        )
