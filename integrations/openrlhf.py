"""RSPO for OpenRLHF 0.11: RSPO weights as the advantages of ``RemoteExperienceMaker``.

OpenRLHF has no estimator registry, so :func:`install` replaces
``RemoteExperienceMaker.compute_advantages_and_returns`` with :func:`compute_advantages_and_returns`,
which keeps every step of the original (length penalties, grouping through ``experience.index``,
the KL reward, cumulative returns, the logged ``reward``/``return``/``group_reward_std``) and
replaces only the group baseline with RSPO weights (and drops the whitening).

The experience maker lives in a Ray actor: :func:`install` runs in every worker as the job's
``worker_process_setup_hook``, set in ``ray job submit --runtime-env-json`` or, for a driver
started directly, by :func:`runtime_env_hook` (``RAY_RUNTIME_ENV_HOOK``); README, "OpenRLHF".
Settings come from the environment: ``RSPO_K`` (default 4), ``RSPO_OBJECTIVE`` (``pass@k``,
``max@k`` or ``maxrl``), ``RSPO_ESTIMATOR`` (default ``rspo``), ``RSPO_ORDER`` (MaxRL's truncation
order, default the group size) and ``RSPO_K_SCHEDULE`` (``8:0,4:200,1:400``: k = 8 from step 0,
4 from step 200, 1 from step 400; the order under ``maxrl``), checked against OpenRLHF's
arguments by the driver hook (before any model starts) and when the experience maker is built.
The k in force is logged as ``rspo_k`` (``rspo_order``) with the other experience ``info``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

from rspo_kernels.integrations import openrlhf_fused
from rspo_kernels.integrations._common import DEFAULT_K, RSPOSettings, unwrap, when_imported, wrap

__all__ = [
    "SETUP_HOOK",
    "check_arguments",
    "compute_advantages_and_returns",
    "install",
    "runtime_env_hook",
    "settings_from_env",
    "uninstall",
]

SETUP_HOOK = f"{__name__}.install"
ENV_VARS = ("RSPO_K", "RSPO_OBJECTIVE", "RSPO_ESTIMATOR", "RSPO_ORDER", "RSPO_K_SCHEDULE", openrlhf_fused.ENV_VAR)
_KEYS = {
    "objective": "RSPO_OBJECTIVE",
    "k": "RSPO_K",
    "estimator": "RSPO_ESTIMATOR",
    "order": "RSPO_ORDER",
    "schedule": "RSPO_K_SCHEDULE",
}
_KEYS["n"] = "--rollout.n_samples_per_prompt"
_MAKER = "openrlhf.trainer.ppo_utils.experience_maker"
_TRAINER = "openrlhf.trainer.ppo_trainer"
logger = logging.getLogger(__name__)


def settings_from_env(environ: Mapping[str, str] | None = None) -> RSPOSettings:
    """Read ``RSPO_K``, ``RSPO_OBJECTIVE``, ``RSPO_ESTIMATOR``, ``RSPO_ORDER`` and ``RSPO_K_SCHEDULE``.

    ``environ`` defaults to :data:`os.environ`.

    Raises
    ------
    ValueError
        An invalid value; the message names the variable.
    """
    env = os.environ if environ is None else environ
    return RSPOSettings.create(
        objective=env.get("RSPO_OBJECTIVE", "pass@k"),
        k=env.get("RSPO_K", str(DEFAULT_K)),
        estimator=env.get("RSPO_ESTIMATOR", "rspo"),
        keys=_KEYS,
        order=env.get("RSPO_ORDER"),
        schedule=env.get("RSPO_K_SCHEDULE"),
    )


def check_arguments(estimator: str, n_samples_per_prompt: int, loss_agg_mode: str = "token-mean") -> RSPOSettings:
    """Check OpenRLHF's arguments against the ``RSPO_*`` environment.

    Parameters
    ----------
    estimator, n_samples_per_prompt, loss_agg_mode
        ``--algo.advantage.estimator``, ``--rollout.n_samples_per_prompt``, ``--actor.loss_agg_mode``.

    Raises
    ------
    ValueError
        An estimator other than ``reinforce`` (every other one subtracts a baseline, whitens or
        trains a critic, which RSPO replaces), a bad ``RSPO_*`` value, or ``RSPO_K`` larger than
        ``--rollout.n_samples_per_prompt``.
    """
    if estimator != "reinforce":
        raise ValueError(
            f"--algo.advantage.estimator {estimator} cannot run under RSPO, which replaces the advantage "
            "estimator: launch with --algo.advantage.estimator reinforce"
        )
    settings = settings_from_env()
    settings.check_group_size(n_samples_per_prompt)
    if loss_agg_mode != "token-mean":
        logger.warning(
            "--actor.loss_agg_mode %s divides each response by its own length, which biases the RSPO gradient "
            "towards short responses: use token-mean",
            loss_agg_mode,
        )
    return settings


def _check(args: Any) -> RSPOSettings:
    actor = getattr(args, "actor", None)
    mode = getattr(actor, "loss_agg_mode", "token-mean")
    return check_arguments(args.algo.advantage.estimator, args.rollout.n_samples_per_prompt, mode)


@torch.no_grad()
def compute_advantages_and_returns(self: Any, experiences: list) -> list:
    """``RemoteExperienceMaker.compute_advantages_and_returns`` with RSPO weights as advantages.

    Parameters
    ----------
    self : openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker
    experiences : list of openrlhf.trainer.ppo_utils.Experience
        With ``rewards`` ``(B,)``, ``index`` (position of each sample in the rollout, prompt after
        prompt, ``n_samples_per_prompt`` samples each), ``action_mask`` and ``kl`` ``(B, A)``.

    Returns
    -------
    list of Experience
        The same objects. ``advantages`` and ``returns`` ``(B, A)``: the response's RSPO weight on
        every action token, plus the usual KL reward-to-go, 0 on padding. ``info`` gains
        ``rspo_weight`` ``(B,)`` and ``rspo_k`` (the k in force; ``rspo_order`` under MaxRL), which
        OpenRLHF logs with the other ``info`` entries.

    Raises
    ------
    ValueError
        As :func:`check_arguments`, or non-binary rewards under Pass@k.

    Notes
    -----
    ``--reward.clip_range`` clips the rewards before RSPO, not the weights (a Pass@k weight can
    reach k). Returns use gamma = 1: discounting would bias the trajectory-level weights. The KL
    penalty (``--algo.kl.init_coef`` without ``--algo.kl.use_loss``) is not part of the reward
    that RSPO weighs: it is added per token afterwards, so the advantage is the RSPO weight minus
    ``init_coef`` times the KL still to come, and Pass@k rewards stay binary.
    """
    # Not openrlhf.models: its package imports flash_attn.
    from openrlhf.trainer.ppo_utils.length_penalty import apply_length_penalties

    args = self.strategy.args
    # The trainer's step (set by the wrapped train_step; 0 before any) picks the scheduled k.
    settings = _check(args).at_step(getattr(self, "_rspo_step", 0))
    logged_name, logged_value = settings.logged
    n = args.rollout.n_samples_per_prompt
    if args.algo.advantage.gamma != 1.0:
        logger.warning("RSPO uses gamma = 1.0 (got --algo.advantage.gamma %s)", args.algo.advantage.gamma)

    for experience in experiences:
        experience.rewards = experience.rewards.to(torch.promote_types(experience.rewards.dtype, torch.float32))
    apply_length_penalties(experiences, args)

    # Back to rollout order (prompt after prompt), one group per row, as the original does.
    exp_len = [len(experience.index) for experience in experiences]
    indices = torch.tensor(list(itertools.chain.from_iterable(experience.index for experience in experiences)))
    raw_rewards = torch.cat([experience.rewards for experience in experiences], dim=0)
    rewards = torch.empty_like(raw_rewards)
    rewards[indices] = raw_rewards
    rewards = rewards.reshape(-1, n)
    if n > 1:
        stds = rewards.std(-1, keepdim=True).repeat(1, n).reshape(-1)[indices].split(exp_len)
        for experience, std in zip(experiences, stds, strict=False):
            experience.info["group_reward_std"] = std
    if args.reward.clip_range:
        rewards = rewards.clamp(min=args.reward.clip_range[0], max=args.reward.clip_range[1])
    weights = settings.weights(rewards).reshape(-1)[indices].split(exp_len)

    kl_coef = max(self.kl_ctl.value, 0.0)
    for experience, weight in zip(experiences, weights, strict=False):
        # OpenRLHF's KL-in-reward: the weight on the last action token, -kl_coef * KL on every token.
        mask = experience.action_mask
        last = mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
        reward = (-kl_coef * experience.kl).scatter_add(1, last, weight.unsqueeze(1).to(experience.kl.dtype))
        experience.returns = self.get_cumulative_returns(reward, experience.action_mask, 1.0)
        experience.advantages = experience.returns.clone()
        experience.info["return"] = reward.sum(dim=-1)
        experience.info["rspo_weight"] = weight
        experience.info[logged_name.replace("/", "_")] = torch.full_like(weight, logged_value, dtype=torch.float32)
        experience.kl = None
    return experiences


def _patch(module: Any) -> None:
    def compute(original):
        @functools.wraps(compute_advantages_and_returns)
        def patched(self, experiences):
            return compute_advantages_and_returns(self, experiences)

        return patched

    def init(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            _check(self.strategy.args)  # the trainer actor builds it before the policy loads

        return __init__

    wrap(module.RemoteExperienceMaker, "compute_advantages_and_returns", compute)
    wrap(module.RemoteExperienceMaker, "__init__", init)


def _patch_trainer(module: Any) -> None:
    """``train_step(rollout_samples, global_step)`` tells its experience maker the step (k schedule)."""

    def train_step(original):
        @functools.wraps(original)
        def patched(self, rollout_samples, global_step, *args, **kwargs):
            maker = getattr(self, "experience_maker", None)
            if maker is not None:
                maker._rspo_step = int(global_step)
            return original(self, rollout_samples, global_step, *args, **kwargs)

        return patched

    wrap(module.BasePPOTrainer, "train_step", train_step)


def install() -> None:
    """Patch ``RemoteExperienceMaker`` in this process, now or when it is first imported; idempotent.

    Use it as Ray's ``worker_process_setup_hook`` (:data:`SETUP_HOOK`). It imports nothing from
    OpenRLHF, so it cannot fail in a worker that lacks flash_attn or vLLM.
    """
    when_imported(_MAKER, _patch)
    when_imported(_TRAINER, _patch_trainer)
    openrlhf_fused.install()  # RSPO_FUSED_LOGPROBS=1: Actor.forward from the hidden states


def uninstall() -> None:
    """Restore OpenRLHF's own experience maker (and trainer step) in this process."""
    maker = getattr(sys.modules.get(_MAKER), "RemoteExperienceMaker", None)
    for name in ("compute_advantages_and_returns", "__init__"):
        unwrap(maker, name)
    unwrap(getattr(sys.modules.get(_TRAINER), "BasePPOTrainer", None), "train_step")
    openrlhf_fused.uninstall()


