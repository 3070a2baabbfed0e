"""RSPO as a verl advantage estimator: ``algorithm.adv_estimator=rspo``.

Importing this module registers the estimator ``"rspo"`` with
``verl.trainer.ppo.core_algos.register_adv_est``. verl imports it in every process through the
``verl.plugins`` entry point that ``pip install rspo_kernels`` declares, so a plain ``import verl``
is enough, on the driver and in every Ray worker. Where entry points are disabled
(``VERL_USE_EXTERNAL_PLUGINS=none``), set ``VERL_USE_EXTERNAL_MODULES=rspo_kernels.integrations.verl``
in the environment of every node instead.

Options, read from the algorithm config (all optional)::

    algorithm.adv_estimator=rspo
    +algorithm.rspo_objective=pass@k     # or max@k for graded rewards
    +algorithm.rspo_k=4                  # must not exceed actor_rollout_ref.rollout.n
    +algorithm.rspo_estimator=rspo       # or plugin, hitchhiking, pkpo, pkpo_loo
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from verl.trainer.ppo import core_algos

from rspo_kernels.integrations._common import DEFAULT_K, RSPOSettings

__all__ = ["ESTIMATOR_NAME", "compute_rspo_outcome_advantage", "register", "settings_from_config"]

ESTIMATOR_NAME = "rspo"
_KEYS = {
    "objective": "+algorithm.rspo_objective",
    "k": "+algorithm.rspo_k",
    "estimator": "+algorithm.rspo_estimator",
    "n": "actor_rollout_ref.rollout.n",
}


def settings_from_config(config: Any) -> RSPOSettings:
    """Read the RSPO options from verl's algorithm config.

    Parameters
    ----------
    config : omegaconf.DictConfig, verl.trainer.config.AlgoConfig, Mapping or None
        ``config.algorithm`` as verl passes it to advantage estimators. Missing keys take the
        defaults ``rspo_objective="pass@k"``, ``rspo_k=4``, ``rspo_estimator="rspo"``.

    Returns
    -------
    RSPOSettings

    Raises
    ------
    ValueError
        An invalid option; the message names the ``+algorithm.rspo_*`` key to change.
    """
    get = config.get if config is not None else (lambda key, default=None: default)
    return RSPOSettings.create(
        objective=get("rspo_objective", "pass@k"),
        k=get("rspo_k", DEFAULT_K),
        estimator=get("rspo_estimator", "rspo"),
        keys=_KEYS,
    )


def compute_rspo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RSPO weights as outcome advantages, grouped by uid.

    Parameters
    ----------
    token_level_rewards : torch.Tensor
        ``(bs, response_length)``; a response's reward is the sum over its tokens, as in GRPO.
    response_mask : torch.Tensor
        ``(bs, response_length)``, 1 on response tokens and 0 on padding.
    index : numpy.ndarray
        ``(bs,)`` group label of each row (verl's ``uid`` strings). Rows of a group may be
        anywhere in the batch: verl reorders rows (sequence balancing), so groups are never
        inferred from positions.
    config : AlgoConfig or DictConfig, optional
        The algorithm config; see :func:`settings_from_config`.
    **kwargs
        Other arguments verl passes to estimators (``epsilon``, ``norm_adv_by_std_in_grpo``,
        ``reward_baselines``, ...); ignored.

    Returns
    -------
    advantages : torch.Tensor
        ``(bs, response_length)``: each response's weight on its response tokens, 0 on padding.
    returns : torch.Tensor
        The same tensor (verl uses returns only for a critic, which RSPO does not need).

    Raises
    ------
    ValueError
        A group smaller than k, non-binary scores under Pass@k, or an invalid option; the message
        names the group's uid and the config key to change.

    Notes
    -----
    With ``algorithm.use_kl_in_reward=True`` the token-level rewards include the KL penalty, so
    their sums are not binary: use ``+algorithm.rspo_objective=max@k`` (or the KL loss instead).
    """
    if index is None:
        raise ValueError("the 'rspo' advantage estimator groups responses by uid, but verl passed no uid index")
    settings = settings_from_config(config)
    scores = token_level_rewards.sum(dim=-1)
    with torch.no_grad():
        weights = settings.weights(scores, group_ids=np.asarray(index))
    advantages = weights.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return advantages, advantages


def register() -> None:
    """Register ``"rspo"`` with verl; safe to call any number of times.

    verl raises on a second registration of a name with a different function object, which would
    happen when this module is imported both through the entry point and through
    ``VERL_USE_EXTERNAL_MODULES``, or reloaded.

    Raises
    ------
    RuntimeError
        When a different package already registered an estimator called ``"rspo"``.
    """
    registry = core_algos.ADV_ESTIMATOR_REGISTRY
    current = registry.get(ESTIMATOR_NAME)
    if current is compute_rspo_outcome_advantage:
        return
    if current is None:
        core_algos.register_adv_est(ESTIMATOR_NAME)(compute_rspo_outcome_advantage)
    elif getattr(current, "__module__", None) == __name__:
        registry[ESTIMATOR_NAME] = compute_rspo_outcome_advantage  # a reloaded copy of this module
    else:
        raise RuntimeError(
            f"verl already has an advantage estimator named {ESTIMATOR_NAME!r} "
            f"({current.__module__}.{current.__qualname__}); remove that plugin to use rspo_kernels' RSPO"
        )


register()
