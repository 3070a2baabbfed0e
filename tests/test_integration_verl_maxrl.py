"""The verl adapter's MaxRL objective, k schedule and unbiased validation metrics, against real verl."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from oracles import subset_max_at_k, subset_pass_at_k

import rspo_kernels as rk

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=UserWarning, module=r"verl\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
    pytest.importorskip("verl")
    pytest.importorskip("cachetools", reason="verl's trainer imports cachetools (rspo_kernels[verl] installs it)")
    from omegaconf import OmegaConf
    from test_integration_verl import _REST_OF_RUN, _batch, _main_ppo_config, _shuffled_groups
    from verl.trainer.ppo import metric_utils, ray_trainer

    from rspo_kernels.integrations import verl as rspo_verl

_RUN = [
    "algorithm.adv_estimator=rspo",
    "algorithm._target_=rspo_kernels.integrations.verl.RSPOAlgoConfig",
    "actor_rollout_ref.rollout.n=8",
    "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm",
    *_REST_OF_RUN,
]


def _per_uid(scores, uids, mask, fn):
    w = torch.zeros(len(uids))
    for uid in set(uids):
        rows = [i for i, u in enumerate(uids) if u == uid]
        w[rows] = fn(torch.from_numpy(scores[rows])[None, :])[0]
    return w[:, None] * mask


@pytest.fixture(autouse=True)
def _step_zero():
    rspo_verl.set_training_step(0)
    yield
    rspo_verl.set_training_step(0)


@pytest.mark.parametrize("estimator,order", [("rspo", None), ("rloo", 3), ("maclaurin", 2), ("vr_cond", None)])
def test_maxrl_objective_through_compute_advantage(estimator, order):
    rng = np.random.default_rng(3)
    scores, uids, lengths = _shuffled_groups(rng, [4, 6, 5], binary=True)
    data = _batch(scores, uids, lengths)
    config = OmegaConf.create({"rspo_objective": "maxrl", "rspo_estimator": estimator, "rspo_order": order})
    out = ray_trainer.compute_advantage(data, adv_estimator="rspo", config=config)
    want = _per_uid(
        scores, uids, data.batch["response_mask"], lambda r: rk.maxrl_weights(r, order, estimator=estimator)
    )
    torch.testing.assert_close(out.batch["advantages"], want)
    assert out.batch["advantages"].abs().sum() > 0


def test_k_schedule_follows_the_trainers_global_steps_and_is_logged():
    rng = np.random.default_rng(4)
    scores, uids, lengths = _shuffled_groups(rng, [8, 8], binary=True)
    data = _batch(scores, uids, lengths)
    config = OmegaConf.create({"rspo_k_schedule": "8:0,4:200,1:400"})
    trainer = object.__new__(ray_trainer.RayPPOTrainer)  # verl's trainer sets its step as it trains
    mask = data.batch["response_mask"]
    # verl's legacy trainer reads compute_data_metrics from its module: the wrapped one
    assert ray_trainer.compute_data_metrics is metric_utils.compute_data_metrics
    logged = rspo_verl._log_k_in_data_metrics(lambda **kw: {"other": 1.0})
    for step, k in [(1, 8), (199, 8), (200, 4), (399, 4), (400, 1), (10_000, 1)]:
        trainer.global_steps = step
        assert trainer.global_steps == step
        out = ray_trainer.compute_advantage(data, adv_estimator="rspo", config=config)
        want = _per_uid(scores, uids, mask, lambda r, k=k: rk.pass_at_k_weights(r, k))
        torch.testing.assert_close(out.batch["advantages"], want, msg=f"step {step}")
        assert logged() == {"other": 1.0, "rspo/k": float(k)}
        assert logged() == {"other": 1.0}  # logged once per advantage computation


def test_v1_trainer_logs_the_k_in_force():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"verl\.")
        pytest.importorskip("transfer_queue", reason="verl's v1 trainer needs TransferQueue")
        from verl.trainer.ppo.v1 import trainer_base
    assert isinstance(trainer_base.PPOTrainer.__dict__["global_steps"], rspo_verl._GlobalSteps)
    assert trainer_base.PPOTrainer._compute_advantage._rspo_original is not None


@pytest.mark.parametrize(
    "extra,match",
    [
        (["+algorithm.rspo_k_schedule='16:0,4:100'"], r"algorithm\.rspo_k_schedule sets k=16 from step 0 but .*n=8"),
        (["+algorithm.rspo_k_schedule='4:0,16:100'"], r"k=16 from step 100"),
        (["+algorithm.rspo_k_schedule='4:10'"], r"^algorithm\.rspo_k_schedule='4:10' does not say which k"),
        (["+algorithm.rspo_objective=maxrl", "+algorithm.rspo_order=9"], r"^algorithm\.rspo_order=9 but .*n=8"),
        (
            ["+algorithm.rspo_objective=maxrl", "+algorithm.rspo_estimator=pkpo"],
            r"'pkpo' is not an estimator for maxrl",
        ),
        (["+algorithm.rspo_order=2"], r"rspo_order=2 is MaxRL's truncation order: it needs the objective 'maxrl'"),
        (  # MaxRL has no graded form: the fix named is the KL loss, not max@k
            ["+algorithm.rspo_objective=maxrl", "algorithm.use_kl_in_reward=True"],
            r"^algorithm\.use_kl_in_reward=True .* maxrl needs binary: MaxRL is defined for binary rewards only, "
            r"so use actor_rollout_ref\.actor\.use_kl_loss=True instead$",
        ),
    ],
)
def test_config_errors_name_the_key_in_main_ppo_validation(extra, match):
    with pytest.raises(ValueError, match=match):
        _main_ppo_config([*_RUN, *extra])


def test_schedule_and_order_load_through_main_ppo():
    from verl.utils.config import omega_conf_to_dataclass

    config = _main_ppo_config([*_RUN, "+algorithm.rspo_k_schedule='8:0,4:200,1:400'"])
    algo = omega_conf_to_dataclass(config.algorithm)
    assert rspo_verl.settings_from_config(algo).schedule == ((0, 8), (200, 4), (400, 1))
    config = _main_ppo_config([*_RUN, "+algorithm.rspo_objective=maxrl", "+algorithm.rspo_order=4"])
    settings = rspo_verl.settings_from_config(omega_conf_to_dataclass(config.algorithm))
    assert (settings.objective, settings.order) == ("maxrl", 4)


# --- validation metrics ---------------------------------------------------------------------------
def test_validation_logs_unbiased_pass_at_k_beside_verls_bootstrap():
    """verl PR #7240's case: one correct of four; verl's best@4 (bootstrap) is 1 - (3/4)^4 = 0.684."""
    uids = ["q1"] * 4 + ["q2"] * 4
    acc = [1, 0, 0, 0, 1, 1, 0, 0]
    out = metric_utils.process_validation_metrics(["math"] * 8, uids, {"acc": acc})["math"]["acc"]
    assert out["best@4/mean"] == pytest.approx(0.5 * (1 - 0.75**4) + 0.5 * (1 - 0.5**4), abs=0.03)  # verl's own
    for k in (1, 2, 4):
        want = np.mean([subset_pass_at_k([1, 0, 0, 0], k), subset_pass_at_k([1, 1, 0, 0], k)])
        assert out[f"pass@{k}"] == pytest.approx(want, rel=1e-6)
    assert out["pass@4"] == 1.0 and "pass@3" not in out


