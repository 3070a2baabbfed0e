"""Public fused-loss API: ``token_logprobs``, ``rspo_loss`` and the ``RSPOLoss`` module.

Inputs are validated here, once, and normalised into a :class:`~rspo_kernels.loss.layout.TokenBatch`;
then :func:`rspo_kernels._dispatch.implementation` picks the fused log-prob op (Triton kernels for
CUDA tensors, the chunked torch path for CPU tensors, the unfused reference when
``RSPO_KERNELS_BACKEND=reference``) and :func:`~rspo_kernels.loss.policy.policy_loss` finishes the
loss in O(tokens) torch. Validation never reads tensor values from a GPU.
"""

from __future__ import annotations

import operator
from typing import Any, Literal, overload

import torch
from torch import nn

import rspo_kernels.loss._checks as _checks
from rspo_kernels.loss.layout import GlobalBatch, pg_aggregation, token_batch
from rspo_kernels.loss.options import LOSS_AGG_MODES, SEQUENCE_POLICY_LOSSES, LossOptions
from rspo_kernels.loss.policy import policy_loss
from rspo_kernels.loss.softcap import check_softcap
from rspo_kernels.loss.token_stats import (
    TokenStats,
    check_target_ids,
    check_topk,
    shape_stats,
    token_stats,
    topk_bound,
)
from rspo_kernels.loss.vocab_parallel import id_bound, logprob_op, vocab_shard

__all__ = ["LOSS_AGG_MODES", "LossOptions", "TokenStats", "token_logprobs", "rspo_loss", "RSPOLoss"]

_CALL_KWARGS = ("inplace_backward", "return_stats", "logit_softcap")


@overload
def token_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = ...,
    return_entropy: bool = ...,
    cu_seqlens: torch.Tensor | None = ...,
    tp_group: Any = ...,
    vocab_start: int = ...,
    vocab_size: int | None = ...,
    logit_softcap: float | None = ...,
    return_sum_pi_squared: Literal[False] = ...,
    topk: None = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


@overload
def token_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = ...,
    return_entropy: bool = ...,
    cu_seqlens: torch.Tensor | None = ...,
    tp_group: Any = ...,
    vocab_start: int = ...,
    vocab_size: int | None = ...,
    logit_softcap: float | None = ...,
    return_sum_pi_squared: Literal[True],
    topk: int | None = ...,
) -> TokenStats: ...


@overload
def token_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = ...,
    return_entropy: bool = ...,
    cu_seqlens: torch.Tensor | None = ...,
    tp_group: Any = ...,
    vocab_start: int = ...,
    vocab_size: int | None = ...,
    logit_softcap: float | None = ...,
    return_sum_pi_squared: bool = ...,
    topk: int,
) -> TokenStats: ...


@overload
def token_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = ...,
    return_entropy: bool = ...,
    cu_seqlens: torch.Tensor | None = ...,
    tp_group: Any = ...,
    vocab_start: int = ...,
    vocab_size: int | None = ...,
    logit_softcap: float | None = ...,
    return_sum_pi_squared: bool = ...,
    topk: int | None = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | TokenStats: ...


