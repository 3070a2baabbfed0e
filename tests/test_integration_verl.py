"""The verl adapter against real verl: plugin loading, registration, and verl's own compute_advantage."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import rspo_kernels as rk

with warnings.catch_warnings():
    # verl's trainer modules warn about optional engines (megatron, ...) and Ray's state API on import.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"verl\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
    verl = pytest.importorskip("verl")
    pytest.importorskip("cachetools", reason="verl's trainer imports cachetools (rspo_kernels[verl] installs it)")
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo import core_algos, ray_trainer

    from rspo_kernels.integrations import verl as rspo_verl


def _batch(scores: np.ndarray, uids: list[str], lengths: np.ndarray, width: int = 7) -> DataProto:
    """A DataProto as verl builds it: outcome score on each response's last token, right padding."""
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)
    token_rewards = np.zeros_like(mask)
    token_rewards[np.arange(len(scores)), lengths - 1] = scores
    return DataProto.from_dict(
        tensors={
            "token_level_rewards": torch.from_numpy(token_rewards),
            "response_mask": torch.from_numpy(mask),
        },
        non_tensors={"uid": np.array(uids, dtype=object)},
    )


def _shuffled_groups(rng: np.random.Generator, sizes: list[int], binary: bool):
    uids = [f"uid-{rng.integers(1 << 30):x}" for _ in sizes]
    labels = np.concatenate([[u] * s for u, s in zip(uids, sizes)])
    perm = rng.permutation(labels.size)  # verl reorders rows: groups are scattered through the batch
    labels = labels[perm].tolist()
    scores = rng.integers(0, 2, len(labels)) if binary else rng.normal(size=len(labels))
    lengths = rng.integers(1, 8, len(labels))
    return scores.astype(np.float32), labels, lengths


def _expected(scores, uids, mask, objective, k, estimator="rspo"):
    """Independent reference: the library's weights of each uid's rows (one group per call, 2-D
    layout), broadcast over the response mask."""
    fn = rk.pass_at_k_weights if objective == "pass@k" else rk.max_at_k_weights
    w = torch.zeros(len(uids))
    for uid in set(uids):
        rows = [i for i, u in enumerate(uids) if u == uid]
        w[rows] = fn(torch.from_numpy(scores[rows])[None, :], k, estimator=estimator)[0]
    return w[:, None] * mask


@pytest.mark.parametrize(
    "objective,k,estimator,binary",
    [("pass@k", 2, "rspo", True), ("pass@k", 4, "plugin", True), ("max@k", 3, "rspo", False)],
)
def test_ray_trainer_compute_advantage_returns_rspo_weights(objective, k, estimator, binary):
    rng = np.random.default_rng(k)
    scores, uids, lengths = _shuffled_groups(rng, [4, 6, 5, 4], binary)
    data = _batch(scores, uids, lengths)
    config = OmegaConf.create(
        {"adv_estimator": "rspo", "rspo_objective": objective, "rspo_k": k, "rspo_estimator": estimator}
    )

    out = ray_trainer.compute_advantage(data, adv_estimator=config.adv_estimator, config=config)

    mask = data.batch["response_mask"]
    expected = _expected(scores, uids, mask, objective, k, estimator)
    torch.testing.assert_close(out.batch["advantages"], expected)
    torch.testing.assert_close(out.batch["returns"], expected)
    assert out.batch["advantages"][mask == 0].abs().sum() == 0
    assert out.batch["advantages"].abs().sum() > 0  # the random batch has signal; a zero tensor must not pass


def test_v1_trainer_path_returns_rspo_weights():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"verl\.")
        pytest.importorskip("transfer_queue", reason="verl's v1 trainer needs TransferQueue")
        from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    rng = np.random.default_rng(7)
    scores, uids, lengths = _shuffled_groups(rng, [5, 5, 5], binary=True)
    data = _batch(scores, uids, lengths)
    keys = [f"{u}_0_0" for u in uids]  # "{uid}_{session}_{index}": one session per rollout
    config = OmegaConf.create({"rspo_k": 3})

    out = compute_advantage_for_multi_trajectories(data, batch_keys=keys, adv_estimator="rspo", config=config)

    expected = _expected(scores, uids, data.batch["response_mask"], "pass@k", 3)
    torch.testing.assert_close(out.batch["advantages"], expected)


