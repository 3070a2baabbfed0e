"""RSPO as a verl advantage estimator: ``algorithm.adv_estimator=rspo``.

Importing this module registers the estimator ``"rspo"`` with
``verl.trainer.ppo.core_algos.register_adv_est``. verl imports it in every process through the
``verl.plugins`` entry point that ``pip install rspo_kernels`` declares, so a plain ``import verl``
is enough, on the driver and in every Ray worker. Where entry points are disabled
(``VERL_USE_EXTERNAL_PLUGINS=none``), set ``VERL_USE_EXTERNAL_MODULES=rspo_kernels.integrations.verl``
in the environment of every node instead.

Options (README, "verl"): ``+algorithm.rspo_objective`` (``pass@k`` | ``max@k`` | ``maxrl``),
``+algorithm.rspo_k`` (default 4, at most ``actor_rollout_ref.rollout.n``),
``+algorithm.rspo_estimator`` (any name in ``rspo_kernels.ESTIMATORS``, or
``rspo_kernels.MAXRL_ESTIMATORS`` under ``maxrl``), ``+algorithm.rspo_order`` (MaxRL's truncation
order, default the group size) and ``+algorithm.rspo_k_schedule`` (``"8:0,4:200,1:400"``: k = 8
from step 0, 4 from step 200, 1 from step 400; the order under ``maxrl``; the k in force is
logged as ``rspo/k``); with
``algorithm._target_=rspo_kernels.integrations.verl.RSPOAlgoConfig`` they also load into verl's
structured config. Validation also logs the unbiased ``pass@k`` (binary scores) or ``max@k``
(graded scores) for k = 1, 2, 4, ... up to the number of samples per prompt, beside verl's
bootstrapped ``best@k``. Loading the module also makes verl's ``validate_config`` (which ``main_ppo``
runs before any model loads) check them, and makes the v1 trainer's multi-output agent loop
count one sample per agent session (trajectory). It also teaches verl the fused-kernel backend
``actor_rollout_ref.model.fused_kernel_options.impl_backend=rspo`` (see :mod:`.verl_fused`).
"""

from __future__ import annotations

import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import rspo_kernels as rk
from rspo_kernels.integrations._common import DEFAULT_K, RSPOSettings, framework_import, when_imported, wrap

with framework_import("verl", "verl"):
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo import core_algos

from rspo_kernels.integrations import verl_fused  # noqa: E402 - after the framework check

__all__ = [
    "ESTIMATOR_NAME",
    "RSPOAlgoConfig",
    "check_trainer_config",
    "compute_rspo_outcome_advantage",
    "register",
    "settings_from_config",
    "set_training_step",
    "unbiased_validation_metrics",
]

ESTIMATOR_NAME = "rspo"
_KEYS = {
    "objective": "algorithm.rspo_objective",
    "k": "algorithm.rspo_k",
    "estimator": "algorithm.rspo_estimator",
    "order": "algorithm.rspo_order",
    "schedule": "algorithm.rspo_k_schedule",
    "n": "actor_rollout_ref.rollout.n",
}
# Modes whose normaliser depends on the sampled lengths (see README, "Aggregation").
_LENGTH_NORMALISED = ("token-mean", "seq-mean-token-mean")


@dataclass
class RSPOAlgoConfig(AlgoConfig):
    """verl's :class:`~verl.trainer.config.AlgoConfig` plus the RSPO options, checked on creation.

    Select it with ``algorithm._target_=rspo_kernels.integrations.verl.RSPOAlgoConfig``, so that
    ``verl.utils.config.omega_conf_to_dataclass(config.algorithm)`` accepts the ``rspo_*`` keys.
    """

    rspo_objective: str = "pass@k"
    rspo_k: int = DEFAULT_K
    rspo_estimator: str = "rspo"
    rspo_order: int | None = None
    rspo_k_schedule: str | None = None

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()
        settings = settings_from_config(self)
        # verl's configs are frozen after creation: store the checked values (rspo_k="4" -> 4) once, here.
        for name, value in (
            ("rspo_objective", settings.objective),
            ("rspo_k", settings.k),
            ("rspo_estimator", settings.estimator),
        ):
            object.__setattr__(self, name, value)


def settings_from_config(config: Any) -> RSPOSettings:
    """Read the RSPO options from verl's algorithm config.

    Parameters
    ----------
    config : omegaconf.DictConfig, AlgoConfig, RSPOAlgoConfig, Mapping or None
        ``config.algorithm``. Missing keys take the defaults ``rspo_objective="pass@k"``,
        ``rspo_k=4``, ``rspo_estimator="rspo"``, no ``rspo_order`` (MaxRL: the group size) and
        no ``rspo_k_schedule``.

    Raises
    ------
    ValueError
        An invalid option; the message names the ``algorithm.rspo_*`` key to change.
    """
    get = config.get if config is not None else (lambda key, default=None: default)
    return RSPOSettings.create(
        objective=get("rspo_objective", "pass@k"),
        k=get("rspo_k", DEFAULT_K),
        estimator=get("rspo_estimator", "rspo"),
        keys=_KEYS,
        order=get("rspo_order", None),
        schedule=get("rspo_k_schedule", None),
    )