def token_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    tp_group: Any = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    logit_softcap: float | None = None,
    return_sum_pi_squared: bool = False,
    topk: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | TokenStats:
    """Log-probabilities of ``target_ids`` under ``softmax(logits / temperature)`` (and the entropies).

    For the old-policy and reference log-probs a trainer feeds to :func:`rspo_loss` (call it under
    ``torch.no_grad()`` there), and for custom losses: both outputs are differentiable in
    ``logits``, the backward recomputing the softmax chunk by chunk. Never materialises a float32
    copy of the logits.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, T, V)`` padded or ``(N, V)`` packed; float16, bfloat16, float32 or float64, any
        device. Strided views such as ``logits[:, :-1]`` are read without a copy.
    target_ids : torch.Tensor
        ``logits.shape[:-1]`` integer ids in ``[0, V)``; or ``logits.shape[:-1] + (K,)``
        (multi-target, e.g. a teacher's top-k ids for distillation): the log-probs are then
        ``(..., K)``, differentiable, with ``dL/dx = sum_k g_k onehot(id_k) - p sum_k g_k``.
    temperature : float, default 1.0
        Divides the logits (use the sampling temperature).
    return_entropy : bool, default False
        Also return the entropy of each token's distribution. Its gradient is
        ``dH/dlogits = -p * (x - E_p[x]) / temperature`` with ``x = logits / temperature``,
        computed in the same backward pass as the log-probs' (no extra logits-sized buffer).
    cu_seqlens : torch.Tensor, optional
        ``(S + 1,)`` offsets of packed sequences. Accepted (and validated) so the packed call
        mirrors :func:`rspo_loss`; log-probs do not depend on it.
    tp_group : torch.distributed.ProcessGroup, optional
        Vocabulary parallelism (Megatron's ``gather_output=False`` head): ``logits`` is this rank's
        slice ``(..., V_local)`` of the vocabulary and ``target_ids`` are global ids. Every rank of
        the group calls with the same ids; the results are the full-vocabulary ones on every rank
        (two all-reduces per call; see docs/tensor-parallel.md).
    vocab_start : int, default 0
        Global index of this rank's first vocabulary entry (``rank * V_local`` for even slices).
    vocab_size : int, optional
        The real vocabulary size when the vocabulary is padded (e.g. to a multiple of the TP size):
        entries at global index ``>= vocab_size`` get probability 0 and gradient 0.
    logit_softcap : float, optional
        Final-logit soft-capping (Gemma 2/3's ``final_logit_softcapping``): the logits become
        ``c * tanh(logits / c)`` before the temperature divides them, as in Hugging Face's
        generation; the gradient carries the factor ``1 - tanh(logits / c)^2``. ``-inf`` logits
        stay ``-inf`` (masked entries).
    return_sum_pi_squared : bool, default False
        Also return ``sum_v softmax(x)_v^2`` per token (verl's ``sum_pi_squared``, for the
        optimal-token baseline), ``x`` the capped, scaled logits. Detached.
    topk : int, optional
        Also return ``torch.topk`` of each token's log-softmax: ``(..., topk)`` log-probs sorted
        descending and their (global) ids. Detached; for a differentiable version pass the ids
        back as multi-target ``target_ids``.

    Returns
    -------
    torch.Tensor or tuple of torch.Tensor or TokenStats
        ``target_ids.shape`` float32 log-probabilities (float64 for float64 logits), and the
        entropies when asked. Both require grad when ``logits`` does (outside ``no_grad``).
        With ``return_sum_pi_squared`` or ``topk``: a :class:`TokenStats`
        ``(logprobs, entropy, sum_pi_squared, topk_logprobs, topk_ids)``, None where not asked.

    Notes
    -----
    Multi-target ids and the statistics are computed by the chunked torch path on every device
    (:mod:`rspo_kernels.loss.token_stats`): one pass over the logits in row chunks, no
    ``(tokens x vocab)`` buffer, the statistics adding ``O(tokens x topk)``. Under ``tp_group``
    they are exact (merged across the vocabulary slices; top-k by an all-gather of each rank's
    candidates).

    Raises
    ------
    TypeError
        Non-tensor inputs, non-float logits, non-integer ids, a non-numeric temperature.
    ValueError
        Mismatched shapes or devices, ``temperature <= 0``, ids out of range (checked on CPU;
        on a GPU an out-of-range id gives NaN).

    Examples
    --------
    >>> import torch, rspo_kernels as rk
    >>> logits = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    >>> rk.token_logprobs(logits, torch.tensor([0, 1]))
    tensor([-0.6931, -0.1269])
    """
    _checks.check_logits("logits", logits)
    K = check_target_ids(target_ids, tuple(logits.shape[:-1]), logits.device)
    return_entropy = _checks.check_flag("return_entropy", return_entropy)
    return_sum_pi_squared = _checks.check_flag("return_sum_pi_squared", return_sum_pi_squared)
    softcap = check_softcap(logit_softcap)
    temperature = LossOptions(temperature=temperature).temperature
    if cu_seqlens is not None:
        if logits.dim() != 2:
            raise ValueError("cu_seqlens describes packed (N, V) logits; padded (B, T, V) logits need none")
        _checks.check_cu_seqlens(cu_seqlens, logits.shape[0], logits.device)
    shard = vocab_shard(tp_group, vocab_start, vocab_size, False, logits.shape[-1])
    _checks.check_ids_in_range(target_ids, id_bound(vocab_size, tp_group, logits.shape[-1]), None)
    topk = check_topk(topk, topk_bound(vocab_size, tp_group, logits.shape[-1]))
    logits3 = logits.unsqueeze(0) if logits.dim() == 2 else logits
    shape = tuple(target_ids.shape)
    if K is not None or return_sum_pi_squared or topk is not None:
        token_shape = tuple(logits.shape[:-1])
        ids2 = target_ids.reshape(-1, K or 1).long()
        live = torch.ones(ids2.shape[0], dtype=torch.bool, device=ids2.device)
        stats = token_stats(
            logits3,
            ids2,
            live,
            temperature=temperature,
            with_entropy=return_entropy,
            sum_pi2=return_sum_pi_squared,
            topk=topk,
            softcap=softcap,
            shard=shard,
        )
        stats = shape_stats(stats, shape, token_shape)
        if return_sum_pi_squared or topk is not None:
            return stats
        if return_entropy:
            assert stats.entropy is not None
            return stats.logprobs, stats.entropy
        return stats.logprobs
    ids = target_ids.reshape(-1).long()
    live = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    fn = logprob_op(logits.device.type, logits.dtype, shard)
    logp, entropy = fn(logits3, ids, live, temperature=temperature, with_entropy=return_entropy, softcap=softcap)
    if return_entropy:
        return logp.view(shape), entropy.view(shape)
    return logp.view(shape)


