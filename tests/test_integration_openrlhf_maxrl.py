"""The OpenRLHF adapter's MaxRL objective and k schedule (RSPO_ORDER, RSPO_K_SCHEDULE)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import rspo_kernels as rk

pytest.importorskip("openrlhf")
from test_integration_openrlhf import N, _experiences, _maker, patched  # noqa: E402, F401 (fixture)

from rspo_kernels.integrations import openrlhf as rspo_openrlhf  # noqa: E402


def _weights(out):
    return torch.cat([e.info["rspo_weight"] for e in out])


def test_k_schedule_follows_the_trainer_step_and_is_logged(patched):  # noqa: F811
    patched.setenv("RSPO_K_SCHEDULE", "3:0,2:5")
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    for step, k in [(0, 3), (4, 3), (5, 2), (99, 2)]:
        experiences, order, _, _, _ = _experiences(rewards)
        maker = _maker()
        maker._rspo_step = step
        out = maker.compute_advantages_and_returns(experiences)
        torch.testing.assert_close(_weights(out), rk.pass_at_k_weights(rewards.reshape(-1, N), k).reshape(-1)[order])
        assert torch.cat([e.info["rspo_k"] for e in out]).eq(k).all()


def test_trainer_step_reaches_the_experience_maker():
    """OpenRLHF's trainer module imports vLLM, so the wrapper runs on a stand-in ``BasePPOTrainer``
    whose ``train_step`` has the real one's signature (read from OpenRLHF's source)."""
    spec = importlib.util.find_spec("openrlhf.trainer.ppo_trainer")
    tree = ast.parse(Path(spec.origin).read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BasePPOTrainer"]
    (step,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "train_step"]
    assert [a.arg for a in step.args.args] == ["self", "rollout_samples", "global_step"]
    assert "self.experience_maker.make_experience_batch" in ast.unparse(step)

    class BasePPOTrainer:
        def train_step(self, rollout_samples, global_step):
            return self.experience_maker._rspo_step, global_step + 1

    module = SimpleNamespace(BasePPOTrainer=BasePPOTrainer)
    rspo_openrlhf._patch_trainer(module)
    trainer = BasePPOTrainer()
    trainer.experience_maker = SimpleNamespace()
    assert trainer.train_step([], 7) == (7, 8)
    assert trainer.train_step([], 8) == (8, 9)


@pytest.mark.parametrize("estimator,order", [("rspo", None), ("cross_fitted", "3"), ("vr_cond", None)])
def test_maxrl_objective(patched, estimator, order):  # noqa: F811
    patched.setenv("RSPO_OBJECTIVE", "maxrl")
    patched.setenv("RSPO_ESTIMATOR", estimator)
    if order is not None:
        patched.setenv("RSPO_ORDER", order)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    experiences, order_rows, _, _, _ = _experiences(rewards)
    out = _maker().compute_advantages_and_returns(experiences)
    want = rk.maxrl_weights(rewards.reshape(-1, N), None if order is None else int(order), estimator=estimator)
    torch.testing.assert_close(_weights(out), want.reshape(-1)[order_rows])
    assert "rspo_order" in out[0].info


@pytest.mark.parametrize(
    "env,match",
    [
        ({"RSPO_K_SCHEDULE": "8:0"}, r"^RSPO_K_SCHEDULE sets k=8 from step 0 but --rollout\.n_samples_per_prompt=4"),
        ({"RSPO_K_SCHEDULE": "2:0,x:5"}, r"^RSPO_K_SCHEDULE='2:0,x:5': entry 'x:5' is not 'k:step'"),
        ({"RSPO_OBJECTIVE": "maxrl", "RSPO_ORDER": "6"}, r"^RSPO_ORDER=6 but --rollout\.n_samples_per_prompt=4"),
        ({"RSPO_ORDER": "2"}, r"^RSPO_ORDER='2' is MaxRL's truncation order"),
    ],
)
def test_bad_settings_name_the_variable(patched, env, match):  # noqa: F811
    for key, value in env.items():
        patched.setenv(key, value)
    with pytest.raises(ValueError, match=match):
        rspo_openrlhf.check_arguments("reinforce", N)