def test_validation_max_at_k_for_graded_scores_with_ragged_groups():
    rng = np.random.default_rng(0)
    sizes = {"a": 5, "b": 3, "c": 6}
    uids = [u for u, s in sizes.items() for _ in range(s)]
    order = rng.permutation(len(uids))
    uids = [uids[i] for i in order]
    score = rng.normal(size=len(uids)).round(1).tolist()  # ties on purpose
    sources = ["gsm8k" if u != "c" else "math" for u in uids]
    result = metric_utils.process_validation_metrics(sources, uids, {"score": score, "pred": ["x"] * len(uids)})
    by = {}
    for u, src, s in zip(uids, sources, score, strict=True):
        by.setdefault((src, u), []).append(s)
    for src, ks in (("gsm8k", (1, 2, 4, 5)), ("math", (1, 2, 4, 6))):
        metrics = result[src]["score"]
        for k in ks:
            groups = [v for (s, _), v in by.items() if s == src and len(v) >= k]
            want = np.mean([subset_max_at_k(v, k) for v in groups])
            assert metrics[f"max@{k}"] == pytest.approx(want, rel=1e-9), (src, k)
        assert not any(name.startswith("pass@") for name in metrics)
        assert "maj@2/mean" in metrics  # verl's own metrics stay


def test_validation_metric_names_pass_verls_own_aggregation():
    """The trainer's ``_val_metrics_update`` parses ``name@N``; ours must survive it."""
    uids = ["q1"] * 4
    metrics = ray_trainer.RayPPOTrainer._val_metrics_update(
        None, np.array(["src"] * 4), uids, {"acc": [1, 0, 0, 0]}, []
    )
    assert metrics["val-aux/src/acc/pass@4"] == 1.0
    assert metrics["val-aux/src/acc/pass@1"] == pytest.approx(0.25)


def test_unbiased_validation_metrics_fill_missing_acc_sessions():
    out = rspo_verl.unbiased_validation_metrics(["s"] * 2, ["q", "q"], {"acc": [1, None]}, {("s", "q"): 4})
    assert out["s"]["acc"]["pass@1"] == pytest.approx(0.25) and out["s"]["acc"]["pass@4"] == 1.0


def test_docs_maxrl_verl_commands_pass_main_ppo_validation():
    """Every verl command in docs/maxrl.md loads and validates through main_ppo's config path."""
    import re
    from pathlib import Path

    from readme_snippets import commands

    text = (Path(__file__).resolve().parents[1] / "docs" / "maxrl.md").read_text()
    cmds = [
        c
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
        for c in commands(block)
        if c[:3] == ["python", "-m", "verl.trainer.main_ppo"]
    ]
    assert len(cmds) == 2
    for cmd in cmds:
        overrides = [word for word in cmd[3:] if word != "..."]
        config = _main_ppo_config(
            [*overrides, "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm", *_REST_OF_RUN]
        )
        assert rspo_verl.settings_from_config(config.algorithm).check_group_size(8) is None


def test_non_scalar_variables_are_left_to_verl():
    out = rspo_verl.unbiased_validation_metrics(["s"] * 2, ["q", "q"], {"acc": [1, 0], "tokens": [[1, 2], [3]]})
    assert set(out["s"]) == {"acc"}
