"""k schedules and the MaxRL settings shared by every adapter (integrations/_common.py)."""

from __future__ import annotations

import pytest
import torch

import rspo_kernels as rk
from rspo_kernels.integrations._common import RSPOSettings, parse_k_schedule

KEYS = {
    "objective": "cfg.objective",
    "k": "cfg.k",
    "estimator": "cfg.estimator",
    "order": "cfg.order",
    "schedule": "cfg.k_schedule",
    "n": "cfg.n",
}


def _settings(**kwargs):
    args = {"objective": "pass@k", "k": 4, "estimator": "rspo", "keys": KEYS, **kwargs}
    return RSPOSettings.create(**args)


@pytest.mark.parametrize(
    "schedule,want",
    [
        ("8:0,4:200,1:400", ((0, 8), (200, 4), (400, 1))),
        (" 8 : 0 , 2 : 10 ", ((0, 8), (10, 2))),
        (["8:0", "4:200"], ((0, 8), (200, 4))),  # a list from YAML / Hydra
        ([(8, 0), (4, 200)], ((0, 8), (200, 4))),
        ("3:0", ((0, 3),)),
        (None, None),
        ("", None),
    ],
)
def test_parse(schedule, want):
    assert parse_k_schedule(schedule, "key") == want


@pytest.mark.parametrize(
    "schedule,match",
    [
        ("8:0,4:200,", r"entry '' is not 'k:step'"),
        ("8-0", r"entry '8-0' is not 'k:step'"),
        ("0:0", r"entry '0:0' is not 'k:step' with k >= 1"),
        ("\u0668:0", r"is not 'k:step'"),  # an Arabic-Indic eight: str.isdigit() says yes, we say no
        ("8:0,4:200,2:100", r"the steps must increase .*\[0, 200, 100\]"),
        ("4:5,2:10", r"does not say which k to use from step 0"),
        ([(8, 0), (True, 5)], r"is not 'k:step'"),
    ],
)
def test_parse_errors_name_the_key(schedule, match):
    with pytest.raises(ValueError, match=r"^cfg\.k_schedule=.*" + match):
        parse_k_schedule(schedule, "cfg.k_schedule")


def test_at_step_applies_the_schedule_and_logs_the_k_in_force():
    s = _settings(schedule="8:0,4:200,1:400")
    assert [s.at_step(step).k for step in (0, 1, 199, 200, 399, 400, 10**9)] == [8, 8, 8, 4, 4, 1, 1]
    assert s.at_step(250).logged == ("rspo/k", 4.0)
    assert s.at_step(250).metric_name == "pass@4"
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(s.at_step(300).weights(rewards), rk.pass_at_k_weights(rewards, 4))
    plain = _settings()
    assert plain.at_step(123) is plain


def test_every_scheduled_k_is_checked_against_the_group_size():
    _settings(schedule="8:0,4:200").check_group_size(8)
    with pytest.raises(ValueError, match=r"^cfg\.k_schedule sets k=8 from step 0 but cfg\.n=4"):
        _settings(schedule="8:0,4:200").check_group_size(4)
    with pytest.raises(ValueError, match=r"k=6 from step 200 but cfg\.n=4"):
        _settings(schedule="2:0,6:200").check_group_size(4)
    # the estimator's own constraints, for every scheduled k: pkpo_loo needs k < n
    with pytest.raises(ValueError, match=r"pkpo_loo"):
        _settings(estimator="pkpo_loo", schedule="2:0,4:200").check_group_size(4)


def test_maxrl_settings():
    s = _settings(objective="maxrl", estimator="rloo", order="3")
    assert (s.objective, s.order, s.min_group_size, s.logged) == ("maxrl", 3, 3, ("rspo/order", 3.0))
    assert "cfg.order=3" in s.describe()
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(s.weights(rewards), rk.maxrl_weights(rewards, 3, estimator="rloo"))
    default = _settings(objective="maxrl")
    assert default.order is None and default.min_group_size == 1 and "cfg.order=n" in default.describe()
    torch.testing.assert_close(default.weights(rewards), rk.maxrl_weights(rewards))
    annealed = _settings(objective="maxrl", schedule="8:0,2:50")
    assert annealed.at_step(60).order == 2 and annealed.at_step(60).logged == ("rspo/order", 2.0)
    with pytest.raises(ValueError, match=r"^cfg\.k_schedule sets order=8 from step 0 but cfg\.n=4"):
        annealed.check_group_size(4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"objective": "maxrl", "order": 0}, r"^cfg\.order=0 must be a positive integer"),
        ({"objective": "maxrl", "order": "\u0663"}, r"^cfg\.order='\u0663' must be a positive integer"),
        ({"objective": "maxrl", "order": 2.5}, r"^cfg\.order=2\.5 must be a positive integer"),
        ({"order": 2}, r"^cfg\.order=2 is MaxRL's truncation order: it needs the objective 'maxrl'"),
        ({"objective": "maxrl", "estimator": "pkpo"}, r"^cfg\.estimator='pkpo' is not an estimator for maxrl"),
        ({"estimator": "rloo"}, r"^cfg\.estimator='rloo' is not an estimator for pass@k"),
        ({"objective": "maxrl", "estimator": "vr_cond", "order": 4}, r"vr_cond has no truncation order"),
        ({"objective": "maxrl", "estimator": "vr_cond", "schedule": "4:0"}, r"vr_cond has no truncation order"),
    ],
)
def test_maxrl_errors_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _settings(**kwargs)


def test_maxrl_order_against_the_group_size():
    with pytest.raises(ValueError, match=r"^cfg\.order=5 but cfg\.n=4: MaxRL's order T"):
        _settings(objective="maxrl", order=5).check_group_size(4)
    _settings(objective="maxrl", order=4).check_group_size(4)
    _settings(objective="maxrl", estimator="vr_cond").check_group_size(4)
