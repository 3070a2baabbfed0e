"""The policy losses: per-token algebra on ``(N,)`` log-probs, written once, for every backend and the spec.

A fused backend (chunked torch, Triton, the linear variant, vocabulary-parallel) turns its rows
into ``(N,)`` log-probs through an autograd-aware op; everything after that is ordinary
differentiable torch on ``(N,)`` vectors, here: :func:`policy_loss` looks the loss up in
:data:`REGISTRY` by ``options.policy_loss``, so a loss registered here works on every backend, and
the unfused specification (:mod:`rspo_kernels.loss.reference`) calls the same functions
(:func:`policy_terms`, :func:`kl_estimate`) before its own, verl-shaped aggregation.

Each registered loss is a small pure function ``(logp, batch, options) -> (loss_tok, parts)``
following verl 0.9.1's ``verl.trainer.ppo.core_algos`` (the formulas, and their sources, are in
docs/loss.md): ``loss_tok`` is the ``(N,)`` per-token policy-gradient loss before the rollout
importance weights and the aggregation, 0 at tokens that are not ``live`` (whose inputs may hold
anything: every function feeds them finite stand-ins, so no NaN reaches a gradient).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from rspo_kernels.loss.layout import TokenBatch
from rspo_kernels.loss.options import LOG_RATIO_CLAMP, POLICY_LOSS_KEYS, LossOptions

__all__ = [
    "REGISTRY",
    "is_token_local",
    "kl_estimate",
    "policy_loss",
    "policy_terms",
    "summarize_stats",
    "token_grads",
]

Parts = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, TokenBatch, LossOptions], tuple[torch.Tensor, Parts]]


@dataclasses.dataclass(frozen=True)
class RegisteredLoss:
    """One policy loss: its function and what a backend must know about it.

    ``local``: ``loss_tok`` of a token reads only that token's values (see :func:`is_token_local`).
    ``seq_is_weights``: the loss applies the rollout importance weights itself (GMPO's per-sequence
    geometric mean); the others are multiplied by them token by token, as verl does.
    """

    fn: LossFn
    local: bool
    seq_is_weights: bool = False


REGISTRY: dict[str, RegisteredLoss] = {}


def _register(name: str, *, local: bool, seq_is_weights: bool = False) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        REGISTRY[name] = RegisteredLoss(fn, local, seq_is_weights)
        return fn

    return deco


# --- shared pieces --------------------------------------------------------------------------------


def _inputs(logp: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(old, adv, zero)`` with finite stand-ins at dead tokens (old = logp: ratio 1; adv = 0).

    ``old_logp=None`` is on-policy: ``old = logp.detach()``.
    """
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    lp_const = logp.detach()
    old = lp_const if batch.old is None else torch.where(batch.live, batch.old, lp_const)
    return old, torch.where(batch.live, batch.adv, zero), zero


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    x = torch.where(m != 0, x.to(m.dtype) * m, torch.zeros_like(m))
    return x.sum() / torch.where(m.sum() > 0, m.sum(), torch.ones_like(m.sum()))