def test_defaults_and_algo_config_object():
    from verl.trainer.config import AlgoConfig

    rng = np.random.default_rng(1)
    scores, uids, lengths = _shuffled_groups(rng, [4, 4], binary=True)
    data = _batch(scores, uids, lengths)
    fn = core_algos.get_adv_estimator_fn("rspo")
    for config in (None, AlgoConfig(adv_estimator="rspo")):  # defaults: pass@k, k=4, rspo
        adv, ret = fn(
            token_level_rewards=data.batch["token_level_rewards"],
            response_mask=data.batch["response_mask"],
            index=data.non_tensor_batch["uid"],
            config=config,
            epsilon=1e-6,
            norm_adv_by_std_in_grpo=True,
        )
        torch.testing.assert_close(adv, _expected(scores, uids, data.batch["response_mask"], "pass@k", 4))
        assert ret is adv


def test_k_larger_than_rollout_n_names_the_config_keys():
    rng = np.random.default_rng(2)
    scores, uids, lengths = _shuffled_groups(rng, [4, 3], binary=True)
    data = _batch(scores, uids, lengths)
    config = OmegaConf.create({"rspo_k": 4})
    with pytest.raises(ValueError, match=r"3 samples but k=4.*\+algorithm\.rspo_k=4.*actor_rollout_ref\.rollout\.n"):
        ray_trainer.compute_advantage(data, adv_estimator="rspo", config=config)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"rspo_objective": "best@k"}, r"\+algorithm\.rspo_objective='best@k'.*'max@k'"),
        ({"rspo_k": 0}, r"\+algorithm\.rspo_k=0 must be a positive integer"),
        ({"rspo_estimator": "grpo"}, r"\+algorithm\.rspo_estimator='grpo' is not an estimator"),
    ],
)
def test_bad_options_name_the_key(options, match):
    with pytest.raises(ValueError, match=match):
        rspo_verl.settings_from_config(OmegaConf.create(options))


def test_graded_scores_under_pass_at_k_point_to_max_at_k():
    data = _batch(np.array([0.0, 0.5, 1.0, 1.0], np.float32), ["a"] * 4, np.array([2, 3, 4, 5]))
    with pytest.raises(ValueError, match=r"Pass@k needs rewards in \{0, 1\}.*max_at_k"):
        ray_trainer.compute_advantage(data, adv_estimator="rspo", config=OmegaConf.create({"rspo_k": 2}))


def test_registration_is_idempotent_and_refuses_a_foreign_rspo():
    rspo_verl.register()
    rspo_verl.register()
    assert core_algos.get_adv_estimator_fn("rspo") is rspo_verl.compute_rspo_outcome_advantage

    def impostor(**kwargs):
        raise AssertionError

    registry = core_algos.ADV_ESTIMATOR_REGISTRY
    registry["rspo"] = impostor
    try:
        with pytest.raises(RuntimeError, match="already has an advantage estimator named 'rspo'"):
            rspo_verl.register()
    finally:
        registry["rspo"] = rspo_verl.compute_rspo_outcome_advantage


def test_plain_import_verl_registers_rspo():
    """In a fresh process, as in every Ray worker: through the entry point, and through the fallback."""
    code = (
        "import verl\n"
        "from verl.trainer.ppo.core_algos import get_adv_estimator_fn\n"
        "print(get_adv_estimator_fn('rspo').__module__)\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    envs = {
        "entry_point": base,
        "external_modules": {
            **base,
            "VERL_USE_EXTERNAL_PLUGINS": "none",
            "VERL_USE_EXTERNAL_MODULES": "rspo_kernels.integrations.verl",
        },
    }
    # Both interpreters start at once: each spends most of its time importing torch and verl.
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-W", "ignore", "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, env in envs.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}: {err[-2000:]}"
        assert out.strip().splitlines()[-1] == "rspo_kernels.integrations.verl", name


def test_import_rspo_kernels_imports_no_framework():
    code = (
        "import sys, rspo_kernels, rspo_kernels.integrations\n"
        "print(sorted({'verl', 'trl', 'openrlhf'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
