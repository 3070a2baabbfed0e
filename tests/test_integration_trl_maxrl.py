"""The TRL adapter's MaxRL objective and k schedule, in a few real CPU training steps."""

from __future__ import annotations

import pytest
import torch

import rspo_kernels as rk

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from test_integration_trl import PROMPTS, _cpu_config, _model, _Recorder, _tokenizer, tiny_run  # noqa: E402

from rspo_kernels.integrations.trl import RSPOConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit._script")


def _reward(completions, completion_ids, **kwargs):
    return [float(sum((i + 1) * t for i, t in enumerate(ids)) % 2) for ids in completion_ids]


def _train(tmp_path, **rspo):
    tokenizer = _tokenizer()
    trainer = _Recorder(
        model=_model(tokenizer),
        reward_funcs=_reward,
        args=RSPOConfig(**tiny_run(tmp_path, 4), **rspo),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )
    rewards = []
    original = trainer._calculate_rewards

    def record(*args, **kwargs):
        out = original(*args, **kwargs)
        rewards.append(trainer._rspo_rewards.clone())
        return out

    trainer._calculate_rewards = record
    trainer.train()
    return trainer, rewards


def test_k_schedule_changes_k_with_the_global_step_and_logs_it(tmp_path):
    # Generations happen at global steps 0 and 2 (steps_per_generation=2).
    trainer, rewards = _train(tmp_path, rspo_k_schedule="4:0,2:2")
    assert len(trainer.generated) == len(rewards) == 2
    for gen, r, k in zip(trainer.generated, rewards, (4, 2), strict=True):
        torch.testing.assert_close(gen["advantages"], rk.pass_at_k_weights(r, k, group_size=4))
    assert all(bool(gen["advantages"].any()) for gen in trainer.generated)  # the run had signal
    logged = [h["rspo/k"] for h in trainer.state.log_history if "rspo/k" in h]
    assert logged[0] == 4 and logged[-1] == 2


def test_maxrl_objective_uses_maxrl_weights(tmp_path):
    trainer, rewards = _train(tmp_path, rspo_objective="maxrl", rspo_order=3, rspo_estimator="rloo")
    for gen, r in zip(trainer.generated, rewards, strict=True):
        torch.testing.assert_close(gen["advantages"], rk.maxrl_weights(r, 3, estimator="rloo", group_size=4))
    assert all(bool(gen["advantages"].any()) for gen in trainer.generated)
    assert any(h.get("rspo/order") == 3 for h in trainer.state.log_history)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"rspo_k_schedule": "8:0,2:100"}, r"^rspo_k_schedule sets k=8 from step 0 but num_generations=4"),
        ({"rspo_k_schedule": "2:0,2:0"}, r"^rspo_k_schedule='2:0,2:0': the steps must increase"),
        ({"rspo_objective": "maxrl", "rspo_order": 5}, r"^rspo_order=5 but num_generations=4"),
        (
            {"rspo_objective": "maxrl", "rspo_estimator": "plugin"},
            r"rspo_estimator='plugin' is not an estimator for maxrl",
        ),
        ({"rspo_order": 2}, r"^rspo_order=2 is MaxRL's truncation order"),
        ({"rspo_objective": "maxrl", "rspo_estimator": "vr_cond", "rspo_order": 4}, r"vr_cond has no truncation"),
    ],
)
def test_config_errors_name_the_field(options, match):
    with pytest.raises(ValueError, match=match):
        _cpu_config(RSPOConfig, **options)