def _seq_sum(x: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """``(S,)`` masked sums per sequence (``x`` finite at dead tokens)."""
    assert batch.seq is not None
    out = torch.zeros(batch.n_seqs, dtype=x.dtype, device=x.device)
    return out.index_add(0, batch.seq, x * batch.mask)


def _seq_count(batch: TokenBatch) -> torch.Tensor:
    n = _seq_sum(torch.ones_like(batch.mask), batch)
    return torch.where(n > 0, n, torch.ones_like(n))  # an empty sequence's sums are 0: 0 / 1


def _ppo_clip(ratio: torch.Tensor, a: torch.Tensor, options: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` and verl's ``pg_clipfrac`` indicator."""
    pg1 = -a * ratio
    pg2 = -a * torch.clamp(ratio, 1.0 - options.epsilon_low, 1.0 + options.eps_high)
    return torch.maximum(pg1, pg2), pg2 > pg1


# --- verl 0.9.1's eleven ------------------------------------------------------------------------------


@_register("vanilla", local=True)
def _vanilla(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    """PPO clip (Schulman et al. 2017), dual-clip for ``A < 0`` (Ye et al. 2019) with ``clip_ratio_c``."""
    old, a, _ = _inputs(logp, batch)
    log_ratio = torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    loss, clipped = _ppo_clip(torch.exp(log_ratio), a, options)
    parts = {"clipped": clipped, "neg_log_ratio": -log_ratio}
    if options.clip_ratio_c is not None:
        pg3 = -a * options.clip_ratio_c
        parts["dual_clipped"] = (loss > pg3) & (a < 0)
        loss = torch.where(a < 0, torch.minimum(pg3, loss), loss)
    return loss, parts


def _dppo(logp: torch.Tensor, batch: TokenBatch, options: LossOptions, divergence: str) -> tuple[torch.Tensor, Parts]:
    """DPPO-Binary (arXiv 2602.04879): ``-A sg(min(r, c)) logp`` on tokens inside the trust region."""
    old, a, _ = _inputs(logp, batch)
    log_ratio = torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    c = options.clip_ratio_c
    truncated = (ratio if c is None else torch.clamp(ratio, max=c)).detach()
    prob, old_prob = logp.detach().exp(), old.exp()
    if divergence == "tv":
        ok_pos = prob - old_prob <= options.eps_high
        ok_neg = prob - old_prob >= -options.epsilon_low
    else:
        # Binary KL between Bernoulli(old_prob) and Bernoulli(prob); verl's 1e-8 keeps log finite at p = 1.
        lp = logp.detach()
        bkl = old_prob * (old - lp) + (1 - old_prob) * torch.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        ok_pos = (bkl <= options.eps_high) | (prob <= old_prob)
        ok_neg = (bkl <= options.epsilon_low) | (prob >= old_prob)
    valid = torch.where(a > 0, ok_pos, ok_neg).to(logp.dtype)
    loss = -a * truncated * logp * valid
    parts = {"clipped": valid == 0, "neg_log_ratio": -log_ratio}
    if c is not None:
        parts["dual_clipped"] = (ratio > c) & (valid != 0)
    return loss, parts


@_register("dppo_tv", local=True)
def _dppo_tv(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    return _dppo(logp, batch, options, "tv")


@_register("dppo_kl", local=True)
def _dppo_kl(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    return _dppo(logp, batch, options, "kl")


@_register("gspo", local=False)
def _gspo(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    """GSPO (arXiv 2507.18071): PPO clip of ``s_t = sg(s) * p_t / sg(p_t)``, ``log s`` the sequence mean log-ratio."""
    old, a, _ = _inputs(logp, batch)
    log_ratio = logp - old  # verl does not clamp here; the combined log-ratio is clamped at 10 below
    seq_mean = (_seq_sum(log_ratio.detach(), batch) / _seq_count(batch)).detach()
    assert batch.seq is not None
    log_s = torch.clamp(logp - logp.detach() + seq_mean[batch.seq], max=10.0)
    loss, clipped = _ppo_clip(torch.exp(log_s), a, options)
    return loss, {"clipped": clipped, "neg_log_ratio": -log_ratio.detach()}


@_register("sapo", local=True)
def _sapo(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    """SAPO (arXiv 2511.20347): ``-A * 4/tau * sigmoid(tau (r - 1))``, ``tau = tau_pos if A > 0 else tau_neg``."""
    old, a, _ = _inputs(logp, batch)
    log_ratio = torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    tau_pos = torch.tensor(options.loss_option("tau_pos"), dtype=logp.dtype, device=logp.device)
    tau_neg = torch.tensor(options.loss_option("tau_neg"), dtype=logp.dtype, device=logp.device)
    tau = torch.where(a > 0, tau_pos, tau_neg)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    return -gate * a, {"neg_log_ratio": -log_ratio}


@_register("gpg", local=True)
def _gpg(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    """GPG (arXiv 2504.02546): the plain policy gradient ``-A logp``."""
    old, a, _ = _inputs(logp, batch)
    return -logp * a, {"neg_log_ratio": (old - logp).detach()}


@_register("clip_cov", local=False)
def _clip_cov(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    """Clip-Cov (arXiv 2505.22617): PPO clip, with a random few high-covariance tokens' gradient cut.

    Among live tokens not already clipped whose ``cov = (A - mean A)(logp - mean logp)`` lies in
    ``(clip_cov_lb, clip_cov_ub)``, ``max(1, int(clip_cov_ratio * n_live))`` are drawn at random
    (``torch.randperm`` with ``batch.generator``; torch's global generator when None, as verl)
    and get loss 0. The draw is in token order (sequence-major), as verl's ``nonzero`` on (B, T).
    One host synchronisation (the count), as in verl.
    """
    old, a, _ = _inputs(logp, batch)
    log_ratio = logp - old  # verl does not clamp in clip_cov
    loss, clipped = _ppo_clip(torch.exp(log_ratio), a, options)
    lp = logp.detach()
    cov = (a - _masked_mean(a, batch.mask)) * (lp - _masked_mean(lp, batch.mask))
    lb, ub = options.loss_option("clip_cov_lb"), options.loss_option("clip_cov_ub")
    candidates = batch.live & ~clipped & (cov > lb) & (cov < ub)
    n_clip = max(int(options.loss_option("clip_cov_ratio") * float(batch.mask.sum())), 1)
    idx = torch.nonzero(candidates).squeeze(-1)
    keep = torch.ones_like(loss)
    if idx.numel() > 0:  # verl draws nothing (and leaves the generator alone) when no token qualifies
        gen = batch.generator
        perm = torch.randperm(idx.numel(), generator=gen, device=gen.device if gen is not None else "cpu")
        keep[idx[perm[:n_clip].to(idx.device)]] = 0.0
    return loss * keep, {"clipped": keep == 0, "neg_log_ratio": -log_ratio.detach()}


@_register("kl_cov", local=False)
def _kl_cov(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    """KL-Cov (arXiv 2505.22617): ``-A r``, plus ``ppo_kl_coef * |logp - old|`` on the top-covariance tokens.

    The ``max(1, int(kl_cov_ratio * n_live))`` live tokens of largest
    ``(A - mean A)(logp - mean logp)`` (means over live tokens) get the penalty. One host
    synchronisation (the count), as in verl.
    """
    old, a, _ = _inputs(logp, batch)
    log_ratio = logp - old  # verl does not clamp in kl_cov
    loss = -a * torch.exp(log_ratio)
    live_idx = torch.nonzero(batch.live).squeeze(-1)
    chosen = torch.zeros_like(batch.live)
    n_live = live_idx.numel()
    if n_live > 0:
        a_v, lp_v = a[live_idx], logp.detach()[live_idx]
        cov = (a_v - a_v.mean()) * (lp_v - lp_v.mean())
        k = max(1, int(n_live * options.loss_option("kl_cov_ratio")))
        chosen[live_idx[torch.topk(cov, k, largest=True).indices]] = True
        loss = torch.where(chosen, loss + options.loss_option("ppo_kl_coef") * log_ratio.abs(), loss)
    return loss, {"clipped": chosen, "neg_log_ratio": log_ratio.detach().abs()}


@_register("geo_mean", local=False, seq_is_weights=True)
def _geo_mean(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    """GMPO (arXiv 2507.20673): ``-mean_t(A) * exp(mean_t clip_sgn(A)(log r))`` per sequence.

    The token log-ratios are clipped to ``[-eps_low, eps_high]`` on the side ``sgn(A)`` makes
    pessimistic; the sequence loss is spread over its live tokens (``pg_coef`` averages them, then
    the sequences), with the rollout weights' per-sequence geometric mean (``log(w + 1e-10)``, as verl).
    """
    old, a, zero = _inputs(logp, batch)
    log_ratio = logp - old  # verl leaves the clamp commented out here
    sgn = torch.sign(a)
    clamped = torch.clamp(log_ratio, -options.epsilon_low, options.eps_high)
    pessimistic = sgn * torch.minimum(sgn * log_ratio, sgn * clamped)
    count = _seq_count(batch)
    ratio = torch.exp(_seq_sum(pessimistic, batch) / count)
    seq_loss = -(_seq_sum(a, batch) / count) * ratio
    if batch.is_weights is not None:
        w = torch.where(batch.live, batch.is_weights, torch.ones_like(batch.is_weights))
        seq_loss = seq_loss * torch.exp(_seq_sum(torch.log(w + 1e-10), batch) / count)
    assert batch.seq is not None
    clipped = log_ratio.detach() != clamped.detach()
    parts = {"clipped": clipped & (a > 0), "dual_clipped": clipped & (a < 0), "neg_log_ratio": -log_ratio.detach()}
    return torch.where(batch.live, seq_loss[batch.seq], zero), parts


@_register("dro", local=True)
def _dro(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    """DRO (arXiv 2506.09247 as in verl): ``-(A logp - dro_beta / 2 * (logp - old)^2)``."""
    old, a, _ = _inputs(logp, batch)
    log_ratio = logp - old
    loss = -(logp * a - 0.5 * options.loss_option("dro_beta") * log_ratio.square())
    return loss, {"neg_log_ratio": -log_ratio.detach()}


@_register("cispo", local=True)
def _cispo(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): ``-sg(clip(r, 1 - eps_low, 1 + eps_high)) A logp``."""
    old, a, _ = _inputs(logp, batch)
    log_ratio = torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio).detach()
    clipped_ratio = torch.clamp(ratio, 1.0 - options.epsilon_low, 1.0 + options.eps_high)
    return -clipped_ratio * a * logp, {"clipped": ratio != clipped_ratio, "neg_log_ratio": -log_ratio}


# --- TRL 1.16 / Liger-Kernel 0.8.5's variants, under their own names ----------------------------------


@_register("cispo_trl", local=True)
def _cispo_trl(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    """TRL's CISPO: ``-sg(min(r, epsilon_high)) A logp``, one-sided, capped at ``epsilon_high`` itself (eps_max)."""
    old, a, _ = _inputs(logp, batch)
    log_ratio = logp - old  # TRL does not clamp
    ratio = torch.exp(log_ratio).detach()
    capped = torch.clamp(ratio, max=options.eps_high)
    return -capped * a * logp, {"clipped": (ratio > options.eps_high) & (a > 0), "neg_log_ratio": -log_ratio}


@_register("two_sided_clip", local=True)
def _two_sided_clip(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    """INTELLECT-2's two-sided clip (arXiv 2505.07291, TRL's ``delta``): ``-min(min(r, delta) A, clip(r) A)``."""
    old, a, _ = _inputs(logp, batch)
    log_ratio = logp - old  # TRL does not clamp
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - options.epsilon_low, 1.0 + options.eps_high)
    capped = torch.clamp(ratio, max=options.loss_option("delta"))
    loss = -torch.minimum(capped * a, clipped * a)
    return loss, {"clipped": clipped * a < capped * a, "neg_log_ratio": -log_ratio}


@_register("vespo", local=False, seq_is_weights=True)
def _vespo(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    """VESPO (arXiv 2602.10693; TRL's ``get_gamma_weights``): ``-sg(phi(w)) A logp``, ``phi(w) = e^lam w^k e^(-lam w)``.

    ``w`` is the sequence's ratio ``exp(sum_t clamp(logp - old, ±20))`` times the product of its
    rollout importance weights (each log clamped to ``[log 1e-8, 20]``, the sum too); ``k, lam``
    are ``vespo_k_pos, vespo_lambda_pos`` for ``A >= 0``, else the ``_neg`` pair. The rollout
    weights enter only through ``w`` (not multiplied per token), as TRL and Liger.
    """
    old, a, zero = _inputs(logp, batch)
    log_ratio = torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).detach()
    lower = -18.420680743952367  # log(1e-8), TRL's floor
    seq_log = _seq_sum(log_ratio, batch)
    if batch.is_weights is not None:
        w_tok = torch.where(batch.live, batch.is_weights, torch.ones_like(batch.is_weights))
        seq_log = seq_log + _seq_sum(torch.clamp(torch.log(w_tok), lower, LOG_RATIO_CLAMP), batch)
    assert batch.seq is not None
    log_w = torch.clamp(seq_log, lower, LOG_RATIO_CLAMP)[batch.seq]
    nonneg = a >= 0
    k = torch.where(nonneg, options.loss_option("vespo_k_pos"), options.loss_option("vespo_k_neg")).to(logp.dtype)
    lam = torch.where(nonneg, options.loss_option("vespo_lambda_pos"), options.loss_option("vespo_lambda_neg"))
    lam = lam.to(logp.dtype).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi.detach() * a * logp, {"neg_log_ratio": -log_ratio}


@_register("luspo", local=False)
def _luspo(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    """LUSPO (arXiv 2602.05261, TRL / Liger): PPO clip of ``s = exp(mean_seq(logp - old))``, summed over tokens.

    The gradient flows through the sequence mean (TRL's sequence-level ratio); each token carries
    its sequence's loss and the aggregation sums them per sequence and averages over all sequences.
    """
    old, a, _ = _inputs(logp, batch)
    log_ratio = logp - old
    assert batch.seq is not None
    s = torch.exp(_seq_sum(log_ratio, batch) / _seq_count(batch))[batch.seq]
    loss, clipped = _ppo_clip(s, a, options)
    return loss, {"clipped": clipped, "neg_log_ratio": -log_ratio.detach()}


assert set(REGISTRY) == set(POLICY_LOSS_KEYS), "options.POLICY_LOSS_KEYS and the registry must list the same losses"


# --- KL, the dispatcher, statistics -----------------------------------------------------------------


def kl_estimate(logp: torch.Tensor, ref: torch.Tensor, name: str) -> torch.Tensor:
    """verl's ``kl_penalty(logp, ref, name)`` per token (:data:`rspo_kernels.loss.options.KL_PENALTIES`).

    ``k1 = logp - ref``, ``abs = |logp - ref|``, ``k2 = (logp - ref)^2 / 2``,
    ``k3 = e^d - d - 1`` with ``d = clamp(ref - logp, -20, 20)`` (Schulman, "Approximating KL
    divergence", 2020), clamped to [-10, 10] except in ``k3_unclamped``. A ``+`` suffix keeps the
    value and takes k2's gradient ``logp - ref`` (straight-through).
    """
    st = name.endswith("+")
    base = name[:-1] if st else name
    diff = logp - ref
    if base in ("kl", "k1"):
        value = diff
    elif base == "abs":
        value = diff.abs()
    elif base in ("mse", "k2"):
        value = 0.5 * diff.square()
    elif base in ("low_var_kl", "k3", "k3_unclamped"):
        d = torch.clamp(ref - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        value = torch.exp(d) - d - 1.0
        if base != "k3_unclamped":
            value = torch.clamp(value, -10.0, 10.0)
    else:
        raise ValueError(f"unknown kl_penalty {name!r}")
    if st:
        k2 = 0.5 * diff.square()
        value = k2 - k2.detach() + value.detach()
    return value


def policy_terms(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> tuple[torch.Tensor, Parts]:
    """The chosen loss's per-token policy-gradient loss (rollout weights applied, 0 off ``live``) and parts.

    ``sum(batch.pg_coef * loss_tok)`` is the policy-gradient term of the loss. ``parts`` holds
    detached ``(N,)`` pieces for the statistics: ``neg_log_ratio`` (verl's ``ppo_kl`` terms) and,
    where the loss has them, ``clipped`` (``pg_clipfrac``) and ``dual_clipped`` (``pg_clipfrac_lower``).
    """
    entry = REGISTRY[options.policy_loss]
    loss, parts = entry.fn(logp, batch, options)
    if batch.is_weights is not None and not entry.seq_is_weights:
        loss = loss * torch.where(batch.live, batch.is_weights, torch.ones_like(batch.is_weights))
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    parts = {k: torch.where(batch.live, v.detach(), torch.zeros_like(v)) for k, v in parts.items()}
    return torch.where(batch.live, loss, zero), parts


def kl_terms(logp: torch.Tensor, batch: TokenBatch, options: LossOptions) -> torch.Tensor | None:
    """``(N,)`` KL estimates to the reference (0 off ``live``), or None without ``ref``."""
    if batch.ref is None:
        return None
    ref = torch.where(batch.live, batch.ref, logp.detach())
    kl = kl_estimate(logp, ref, options.kl_penalty)
    return torch.where(batch.live, kl, torch.zeros((), dtype=logp.dtype, device=logp.device))


def policy_loss(
    batch: TokenBatch,
    logp: torch.Tensor,
    entropy: torch.Tensor | None,
    options: LossOptions,
    return_stats: bool,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``pg + beta * agg(kl) - entropy_coeff * agg(entropy)`` and, when asked, the logged statistics.

    As verl's actor (``verl.workers.utils.losses.ppo_loss``): the policy loss aggregated as the
    loss demands (``batch.pg_coef``), the KL estimate and the entropy with ``loss_agg_mode``
    (``batch.coef``).

    Parameters
    ----------
    batch : TokenBatch
        The normalised inputs (:func:`rspo_kernels.loss.layout.token_batch`).
    logp : torch.Tensor
        ``(N,)`` differentiable log-probs, 0 where ``batch.live`` is False.
    entropy : torch.Tensor or None
        ``(N,)`` entropies, differentiable (needed for the stats and for ``entropy_coeff``).
    options : LossOptions
        Hyper-parameters; ``options.policy_loss`` picks the loss from :data:`REGISTRY`.
    return_stats : bool
        Also return the detached statistics dict.

    Returns
    -------
    torch.Tensor or tuple
        The 0-d loss in ``logp.dtype``, and the statistics when asked.
    """
    loss_tok, parts = policy_terms(logp, batch, options)
    assert batch.pg_coef is not None
    loss = (batch.pg_coef * loss_tok).sum()
    kl = kl_terms(logp, batch, options)
    if kl is not None:
        parts["kl"] = kl.detach()
        if options.beta != 0.0:
            loss = loss + options.beta * (batch.coef * kl).sum()
    if options.entropy_coeff != 0.0:
        if entropy is None:
            raise ValueError("entropy_coeff != 0 needs the entropies: compute them with with_entropy=True")
        # verl's ppo_loss: minus entropy_coeff times the entropy aggregated with loss_agg_mode.
        loss = loss - options.entropy_coeff * (batch.coef * entropy).sum()
    if not return_stats:
        return loss
    return loss, summarize_stats(batch.mask, logp, None if entropy is None else entropy.detach(), parts)


def summarize_stats(
    mask: torch.Tensor, logp: torch.Tensor, entropy: torch.Tensor | None, parts: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Masked token means of what trainers log; detached 0-d tensors (0 where nothing is live).

    Keys: ``logprob_mean``, ``entropy_mean``, ``clip_fraction`` (verl's ``pg_clipfrac``; 0 for
    losses without clipping), ``approx_kl`` (verl's ``ppo_kl``: mean ``old - logp``, clamped as
    the loss clamps it; mean ``|logp - old|`` for kl_cov), and when present
    ``dual_clip_fraction`` (verl's ``pg_clipfrac_lower``) and ``ref_kl`` (mean KL estimate).
    """
    with torch.no_grad():
        zeros = torch.zeros_like(mask)
        stats = {
            "logprob_mean": _masked_mean(logp.detach(), mask),
            "entropy_mean": _masked_mean(entropy if entropy is not None else zeros, mask),
            "clip_fraction": _masked_mean(parts.get("clipped", zeros), mask),
            "approx_kl": _masked_mean(parts["neg_log_ratio"], mask),
        }
        if "dual_clipped" in parts:
            stats["dual_clip_fraction"] = _masked_mean(parts["dual_clipped"], mask)
        if "kl" in parts:
            stats["ref_kl"] = _masked_mean(parts["kl"], mask)
    return {k: v.detach() for k, v in stats.items()}


def is_token_local(options: LossOptions) -> bool:
    """Whether the loss is ``sum_tok f_tok(logp_tok, entropy_tok)``: each token's term reads only its own values.

    Then ``dL/dlogp_tok`` and ``dL/dentropy_tok`` of one token are known as soon as that token's
    log-prob and entropy are, and a backend may form the logits' gradient block by block during
    its forward (:func:`token_grads`); the aggregation coefficients (``batch.coef``,
    ``batch.pg_coef``) and rollout weights are per-token constants of the batch. True for
    vanilla, dppo_tv, dppo_kl, sapo, gpg, dro, cispo, cispo_trl and two_sided_clip (with any KL
    estimator and entropy bonus). Sequence-level ratios (gspo, geo_mean, vespo, luspo) and
    batch-level token selection (clip_cov, kl_cov) are not local: their backends take the
    two-pass route (log-probs first, then autograd through :func:`policy_loss`).
    """
    return REGISTRY[options.policy_loss].local


def token_grads(
    batch: TokenBatch, logp: torch.Tensor, entropy: torch.Tensor | None, options: LossOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(loss, dL/dlogp, dL/dentropy)`` of a token-local loss on ``batch`` (a chunk of tokens, or all).

    ``logp`` and ``entropy`` are detached ``(n,)`` values; the derivatives are ``(n,)`` in their
    dtype (``dL/dentropy`` None without an entropy term). Summed over a partition of the tokens,
    the losses give :func:`policy_loss`'s value and the derivatives its gradient. This is where the
    per-token gradient ``g`` and the entropy's ``g_H`` of the fused backwards come from; every
    backend calls it (or autograd through :func:`policy_loss`), none re-derives the algebra.
    """
    if not is_token_local(options):
        raise ValueError(
            f"token_grads needs a token-local loss (see is_token_local); policy_loss={options.policy_loss!r} is not"
        )
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(True)
        ent = None
        if entropy is not None and options.entropy_coeff != 0.0:
            ent = entropy.detach().requires_grad_(True)
        loss = policy_loss(batch, lp, ent, options, False)
        assert isinstance(loss, torch.Tensor)
        inputs = [lp] if ent is None else [lp, ent]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    g = torch.zeros_like(lp) if grads[0] is None else grads[0]
    g_h = None if ent is None else (torch.zeros_like(ent) if grads[1] is None else grads[1])
    return loss.detach(), g.detach(), None if g_h is None else g_h.detach()