def runtime_env_hook(runtime_env: dict | None) -> dict:
    """Ray runtime-env hook (``RAY_RUNTIME_ENV_HOOK``) that adds :func:`install` to a job.

    Ray calls it inside the driver's ``ray.init``, which ``train_ppo_ray`` runs before it starts
    any model. It checks the ``RSPO_*`` variables (against the command line when the driver is
    ``train_ppo_ray``), and returns a copy of ``runtime_env`` (a dict or None) whose
    ``worker_process_setup_hook`` is :data:`SETUP_HOOK` and whose ``env_vars`` carry the
    driver's ``RSPO_*`` variables.

    Raises
    ------
    ValueError
        When the job already has a different setup hook (call :func:`install` from it instead),
        or as :func:`check_arguments`.
    """
    settings_from_env()
    openrlhf_fused.enabled()  # a bad RSPO_FUSED_LOGPROBS fails here, before any worker starts
    if os.path.basename(sys.argv[0]) == "train_ppo_ray.py":
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--algo.advantage.estimator", dest="estimator", default="gae")
        parser.add_argument("--rollout.n_samples_per_prompt", dest="n", type=int, default=1)
        parser.add_argument("--actor.loss_agg_mode", dest="mode", default="token-mean")
        argv, _ = parser.parse_known_args(sys.argv[1:])
        check_arguments(argv.estimator, argv.n, argv.mode)
    env = dict(runtime_env or {})
    hook = env.get("worker_process_setup_hook")
    if hook is not None and hook != SETUP_HOOK:
        raise ValueError(
            f"the Ray job already has worker_process_setup_hook={hook!r}; call {SETUP_HOOK}() from that hook"
        )
    env["worker_process_setup_hook"] = SETUP_HOOK
    forwarded = {key: os.environ[key] for key in ENV_VARS if key in os.environ}
    env["env_vars"] = {**forwarded, **(env.get("env_vars") or {})}
    return env