def _validate_loss_inputs(
    logits: Any,
    target_ids: Any,
    weights: Any,
    mask: Any,
    old_logprobs: Any,
    ref_logprobs: Any,
    cu_seqlens: Any,
    options: LossOptions,
    vocab: int | None,
    name: str = "logits",
    weights_per: Any = None,
    rollout_is_weights: Any = None,
) -> None:
    """Everything :func:`rspo_loss` (and the linear variant) check before any work."""
    _checks.check_logits(name, logits)
    shape = tuple(logits.shape[:-1])
    dev = logits.device
    _checks.check_ids(target_ids, shape, dev)
    packed = logits.dim() == 2
    n_seqs = None
    if cu_seqlens is not None:
        if not packed:
            raise ValueError(f"cu_seqlens describes packed (N, D) {name}; padded (B, T, D) {name} need none")
        n_seqs = _checks.check_cu_seqlens(cu_seqlens, shape[0], dev)
    _checks.check_weights(weights, shape, n_seqs, dev, weights_per)
    if mask is not None:
        _checks.check_token_tensor("mask", mask, shape, dev, floating=False)
    for arg, x in (
        ("old_logprobs", old_logprobs),
        ("ref_logprobs", ref_logprobs),
        ("rollout_is_weights", rollout_is_weights),
    ):
        if x is not None:
            _checks.check_token_tensor(arg, x, shape, dev, floating=True)
    if packed and options.policy_loss in SEQUENCE_POLICY_LOSSES and cu_seqlens is None:
        raise ValueError(
            f"policy_loss={options.policy_loss!r} works on whole sequences: packed (N, D) inputs need "
            "cu_seqlens=[0, len_0, len_0 + len_1, ..., N]"
        )
    if options.beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={options.beta} > 0 needs ref_logprobs (e.g. rk.token_logprobs(ref_logits, target_ids))")
    if packed and options.loss_agg_mode.startswith("seq-") and cu_seqlens is None:
        raise ValueError(
            f"loss_agg_mode={options.loss_agg_mode!r} averages over sequences: packed (N, D) inputs need "
            "cu_seqlens=[0, len_0, len_0 + len_1, ..., N]"
        )
    if packed and options.loss_agg_mode == "seq-mean-token-sum-norm" and options.max_response_length is None:
        raise ValueError(
            "loss_agg_mode='seq-mean-token-sum-norm' divides by the maximum response length, which packed inputs "
            "do not carry: pass max_response_length (e.g. the rollout's response_length)"
        )
    if vocab is not None:
        _checks.check_ids_in_range(target_ids, vocab, mask)


