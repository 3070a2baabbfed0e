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
    labels = np.concatenate([[u] * s for u, s in zip(uids, sizes, strict=False)])
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
    [
        ("pass@k", 2, "rspo", True),
        ("pass@k", 4, "plugin", True),
        ("max@k", 3, "rspo", False),
        ("max@k", 3, "ordergrad", False),
        ("pass@k", 2, "ordergrad", True),
    ],
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
    # "{uid}_{session_id}_{index}": one output per session, sessions 0..n-1 of each uid.
    keys = [f"{u}_{uids[:i].count(u)}_0" for i, u in enumerate(uids)]
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
    with pytest.raises(ValueError, match=r"3 samples but k=4.*algorithm\.rspo_k=4.*actor_rollout_ref\.rollout\.n"):
        ray_trainer.compute_advantage(data, adv_estimator="rspo", config=config)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"rspo_objective": "best@k"}, r"^algorithm\.rspo_objective='best@k'.*'max@k'"),
        ({"rspo_k": 0}, r"^algorithm\.rspo_k=0 must be a positive integer"),
        ({"rspo_estimator": "grpo"}, r"^algorithm\.rspo_estimator='grpo' is not an estimator"),
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


# --- Multi-turn agent loop (v1 trainer): several output rows per trajectory -----------------------


def _agent_loop_batch(rng, uids, outputs_per_session, session_scores, width=9):
    """Rows as verl's v1 agent loop stores them and ``trainer_base._compute_advantage`` reads them:
    key ``{uid}_{session_id}_{index}`` per output, every output of a session scored with the
    session's reward (on its last token), tool tokens masked out of ``response_mask``, rows in
    the order the replay buffer hands them over."""
    keys, scores, lengths = [], [], []
    for uid, sessions, rewards in zip(uids, outputs_per_session, session_scores, strict=False):
        for session, (outputs, reward) in enumerate(zip(sessions, rewards, strict=False)):
            for index in range(outputs):
                keys.append(f"{uid}_{session}_{index}")
                scores.append(reward)
                lengths.append(int(rng.integers(3, width + 1)))
    perm = rng.permutation(len(keys))
    keys = [keys[i] for i in perm]
    scores, lengths = np.asarray(scores, np.float32)[perm], np.asarray(lengths)[perm]
    data = _batch(scores, [key.rsplit("_", 2)[0] for key in keys], lengths, width)
    tool = torch.from_numpy(rng.random(data.batch["response_mask"].shape) < 0.25)
    data.batch["response_mask"] = data.batch["response_mask"] * ~tool
    data.batch["response_mask"][torch.arange(len(keys)), torch.from_numpy(lengths - 1)] = 1.0
    return data, keys


def _expected_by_session(keys, data, session_scores_by_uid, objective, k):
    """Independent reference: one sample per session, the library's 2-D weights of each uid's
    sessions, each session's weight on every one of its rows."""
    fn = rk.pass_at_k_weights if objective == "pass@k" else rk.max_at_k_weights
    weights = {uid: fn(torch.tensor([scores]), k)[0] for uid, scores in session_scores_by_uid.items()}
    per_row = torch.tensor([float(weights[uid][int(s)]) for uid, s, _ in (key.rsplit("_", 2) for key in keys)])
    return per_row[:, None] * data.batch["response_mask"]