def check_trainer_config(config: Any) -> None:
    """Check a whole verl trainer config that selects ``algorithm.adv_estimator=rspo``.

    Runs inside verl's ``validate_config``, so ``main_ppo`` fails before Ray starts or any model
    loads. Warns when the actor's ``loss_agg_mode`` normalises by sampled lengths.

    Raises
    ------
    ValueError
        An invalid option, settings that groups of ``actor_rollout_ref.rollout.n`` cannot serve
        (``algorithm.rspo_k=8 but actor_rollout_ref.rollout.n=4``), or Pass@k with the KL in the
        reward.
    """
    if config.algorithm.get("adv_estimator") != ESTIMATOR_NAME:
        return
    settings = settings_from_config(config.algorithm)
    settings.check_group_size(config.actor_rollout_ref.rollout.n)
    if settings.objective in ("pass@k", "maxrl") and config.algorithm.get("use_kl_in_reward"):
        fix = (
            "set algorithm.rspo_objective=max@k (graded scores), or use actor_rollout_ref.actor.use_kl_loss=True"
            if settings.objective == "pass@k"
            else "MaxRL is defined for binary rewards only, so use actor_rollout_ref.actor.use_kl_loss=True"
        )
        raise ValueError(
            f"algorithm.use_kl_in_reward=True adds the KL penalty to the scores, which {settings.objective} needs "
            f"binary: {fix} instead"
        )
    mode = config.actor_rollout_ref.actor.get("loss_agg_mode")
    if mode in _LENGTH_NORMALISED:
        warnings.warn(
            f"actor_rollout_ref.actor.loss_agg_mode={mode} divides by response lengths, so the RSPO weights no "
            "longer give an unbiased Pass@k/Max@k gradient: set actor_rollout_ref.actor.loss_agg_mode="
            "seq-mean-token-sum-norm (README: Drop into your trainer)",
            UserWarning,
            stacklevel=2,
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
    token_level_rewards, response_mask : torch.Tensor
        ``(bs, response_length)``; a response's reward is the sum of its token rewards, as in GRPO.
    index : numpy.ndarray
        ``(bs,)`` group label of each row (verl's ``uid``); rows of a group may be anywhere.
    config : AlgoConfig or DictConfig, optional
        The algorithm config; see :func:`settings_from_config`.
    **kwargs
        Other arguments verl passes to estimators; ignored.

    Returns
    -------
    advantages, returns : torch.Tensor
        The same ``(bs, response_length)`` tensor: each response's weight on its response tokens.

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
    return _advantages(token_level_rewards, response_mask, np.asarray(index), config)


def _advantages(token_level_rewards, response_mask, index, config, final_rows=None, row_to_final=None):
    """Weights of trajectories grouped by uid, each spread over all rows of its trajectory.

    A trajectory's reward is the score of its row ``final_rows[t]``; row ``i`` belongs to
    trajectory ``row_to_final[i]`` (-1: none, weight 0). By default each row is a trajectory.
    """
    global _last_logged
    settings = settings_from_config(config).at_step(_training_step)
    _last_logged = settings.logged
    if final_rows is None:
        final_rows = row_to_final = np.arange(len(index))
    scores = token_level_rewards[torch.as_tensor(final_rows, dtype=torch.long)].sum(dim=-1)
    with torch.no_grad():
        weights = settings.weights(scores, group_ids=index[final_rows])
    per_row = torch.cat([weights, weights.new_zeros(1)])[torch.as_tensor(row_to_final, device=weights.device)]
    advantages = per_row.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return advantages, advantages


# The training step the k schedule reads: verl's trainers set ``global_steps`` on the driver, which
# computes the advantages (see _track_global_steps); 0 until a trainer sets it.
_training_step = 0
# ("rspo/k", k) of the last advantage computation, logged with the step's metrics, then cleared.
_last_logged: tuple[str, float] | None = None


def set_training_step(step: int) -> None:
    """Set the step that ``algorithm.rspo_k_schedule`` reads, for loops other than verl's trainers."""
    global _training_step
    _training_step = int(step)


class _GlobalSteps:
    """A data descriptor for the trainers' ``global_steps``: stores it and tells the schedule.

    verl's trainers (legacy and v1) count steps in ``self.global_steps``, also when they resume
    from a checkpoint; the advantage estimator has no other way to learn the step.
    """

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__["_rspo_global_steps"]
        except KeyError:
            raise AttributeError("global_steps") from None

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__["_rspo_global_steps"] = value
        set_training_step(value)


def _track_global_steps(cls: Any) -> None:
    if cls is not None and not isinstance(cls.__dict__.get("global_steps"), _GlobalSteps):
        cls.global_steps = _GlobalSteps()


def _log_k_in_data_metrics(original):
    """Legacy trainer: the k in force joins the step's data metrics."""

    def compute_data_metrics(*args, **kwargs):
        global _last_logged
        metrics = original(*args, **kwargs)
        if _last_logged is not None:
            name, value = _last_logged
            metrics[name] = value
            _last_logged = None
        return metrics

    return compute_data_metrics


def _log_k_in_v1_metrics(original):
    """v1 trainer: the k in force joins the metrics dict ``_compute_advantage`` receives."""

    def _compute_advantage(self, batch, metrics, *args, **kwargs):
        global _last_logged
        out = original(self, batch, metrics, *args, **kwargs)
        if _last_logged is not None:
            name, value = _last_logged
            metrics[name] = value
            _last_logged = None
        return out

    return _compute_advantage


def _powers_of_two_to(n: int) -> list[int]:
    ks = [1 << j for j in range(n.bit_length()) if (1 << j) <= n]
    return ks + ([n] if ks[-1] != n else [])


def unbiased_validation_metrics(
    data_sources: Any,
    sample_uids: Any,
    infos_dict: dict[str, list[Any]],
    expected_acc_counts: dict[tuple[str, str], int] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Unbiased ``pass@k`` / ``max@k`` per data source and score variable, averaged over prompts.

    Parameters
    ----------
    data_sources, sample_uids : sequence of str
        ``(N,)`` the data source and the prompt uid of each validation sample.
    infos_dict : dict of str to list
        ``{variable: (N,) values}`` as verl's ``process_validation_metrics`` takes them; None and
        string values are skipped, as verl skips them.
    expected_acc_counts : dict, optional
        verl's ``(data_source, uid) -> sessions`` count: missing ``acc`` sessions count as 0.

    Returns
    -------
    dict
        ``{data_source: {variable: {"pass@k": value}}}`` for k = 1, 2, 4, ... and the largest
        group size, each the mean over the prompts with at least k samples. A variable whose
        values (in that data source) are all 0/1 gets ``pass@k`` (:func:`rspo_kernels.pass_at_k`),
        any other ``max@k`` (:func:`rspo_kernels.max_at_k`). Unlike verl's ``best@k`` (a bootstrap
        with replacement, biased low: one correct of four gives 0.684 at k = 4), both are unbiased.
    """
    grouped: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    not_scalar: set[str] = set()
    for i, (source, uid) in enumerate(zip(data_sources, sample_uids, strict=True)):
        for var, values in infos_dict.items():
            value = values[i]
            if value is None or isinstance(value, str) or var in not_scalar:
                continue
            try:
                grouped[str(source)][var][uid].append(float(value))
            except (TypeError, ValueError):  # a list or another non-number: no pass@k to report
                not_scalar.add(var)
    for variables in grouped.values():
        for var in not_scalar:
            variables.pop(var, None)
    for (source, uid), expected in (expected_acc_counts or {}).items():
        acc = grouped.get(str(source), {}).get("acc")
        if acc is not None:
            acc[uid].extend([0.0] * max(int(expected) - len(acc[uid]), 0))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for source, variables in grouped.items():
        for var, by_uid in variables.items():
            groups = [v for v in by_uid.values() if v]
            if not groups:
                continue
            scores = np.concatenate([np.asarray(v, dtype=np.float64) for v in groups])
            sizes = np.array([len(v) for v in groups])
            labels = np.repeat(np.arange(len(groups)), sizes)
            binary = bool(np.isin(scores, (0.0, 1.0)).all())
            fn, name = (rk.pass_at_k, "pass") if binary else (rk.max_at_k, "max")
            if not np.isfinite(scores).all():
                continue  # verl's own mean/std report the non-finite value
            metrics = out.setdefault(source, {}).setdefault(var, {})
            for k in _powers_of_two_to(int(sizes.max())):
                keep = np.repeat(sizes >= k, sizes)
                per_group = fn(scores[keep], k, group_ids=labels[keep], validate=False)
                metrics[f"{name}@{k}"] = float(np.mean(per_group))
    return out


def _with_unbiased_validation_metrics(original):
    """verl's ``process_validation_metrics``, plus :func:`unbiased_validation_metrics` per variable."""

    def process_validation_metrics(data_sources, sample_uids, infos_dict, *args, **kwargs):
        result = original(data_sources, sample_uids, infos_dict, *args, **kwargs)
        expected = kwargs.get("expected_acc_counts", args[1] if len(args) > 1 else None)
        for source, variables in unbiased_validation_metrics(data_sources, sample_uids, infos_dict, expected).items():
            for var, metrics in variables.items():
                if var in result.get(source, {}):
                    result[source][var].update(metrics)
        return result

    return process_validation_metrics


def _multi_trajectories(original):
    """verl's v1 agent loop stores output ``i`` of session ``s`` of a prompt under the key
    ``{uid}_{s}_{i}``, each output scored with the session's reward. verl's
    ``compute_advantage_for_multi_trajectories`` reads that layout for GRPO only and gives other
    estimators bare rows, so a session of two outputs would count as two samples."""

    def compute_advantage_for_multi_trajectories(data, batch_keys, adv_estimator, *args, config=None, **kwargs):
        if adv_estimator != ESTIMATOR_NAME:
            return original(data, batch_keys, adv_estimator, *args, config=config, **kwargs)
        # verl pads the batch with synthetic sessions that have no response tokens: leave them out.
        has_tokens = (data.batch["response_mask"].sum(dim=-1) > 0).tolist()
        final: dict[str, tuple[int, int]] = {}  # session -> (index, row) of its final output
        row_session = [key.rsplit("_", 1)[0] for key in batch_keys]
        live = {session for session, tokens in zip(row_session, has_tokens, strict=False) if tokens}
        for row, (session, key) in enumerate(zip(row_session, batch_keys, strict=False)):
            index = int(key.rsplit("_", 1)[1])
            if session in live and (session not in final or final[session][0] < index):
                final[session] = (index, row)
        position = {session: t for t, session in enumerate(final)}
        data.batch["advantages"], data.batch["returns"] = _advantages(
            data.batch["token_level_rewards"],
            data.batch["response_mask"],
            np.asarray(data.non_tensor_batch["uid"]),
            config,
            final_rows=np.array([row for _, row in final.values()], dtype=np.int64),
            row_to_final=np.array([position.get(session, -1) for session in row_session]),
        )
        return data

    return compute_advantage_for_multi_trajectories


def _validate_config(original):
    def validate_config(config, *args, **kwargs):
        check_trainer_config(config)
        verl_fused.check_fused_config(config)
        return original(config, *args, **kwargs)

    return validate_config


def register() -> None:
    """Register ``"rspo"`` with verl (and wrap verl's config check and v1 session handling); idempotent.

    Raises
    ------
    RuntimeError
        When a different package already registered an estimator called ``"rspo"``.
    """
    # verl refuses a second registration of a name by another function object: this module can be
    # imported both through the entry point and VERL_USE_EXTERNAL_MODULES, or reloaded.
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
    # Both run before main_ppo / the v1 trainer import the patched names (plugins load on `import verl`).
    when_imported("verl.utils.config", lambda module: wrap(module, "validate_config", _validate_config))
    multi = "compute_advantage_for_multi_trajectories"
    when_imported("verl.trainer.ppo.v1.utils", lambda module: wrap(module, multi, _multi_trajectories))
    verl_fused.register()  # impl_backend=rspo for use_fused_kernels
    # The k schedule's step, the k in force in the step's metrics, unbiased validation metrics.
    when_imported("verl.trainer.ppo.metric_utils", _patch_metric_utils)
    when_imported("verl.trainer.ppo.ray_trainer", _patch_trainer_module)
    when_imported("verl.trainer.ppo.v1.trainer_base", _patch_trainer_module)


_VALIDATION = "process_validation_metrics"


def _patch_metric_utils(module: Any) -> None:
    wrap(module, _VALIDATION, _with_unbiased_validation_metrics)
    wrap(module, "compute_data_metrics", _log_k_in_data_metrics)


def _patch_trainer_module(module: Any) -> None:
    """Track the trainer's step; a trainer module that bound a metric function before the plugin
    loaded gets the wrapped one."""
    metric_utils = sys.modules.get("verl.trainer.ppo.metric_utils")
    for name in (_VALIDATION, "compute_data_metrics"):
        patched = getattr(metric_utils, name, None)
        original = getattr(patched, "_rspo_original", None)
        if original is not None and getattr(module, name, None) is original:
            setattr(module, name, patched)
    _track_global_steps(getattr(module, "RayPPOTrainer", None))
    _track_global_steps(getattr(module, "PPOTrainer", None))
    if hasattr(module, "PPOTrainer"):
        wrap(module.PPOTrainer, "_compute_advantage", _log_k_in_v1_metrics)


register()