def rspo_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
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
    inplace_backward: bool = False,
    return_stats: bool = False,
    weights_per: str | None = None,
    entropy_coeff: float = 0.0,
    tp_group: Any = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
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
    """Fused policy-gradient loss driven by RSPO weights: PPO clip, or any of verl's policy losses.

    Aggregation: the default ``loss_agg_mode="token-mean"`` (verl's) divides by the batch's token
    count, which biases the Pass@k / Max@k gradient of per-response weights; pass
    ``"seq-mean-token-sum"`` (or ``"seq-mean-token-sum-norm"`` with a constant length) to keep it
    unbiased, as :class:`RSPOLoss` does by default (docs/trainers.md § Aggregation).

    The forward pass keeps O(tokens) state (each token's log-sum-exp); the backward pass
    recomputes the softmax block by block and writes ``dL/dlogits`` once, in the logits' dtype,
    already multiplied by the incoming gradient. The float32 ``(tokens, vocab)`` softmax never
    exists, and the loss behaves as any torch op under loss scaling, ``retain_graph``,
    ``no_grad`` and ``torch.func``.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, T, V)`` padded, or ``(N, V)`` packed (verl's remove-padding); float16, bfloat16,
        float32 or float64. The policy's logits for the response tokens; strided views are read
        without a copy, but see Notes for ``logits[:, :-1]``.
    target_ids : torch.Tensor
        ``logits.shape[:-1]`` integer ids of the sampled tokens, in ``[0, V)`` where ``mask`` is
        nonzero (padding may hold anything, e.g. -100).
    weights : torch.Tensor
        Padded: ``(B,)`` one weight per response (e.g. :func:`rspo_kernels.pass_at_k_weights`) or
        ``(B, T)`` per token. Packed: ``(N,)`` per token, or ``(S,)`` per sequence with
        ``cu_seqlens``; when ``S == N`` (zero-length sequences) the vector is read per sequence
        unless ``weights_per="token"``. Used as the advantage; treated as a constant.
    mask : torch.Tensor, optional
        ``logits.shape[:-1]`` response mask (bool, integer or float); all ones when absent. Masked
        tokens contribute exactly zero loss and zero gradient, whatever their logits hold.
    old_logprobs : torch.Tensor, optional
        Behaviour-policy log-probs per token. None means on-policy: ratio 1, and the gradient is
        the plain weighted log-prob gradient.
    ref_logprobs : torch.Tensor, optional
        Reference-policy log-probs per token, for the KL term (needed when ``beta > 0``).
    cu_seqlens : torch.Tensor, optional
        Packed layout only: ``(S + 1,)`` integer offsets ``[0, len_0, len_0 + len_1, ..., N]``.
        Needed by the ``seq-*`` aggregation modes and by per-sequence weights.
    temperature, epsilon_low, epsilon_high, clip_ratio_c, beta, loss_agg_mode, max_response_length
        Hyper-parameters; see :class:`rspo_kernels.loss.LossOptions`. ``clip_ratio_c`` turns on
        verl's dual-clip. In the packed layout ``seq-mean-token-sum-norm`` needs
        ``max_response_length``.
    inplace_backward : bool, default False
        Write the gradient over ``logits`` during backward, saving one logits-sized buffer
        (Liger-Kernel's trick, made safe). Backward may then run only once (a second one
        raises), ``logits`` must be produced by a layer (a leaf raises), and any other term that
        still needs the logits' values in its own backward raises torch's "modified by an
        inplace operation" error instead of computing garbage.
    return_stats : bool, default False
        Also return a dict of detached 0-d tensors, masked token means: ``logprob_mean``,
        ``entropy_mean``, ``clip_fraction`` (verl's ``pg_clipfrac``), ``approx_kl`` (verl's
        ``ppo_kl``, mean clamped ``old - logp``), ``dual_clip_fraction`` (verl's
        ``pg_clipfrac_lower``, with ``clip_ratio_c``) and ``ref_kl`` (with ``ref_logprobs``).
    weights_per : {"sequence", "token"}, optional
        How to read ``weights``: one per response / sequence, or one per token. None (default)
        reads the shape, as described under ``weights``; pass ``"token"`` when a packed batch may
        have as many sequences as tokens and the weights are per token.
    entropy_coeff : float, default 0.0
        Entropy bonus: the loss becomes ``pg_loss - entropy_coeff * agg(entropy)``, aggregated
        with ``loss_agg_mode`` (verl's ``actor.entropy_coeff``); see :class:`LossOptions`.
    tp_group, vocab_start, vocab_size
        Vocabulary-parallel logits (this rank's ``(..., V_local)`` slice) and padded vocabularies,
        as in :func:`token_logprobs`. The loss, the statistics and the gradient of the local slice
        equal the single-process ones; the backward needs no communication.
    logit_softcap : float, optional
        Final-logit soft-capping ``z -> c * tanh(z / c)`` before the temperature (Gemma 2/3's
        ``final_logit_softcapping``), as in :func:`token_logprobs`; gradients include the cap's.
    policy_loss, policy_loss_options, kl_penalty
        The policy loss by verl 0.9.1's registered name (``"vanilla"``, ``"dppo_tv"``,
        ``"dppo_kl"``, ``"gspo"``, ``"sapo"``, ``"gpg"``, ``"clip_cov"``, ``"kl_cov"``,
        ``"geo_mean"``, ``"dro"``, ``"cispo"``), its settings under verl's key names, and the KL
        estimator ``beta`` weighs (verl's ``kl_loss_type``); see :class:`LossOptions` and the
        table in docs/loss.md. The value and gradient equal verl's
        ``get_policy_loss_fn(policy_loss)`` on the full logits' log-probs, plus
        ``beta * agg_loss(kl_penalty(logp, ref_logprobs))`` and the entropy bonus, as verl's actor.
    rollout_is_weights : torch.Tensor, optional
        Rollout importance-sampling weights (verl's ``rollout_is_weights``, e.g. truncated
        ``pi_train / pi_rollout``), one per token (the token shape); a constant (no gradient).
        They multiply each token's policy-gradient loss before the aggregation (geo_mean: their
        per-sequence geometric mean multiplies the sequence's loss), as verl; not the KL or the
        entropy term.
    dp_size, batch_num_tokens, global_batch_size
        verl's ``global_batch_info`` (its ``agg_loss``): this call's loss is normalised by the
        global batch, i.e. divided by ``batch_num_tokens`` (valid tokens in the global batch,
        token-mean) or ``global_batch_size`` (sequences in the global batch, seq-mean-*) instead
        of the local counts, and multiplied by ``dp_size``, so that the gradient averaged over
        ``dp_size`` ranks (DDP / FSDP) and summed over micro-batches equals the single-process
        one however the batch is split. ``dp_size > 1`` needs the count its mode divides by.
        geo_mean ignores them (verl takes the local mean over sequences).
    generator : torch.Generator, optional
        clip_cov only: verl draws the tokens whose gradient it cuts at random
        (``torch.randperm``); this generator drives the draw (None: torch's global generator,
        the draw verl makes under the same seed).

    Returns
    -------
    torch.Tensor or tuple
        The 0-d loss (float32; float64 for float64 logits), and the stats dict when asked.

    Raises
    ------
    TypeError
        Non-tensor inputs or wrong dtypes (``cu_seqlens`` must be int32 or int64), non-numeric
        hyper-parameters, non-bool flags.
    ValueError
        Shapes, devices or hyper-parameters out of range; each message names the argument.
        ``inplace_backward=True`` with leaf logits, or with logits whose elements share memory
        (an ``expand()``-ed view).
    RuntimeError
        In backward: ``create_graph=True`` (the fused backward is not differentiable; use
        ``RSPO_KERNELS_BACKEND=reference``), or a second backward with ``inplace_backward``.

    Notes
    -----
    Per token (docs/math.md § The loss the weights feed), with ``r = exp(clamp(logp - old, -20, 20))`` and
    weight ``A``, the default ``policy_loss="vanilla"``:
    ``loss_tok = max(-r A, -clip(r, 1 - eps_low, 1 + eps_high) A)``, then ``min(-A c, .)`` for
    ``A < 0`` under dual-clip; the other losses' formulas are in docs/loss.md. The loss adds
    ``beta * agg(kl_penalty(logp, ref))`` and subtracts ``entropy_coeff * agg(entropy)``. The
    aggregation is linear in ``loss_tok`` with mask-only coefficients, as verl's ``agg_loss``.

    Non-finite inputs: masked tokens are ignored entirely; ``-inf`` logits are tokens of
    probability 0 (finite entropy); an ``old_logprobs`` of ``-inf`` gives a ratio of ``e^20``
    (the clamp), so a token of weight 0 stays 0. An out-of-range id at a live token raises on
    CPU and gives NaN on a GPU (no host sync to check it).

    ``logits[:, :-1]`` views: autograd's slice backward allocates a zero ``(B, T + 1, V)``
    buffer and copies the gradient into it. To avoid that extra buffer, pass the unsliced
    logits with ``target_ids`` and ``mask`` padded by one position (mask 0 there).

    Examples
    --------
    >>> import torch, rspo_kernels as rk
    >>> logits = torch.zeros(1, 2, 4, requires_grad=True)
    >>> loss = rk.rspo_loss(logits, torch.tensor([[0, 1]]), torch.tensor([2.0]))
    >>> loss  # -2 * 1, on-policy ratio = 1
    tensor(-2., grad_fn=<SumBackward0>)
    >>> loss.backward(); logits.grad[0, 0]  # -2 / 2 tokens * (onehot - 1/4)
    tensor([-0.7500,  0.2500,  0.2500,  0.2500])
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
    return rspo_loss_with_options(
        logits,
        target_ids,
        weights,
        mask,
        options,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        cu_seqlens=cu_seqlens,
        inplace_backward=inplace_backward,
        return_stats=return_stats,
        weights_per=weights_per,
        tp_group=tp_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        logit_softcap=logit_softcap,
        rollout_is_weights=rollout_is_weights,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        generator=generator,
    )


def rspo_loss_with_options(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    options: LossOptions,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    inplace_backward: bool = False,
    return_stats: bool = False,
    chunk_rows: int | None = None,
    weights_per: str | None = None,
    tp_group: Any = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    logit_softcap: float | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`rspo_loss` with its hyper-parameters in one :class:`LossOptions` (what ``RSPOLoss`` calls).

    ``chunk_rows`` (an int >= 1, or None) sets the rows per chunk of the chunked torch path
    (default: about 8 MiB of float32); the Triton and reference backends have no chunks and
    ignore it. ``weights_per``, ``logit_softcap``, ``rollout_is_weights``, ``dp_size``,
    ``batch_num_tokens``, ``global_batch_size`` and ``generator`` are :func:`rspo_loss`'s.
    """
    if not isinstance(options, LossOptions):
        raise TypeError(f"options must be a rspo_kernels.loss.LossOptions, got {type(options).__name__}")
    inplace_backward = _checks.check_flag("inplace_backward", inplace_backward)
    return_stats = _checks.check_flag("return_stats", return_stats)
    chunk_rows = _checks.check_block_size("chunk_rows", chunk_rows)
    softcap = check_softcap(logit_softcap)
    shard = vocab_shard(tp_group, vocab_start, vocab_size, False, logits.shape[-1])
    _validate_loss_inputs(
        logits,
        target_ids,
        weights,
        mask,
        old_logprobs,
        ref_logprobs,
        cu_seqlens,
        options,
        id_bound(vocab_size, tp_group, logits.shape[-1]),
        weights_per=weights_per,
        rollout_is_weights=rollout_is_weights,
    )
    _checks.check_inplace("logits", logits, inplace_backward)
    batch = token_batch(
        logits,
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
    fn = logprob_op(logits.device.type, logits.dtype, shard, chunk_rows)
    logp, entropy = fn(
        batch.rows,
        batch.ids,
        batch.live,
        temperature=options.temperature,
        with_entropy=return_stats or options.entropy_coeff != 0.0,
        inplace_backward=bool(inplace_backward) and torch.is_grad_enabled(),
        softcap=softcap,
    )
    return policy_loss(batch, logp, entropy, options, return_stats)


def global_batch(options: LossOptions, dp_size: Any, batch_num_tokens: Any, global_batch_size: Any) -> GlobalBatch:
    """The validated global-batch sizes for the aggregations ``options`` uses."""
    return GlobalBatch.checked(
        dp_size, batch_num_tokens, global_batch_size, (options.loss_agg_mode, pg_aggregation(options))
    )


def check_generator(generator: Any) -> torch.Generator | None:
    """``generator`` is None or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


class RSPOLoss(nn.Module):
    """Rewards in, RSPO-weighted policy loss out: weights and loss in one module.

    Unlike :func:`rspo_loss`, the module defaults to ``loss_agg_mode="seq-mean-token-sum"``: it
    computes one weight per response, and only a normaliser that does not depend on the sampled
    lengths keeps the gradient an unbiased estimate of grad Pass@k / Max@k (docs/trainers.md §
    Aggregation; ``token-mean`` divides by the batch's token count). Pass ``loss_agg_mode`` to
    choose another mode.

    Parameters
    ----------
    objective : {"pass@k", "max@k"}, default "pass@k"
        Which objective's gradient the weights estimate (:func:`rspo_kernels.pass_at_k_weights`
        or :func:`rspo_kernels.max_at_k_weights`).
    k : int, default 4
        Sample size of the objective (numpy integers are accepted).
    estimator : str, default "rspo"
        Weight estimator (see :data:`rspo_kernels.ESTIMATORS`).
    **loss_kwargs
        Fixed keyword arguments of :func:`rspo_loss`: the :class:`LossOptions` fields
        (``temperature``, ``epsilon_low``, ``epsilon_high``, ``clip_ratio_c``, ``beta``,
        ``loss_agg_mode`` (default here ``"seq-mean-token-sum"``, see above), ``max_response_length``,
        ``entropy_coeff``, ``policy_loss``, ``policy_loss_options``, ``kl_penalty``),
        ``inplace_backward``, ``return_stats``, ``logit_softcap`` and the vocabulary-parallel
        ``tp_group``, ``vocab_start``, ``vocab_size`` (as in :func:`rspo_loss`).

    Raises
    ------
    TypeError, ValueError
        At construction: an unknown keyword, objective or estimator, a bad ``k`` or
        hyper-parameter, or an estimator that does not support the objective.

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
    >>> crit(logits, torch.zeros(4, 3, dtype=torch.long), rewards, group_size=4)  # -(2 * 3 tokens) / 4
    tensor(-1.5000, grad_fn=<SumBackward0>)
    """

    # The loss's tensor-parallel arguments, fixed at construction and passed through to the loss.
    _SHARD_KWARGS: tuple[str, ...] = ("tp_group", "vocab_start", "vocab_size")
    # Unbiased for per-response weights (class docstring); rspo_loss itself keeps verl's default.
    _DEFAULT_AGG_MODE = "seq-mean-token-sum"
    _FUNCTION = "rspo_loss"  # the function whose arguments the module takes, for the error messages

    def __init__(self, objective: str = "pass@k", k: int = 4, estimator: str = "rspo", **loss_kwargs: Any):
        super().__init__()
        from rspo_kernels.weights.api import ESTIMATORS

        if objective not in ("pass@k", "max@k"):
            raise ValueError(f"objective must be 'pass@k' or 'max@k', got {objective!r}")
        if isinstance(k, bool):
            raise TypeError(f"k must be an int, got {k!r}")
        try:
            k = operator.index(k)
        except TypeError:
            raise TypeError(f"k must be an int, got {k!r} ({type(k).__name__})") from None
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r} is not one of {ESTIMATORS}")
        allowed = LossOptions.field_names() + _CALL_KWARGS + self._SHARD_KWARGS
        unknown = sorted(set(loss_kwargs) - set(allowed))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown {self._FUNCTION} arguments {unknown}; allowed: {list(allowed)}"
            )
        self.objective = objective
        self.k = k
        self.estimator = estimator
        loss_kwargs.setdefault("loss_agg_mode", self._DEFAULT_AGG_MODE)
        passed = _CALL_KWARGS + self._SHARD_KWARGS
        self.options = LossOptions(**{n: v for n, v in loss_kwargs.items() if n not in passed})
        self.shard_kwargs = {n: loss_kwargs[n] for n in self._SHARD_KWARGS if n in loss_kwargs}
        self.inplace_backward = _checks.check_flag("inplace_backward", loss_kwargs.get("inplace_backward", False))
        self.return_stats = _checks.check_flag("return_stats", loss_kwargs.get("return_stats", False))
        self.logit_softcap = check_softcap(loss_kwargs.get("logit_softcap"))
        self.loss_kwargs = dict(loss_kwargs)
        # One tiny group of zeros (valid for every objective) runs the estimator's own checks now,
        # so a combination it rejects fails here and not at the first training step.
        self.weights(torch.zeros(1, 2 * k))

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.loss_kwargs.items())
        return f"objective={self.objective!r}, k={self.k}, estimator={self.estimator!r}{extra}"

    def weights(self, rewards: torch.Tensor, *, group_size: int | None = None, group_ids: Any = None) -> torch.Tensor:
        """The flat per-response weights this module feeds to :func:`rspo_loss`.

        Float64 for float64 rewards, float32 otherwise (the dtype
        :func:`rspo_kernels.pass_at_k_weights` returns).
        """
        from rspo_kernels.weights.api import max_at_k_weights, pass_at_k_weights

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
        assert isinstance(w, torch.Tensor)  # torch rewards in, torch weights out
        return w.reshape(-1)

    def response_weights(
        self,
        name: str,
        rows: torch.Tensor,
        rewards: torch.Tensor,
        group_size: int | None,
        group_ids: Any,
        cu_seqlens: torch.Tensor | None,
    ) -> torch.Tensor:
        """The weights of one reward per response of ``rows`` (``(B, T, D)``, or ``(N, D)`` with ``cu_seqlens``)."""
        _checks.check_logits(name, rows)
        if rows.dim() == 2:
            if cu_seqlens is None:
                raise ValueError(f"packed (N, D) {name} need cu_seqlens to map one reward to each sequence")
            n_resp, what = cu_seqlens.numel() - 1, "sequences in cu_seqlens"
        else:
            n_resp, what = rows.shape[0], f"responses (B) in {name}"
        if isinstance(rewards, torch.Tensor) and rewards.numel() != n_resp:
            raise ValueError(
                f"rewards has {rewards.numel()} entries but there are {n_resp} {what}; pass one reward per response"
            )
        return self.weights(rewards, group_size=group_size, group_ids=group_ids).to(rows.device)

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
        logits, target_ids, mask, old_logprobs, ref_logprobs, cu_seqlens
            As in :func:`rspo_loss` (padded ``(B, T, V)`` or packed ``(N, V)`` with
            ``cu_seqlens``).
        rollout_is_weights, dp_size, batch_num_tokens, global_batch_size, generator
            Per-batch inputs of :func:`rspo_loss` (rollout importance weights, verl's
            ``global_batch_info``, clip_cov's random generator).
        rewards : torch.Tensor
            One reward per response (``B`` padded, ``S`` packed): ``(B,)`` with ``group_size``
            or ``group_ids``, or ``(G, n)`` with ``G * n = B`` (responses of a prompt
            consecutive, in the order of ``logits``).
        group_size, group_ids
            Group layout, as in :func:`rspo_kernels.pass_at_k_weights`.

        Returns
        -------
        torch.Tensor or tuple
            What :func:`rspo_loss` returns.
        """
        w = self.response_weights("logits", logits, rewards, group_size, group_ids, cu_seqlens)
        return rspo_loss_with_options(
            logits,
            target_ids,
            w,
            mask,
            self.options,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            cu_seqlens=cu_seqlens,
            inplace_backward=self.inplace_backward,
            return_stats=self.return_stats,
            weights_per="sequence",
            logit_softcap=self.logit_softcap,
            **self.shard_kwargs,
            rollout_is_weights=rollout_is_weights,
            dp_size=dp_size,
            batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size,
            generator=generator,
        )