def _v1_compute_advantage(data, keys, config, n):
    """The call in ``verl.trainer.ppo.v1.trainer_base.RayPPOTrainer._compute_advantage``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"verl\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
        pytest.importorskip("transfer_queue", reason="verl's v1 trainer needs TransferQueue")
        from verl.trainer.ppo.v1 import trainer_base
    return trainer_base.compute_advantage_for_multi_trajectories(
        data,
        batch_keys=keys,
        adv_estimator=config.adv_estimator,
        gamma=1.0,
        lam=1.0,
        num_repeat=n,
        norm_adv_by_std_in_grpo=True,
        config=config,
    )


def test_agent_sessions_with_two_outputs_count_once():
    """4 sessions of one prompt, 2 outputs each, one session correct, k=2: each correct row gets
    k C(n-c, k-1) / C(n-1, k-1) = 2 * 3 / 3 = 2 (counting rows instead gives 2 * 6 / 7 = 1.714)."""
    rng = np.random.default_rng(0)
    data, keys = _agent_loop_batch(rng, ["u"], [[2, 2, 2, 2]], [[1.0, 0.0, 0.0, 0.0]])
    config = OmegaConf.create({"adv_estimator": "rspo", "rspo_k": 2})

    out = _v1_compute_advantage(data, keys, config, n=4)

    mask = data.batch["response_mask"]
    correct = torch.tensor([key.startswith("u_0_") for key in keys])
    assert int(correct.sum()) == 2
    torch.testing.assert_close(out.batch["advantages"], 2.0 * correct[:, None] * mask)
    torch.testing.assert_close(out.batch["returns"], out.batch["advantages"])


@pytest.mark.parametrize("objective,k", [("pass@k", 2), ("pass@k", 4), ("max@k", 3)])
def test_agent_loop_groups_by_session_and_spreads_the_weight(objective, k):
    rng = np.random.default_rng(k)
    uids = [f"{rng.integers(1 << 40):x}-{i}" for i in range(3)]
    sessions = [list(rng.integers(1, 4, size=4)) for _ in uids]  # n = 4 sessions, 1-3 outputs each
    if objective == "pass@k":
        scores = [list(rng.integers(0, 2, size=4).astype(float)) for _ in uids]
        scores[0] = [1.0, 0.0, 0.0, 0.0]  # signal for sure
    else:
        scores = [list(rng.random(4).round(3)) for _ in uids]
    data, keys = _agent_loop_batch(rng, uids, sessions, scores)
    config = OmegaConf.create({"adv_estimator": "rspo", "rspo_k": k, "rspo_objective": objective})

    out = _v1_compute_advantage(data, keys, config, n=4)

    expected = _expected_by_session(keys, data, dict(zip(uids, scores, strict=False)), objective, k)
    torch.testing.assert_close(out.batch["advantages"], expected)
    assert expected.abs().sum() > 0
    assert len(keys) > 12  # several outputs per session really occurred


def test_agent_loop_ignores_verls_padding_sessions():
    """verl's v1 trainer pads the batch to a multiple of the data-parallel size with synthetic
    sessions ("pad<hex>_<i>_0", empty response mask, zero score): fewer than k of them is fine."""
    rng = np.random.default_rng(4)
    data, keys = _agent_loop_batch(rng, ["u"], [[2, 1, 1, 2]], [[0.0, 1.0, 0.0, 0.0]])
    pad = _batch(np.zeros(3, np.float32), ["padfeed"] * 3, np.ones(3, dtype=np.int64), width=9)
    pad.batch["response_mask"].zero_()
    data = DataProto.concat([data, pad])
    keys = keys + [f"padfeed_{i}_0" for i in range(3)]
    config = OmegaConf.create({"adv_estimator": "rspo", "rspo_k": 4})

    out = _v1_compute_advantage(data, keys, config, n=4)

    expected = _expected_by_session(keys[:-3], data[:-3], {"u": [0.0, 1.0, 0.0, 0.0]}, "pass@k", 4)
    torch.testing.assert_close(out.batch["advantages"][:-3], expected)
    assert out.batch["advantages"][-3:].abs().sum() == 0 and expected.abs().sum() > 0


def test_agent_loop_leaves_other_estimators_to_verl():
    rng = np.random.default_rng(3)
    data, keys = _agent_loop_batch(rng, ["a", "b"], [[2, 1, 3], [1, 1, 2]], [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    config = OmegaConf.create({"adv_estimator": "grpo", "norm_adv_by_std_in_grpo": True})
    out = _v1_compute_advantage(data, keys, config, n=3)
    # verl's own GRPO session handling: both sessions of a group with the same score tie.
    adv = out.batch["advantages"][torch.arange(len(keys)), data.batch["response_mask"].argmax(dim=1)]
    first = {key.rsplit("_", 1)[0]: float(a) for key, a in zip(keys, adv, strict=False)}
    assert first["b_1"] == pytest.approx(first["b_2"]) and first["a_0"] > 0 > first["a_1"]


# --- The README's configuration through verl's own config path ------------------------------------

# What the README writes as "...": the rest of a run's configuration, enough for verl's checks.
_REST_OF_RUN = [
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
    "trainer.n_gpus_per_node=1",
]


def _readme_overrides() -> list[str]:
    from readme_snippets import commands, snippet

    (cmd,) = [c for c in commands(snippet("### verl", "bash")) if c[:3] == ["python", "-m", "verl.trainer.main_ppo"]]
    return [word for word in cmd[3:] if word != "..."]


def _main_ppo_config(overrides):
    """The config ``python -m verl.trainer.main_ppo <overrides>`` hands to ``main``, checked as
    ``main`` checks it (``validate_config`` as imported by ``verl.trainer.main_ppo``)."""
    from hydra import compose, initialize_config_module

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"verl\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
        from verl.trainer import main_ppo
        from verl.trainer.ppo.utils import need_critic, need_reference_policy

        with initialize_config_module("verl.trainer.config", version_base=None):
            config = compose("ppo_trainer", overrides=[*overrides, *_REST_OF_RUN])
        warnings.filterwarnings("ignore", message="Disabled critic", category=UserWarning)  # RSPO trains none
        use_critic = need_critic(config)
    main_ppo.validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=use_critic)
    return config


def test_readme_command_loads_through_main_ppo_and_algo_config(capsys):
    from verl.utils.config import omega_conf_to_dataclass

    config = _main_ppo_config(_readme_overrides())
    assert "All configuration checks passed" in capsys.readouterr().out

    algo = omega_conf_to_dataclass(config.algorithm)  # verl's structured AlgoConfig path
    assert isinstance(algo, rspo_verl.RSPOAlgoConfig) and isinstance(algo, verl.trainer.config.AlgoConfig)
    assert (algo.adv_estimator, algo.rspo_k, algo.rspo_objective, algo.rspo_estimator) == ("rspo", 4, "pass@k", "rspo")
    rng = np.random.default_rng(5)
    scores, uids, lengths = _shuffled_groups(rng, [8, 8], binary=True)
    data = _batch(scores, uids, lengths)
    out = ray_trainer.compute_advantage(data, adv_estimator=algo.adv_estimator, config=algo)
    torch.testing.assert_close(
        out.batch["advantages"], _expected(scores, uids, data.batch["response_mask"], "pass@k", 4)
    )


@pytest.mark.parametrize(
    "extra,match",
    [
        (
            ["algorithm.rspo_k=8", "actor_rollout_ref.rollout.n=4"],
            r"^algorithm\.rspo_k=8 but actor_rollout_ref\.rollout\.n=4",
        ),
        (["+algorithm.rspo_estimator=nope"], r"^algorithm\.rspo_estimator='nope' is not an estimator"),
        (["algorithm.rspo_objective=best@k"], r"^algorithm\.rspo_objective='best@k' is not an RSPO objective"),
        (["+algorithm.rspo_estimator=pkpo_loo", "actor_rollout_ref.rollout.n=4"], r"pkpo_loo.*algorithm\.rspo_k=4"),
        (["algorithm.use_kl_in_reward=True"], r"^algorithm\.use_kl_in_reward=True .* algorithm\.rspo_objective=max@k"),
    ],
)
def test_config_errors_surface_in_main_ppo_validation(extra, match):
    with pytest.raises(ValueError, match=match):
        _main_ppo_config([*_readme_overrides(), *extra])


def test_length_normalised_loss_aggregation_warns():
    with pytest.warns(UserWarning, match=r"loss_agg_mode=token-mean.*seq-mean-token-sum-norm"):
        _main_ppo_config([*_readme_overrides(), "actor_rollout_ref.actor.loss_agg_mode=token-mean"])


def test_rspo_algo_config_checks_its_fields():
    with pytest.raises(ValueError, match=r"^algorithm\.rspo_k=0 must be a positive integer"):
        rspo_verl.RSPOAlgoConfig(adv_estimator="rspo", rspo_k=0)
    for name in rk.ESTIMATORS:  # every estimator the library accepts, by name
        assert rspo_verl.RSPOAlgoConfig(rspo_k=2, rspo_estimator=name).rspo_estimator == name
