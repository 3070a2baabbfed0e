"""The OpenRLHF adapter on real OpenRLHF ``Experience`` objects and its real experience maker.

OpenRLHF is installed with ``--no-deps``; only vllm and flash-attn, which need CUDA, are stubbed
(``tests/stubs``), as OpenRLHF's own CPU tests do.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

import rspo_kernels as rk

STUBS = os.path.join(os.path.dirname(__file__), "stubs")
_STUBBED = ("vllm", "flash_attn")

pytest.importorskip("openrlhf")  # its __init__ imports nothing
_missing = [name for name in _STUBBED if importlib.util.find_spec(name) is None]
sys.path.append(STUBS)  # last, so real installs win
try:
    with warnings.catch_warnings():
        # deepspeed defines TorchScript methods on import, which torch deprecates.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit\._script")
        pytest.importorskip("openrlhf.trainer.ppo_utils.experience_maker")
        from openrlhf.trainer.ppo_utils import Experience
        from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
finally:
    sys.path.remove(STUBS)
    # Later test modules must not see the stand-ins as installed packages.
    for _name in [m for m in sys.modules if m.split(".")[0] in _missing or m == "_stub_missing"]:
        del sys.modules[_name]

from rspo_kernels.integrations import openrlhf as rspo_openrlhf  # noqa: E402

N = 4  # samples per prompt
WIDTH = 6  # action tokens


@pytest.fixture
def patched(monkeypatch):
    for key in rspo_openrlhf.ENV_VARS:
        monkeypatch.delenv(key, raising=False)
    rspo_openrlhf.install()
    yield monkeypatch
    rspo_openrlhf.uninstall()


def _maker(estimator="reinforce", kl_coef=0.0, n=N, clip_range=None, **reward_args):
    args = SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=n, max_new_tokens=WIDTH),
        data=SimpleNamespace(max_len=64),
        reward=SimpleNamespace(
            clip_range=clip_range,
            overlong_buffer_len=reward_args.get("overlong_buffer_len"),
            overlong_penalty_factor=reward_args.get("overlong_penalty_factor", 1.0),
            stop_properly_penalty_coef=None,
        ),
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=True)),
    )
    maker = object.__new__(RemoteExperienceMaker)
    maker.strategy = SimpleNamespace(args=args)
    maker.args = args
    maker.advantage_estimator = estimator
    maker.kl_ctl = SimpleNamespace(value=kl_coef)
    return maker


def _experiences(rewards, seed=0):
    """Two micro-batches holding a shuffled rollout, with right-padded responses and a KL term."""
    g = torch.Generator().manual_seed(seed)
    total = rewards.numel()
    order = torch.randperm(total, generator=g)  # experience rows are not in rollout order
    lengths = torch.randint(1, WIDTH + 1, (total,), generator=g)
    mask = torch.arange(WIDTH)[None, :] < lengths[:, None]
    kl = torch.rand(total, WIDTH, generator=g) * mask
    out = []
    for rows in order.split([total // 2, total - total // 2]):
        out.append(
            Experience(
                index=rows.tolist(),
                rewards=rewards[rows].clone(),
                action_mask=mask[rows],
                kl=kl[rows],
                response_length=lengths[rows].float(),
                info={"reward": rewards[rows].clone()},
            )
        )
    return out, order, mask, kl, lengths


def _reward_to_go(values: torch.Tensor) -> torch.Tensor:
    return values.flip(-1).cumsum(-1).flip(-1)


@pytest.mark.parametrize("objective,k,kl_coef", [("pass@k", 2, 0.0), ("pass@k", 3, 0.1), ("max@k", 2, 0.05)])
def test_advantages_are_rspo_weights_plus_kl_reward(patched, objective, k, kl_coef):
    patched.setenv("RSPO_K", str(k))
    patched.setenv("RSPO_OBJECTIVE", objective)
    g = torch.Generator().manual_seed(k)
    if objective == "pass@k":
        rewards = torch.randint(0, 2, (3 * N,), generator=g).float()
    else:
        rewards = torch.rand(3 * N, generator=g)
    experiences, order, mask, kl, _ = _experiences(rewards)

    out = _maker(kl_coef=kl_coef).compute_advantages_and_returns(experiences)

    # Independent reference: weights per prompt group (rollout order), broadcast over the
    # response, plus OpenRLHF's per-token KL reward-to-go.
    fn = rk.pass_at_k_weights if objective == "pass@k" else rk.max_at_k_weights
    weights = fn(rewards.reshape(-1, N), k).reshape(-1)
    expected = (weights[:, None] - kl_coef * _reward_to_go(kl)) * mask
    got_adv = torch.cat([e.advantages for e in out])
    got_ret = torch.cat([e.returns for e in out])
    torch.testing.assert_close(got_adv, expected[order])
    torch.testing.assert_close(got_ret, got_adv)
    assert got_adv[~mask[order]].abs().sum() == 0
    assert weights.abs().sum() > 0  # a zeroed advantage must not pass
    info = {key: torch.cat([e.info[key] for e in out]) for key in ("rspo_weight", "return", "group_reward_std")}
    torch.testing.assert_close(info["rspo_weight"], weights[order])
    torch.testing.assert_close(info["return"], (weights - kl_coef * (kl * mask).sum(-1))[order])
    torch.testing.assert_close(info["group_reward_std"], rewards.reshape(-1, N).std(-1).repeat_interleave(N)[order])
    assert all(e.kl is None for e in out)


def test_length_penalty_and_reward_clip_apply_before_rspo(patched):
    patched.setenv("RSPO_K", "2")
    patched.setenv("RSPO_OBJECTIVE", "max@k")
    rewards = torch.tensor([3.0, 0.5, 0.0, 1.0, 0.25, 0.0, 0.75, 1.0])
    experiences, order, mask, _, lengths = _experiences(rewards, seed=3)
    maker = _maker(clip_range=(-1.0, 1.0), overlong_buffer_len=2, overlong_penalty_factor=0.5)

    out = maker.compute_advantages_and_returns(experiences)

    # DAPO overlong penalty over the last 2 of WIDTH tokens, then the clip, then Max@k weights.
    exceed = (lengths.float() - (WIDTH - 2)).clamp(min=0, max=2)
    penalised = rewards - exceed / 2 * 0.5
    weights = rk.max_at_k_weights(penalised.clamp(-1.0, 1.0).reshape(-1, N), 2).reshape(-1)
    torch.testing.assert_close(torch.cat([e.advantages for e in out]), (weights[:, None] * mask)[order])
    torch.testing.assert_close(torch.cat([e.info["reward"] for e in out]), penalised[order])
    assert weights.max() > 1.0  # weights themselves are not clipped


def test_k_larger_than_n_samples_per_prompt_names_both_settings(patched):
    patched.setenv("RSPO_K", "5")
    experiences, *_ = _experiences(torch.zeros(2 * N))
    with pytest.raises(ValueError, match=r"RSPO_K=5 but --rollout\.n_samples_per_prompt=4.*lower RSPO_K"):
        _maker().compute_advantages_and_returns(experiences)


@pytest.mark.parametrize("estimator", ["gae", "rloo", "group_norm", "dr_grpo", "reinforce_baseline", "flash_reinforce"])
def test_estimators_that_rspo_would_replace_are_refused(patched, estimator):
    experiences, *_ = _experiences(torch.zeros(2 * N))
    match = rf"--algo\.advantage\.estimator {estimator} cannot run under RSPO.*--algo\.advantage\.estimator reinforce"
    with pytest.raises(ValueError, match=match):
        _maker(estimator=estimator).compute_advantages_and_returns(experiences)
    # ... already when the trainer actor builds its experience maker, before the policy loads.
    strategy = _maker(estimator=estimator).strategy
    with pytest.raises(ValueError, match=match):
        RemoteExperienceMaker(None, None, None, None, SimpleNamespace(value=0.0), strategy, None)


def test_experience_maker_checks_settings_when_built(patched):
    patched.setenv("RSPO_K", "4")
    patched.setenv("RSPO_ESTIMATOR", "pkpo_loo")  # needs k < n: fails for n = 4 before any rollout
    with pytest.raises(ValueError, match=r"pkpo_loo.*RSPO_ESTIMATOR=pkpo_loo"):
        RemoteExperienceMaker(None, None, None, None, SimpleNamespace(value=0.0), _maker().strategy, None)
    patched.setenv("RSPO_ESTIMATOR", "rspo")
    RemoteExperienceMaker(None, None, None, None, SimpleNamespace(value=0.0), _maker().strategy, None)


@pytest.mark.parametrize(
    "argv,env,match",
    [
        (["--algo.advantage.estimator", "rloo", "--rollout.n_samples_per_prompt", "8"], {}, r"estimator rloo cannot"),
        (["--rollout.n_samples_per_prompt", "8"], {}, r"estimator gae cannot"),  # OpenRLHF's default
        (
            ["--algo.advantage.estimator", "reinforce", "--rollout.n_samples_per_prompt", "8"],
            {"RSPO_K": "16"},
            r"RSPO_K=16 but --rollout\.n_samples_per_prompt=8",
        ),
        (["--algo.advantage.estimator", "reinforce"], {"RSPO_OBJECTIVE": "top@k"}, r"RSPO_OBJECTIVE='top@k'"),
    ],
)
def test_driver_hook_checks_the_command_line_before_ray_starts(monkeypatch, argv, env, match):
    for key in rspo_openrlhf.ENV_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    script = os.path.join(os.path.dirname(importlib.util.find_spec("openrlhf").origin), "cli", "train_ppo_ray.py")
    monkeypatch.setattr(sys, "argv", [script, "--actor.model_name_or_path", "m", *argv])
    with pytest.raises(ValueError, match=match):
        rspo_openrlhf.runtime_env_hook(None)
    monkeypatch.setattr(
        sys, "argv", [script, "--algo.advantage.estimator", "reinforce", "--rollout.n_samples_per_prompt", "8"]
    )
    monkeypatch.delenv("RSPO_K", raising=False)
    monkeypatch.delenv("RSPO_OBJECTIVE", raising=False)
    assert rspo_openrlhf.runtime_env_hook(None)["worker_process_setup_hook"] == rspo_openrlhf.SETUP_HOOK


def test_worker_hook_survives_a_worker_without_flash_attn():
    """A Ray worker without flash_attn (a CPU reward worker, say) runs the setup hook too."""
    import subprocess

    code = (
        "import sys\n"
        "sys.modules['flash_attn'] = sys.modules['vllm'] = None  # as if not installed\n"
        "from rspo_kernels.integrations import openrlhf\n"
        "openrlhf.install()\n"
        "print('OK', sorted(m for m in sys.modules if m.startswith('openrlhf')))\n"
    )
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "OK []"


@pytest.mark.parametrize(
    "env,match",
    [
        ({"RSPO_K": "two"}, r"RSPO_K='two' must be a positive integer"),
        ({"RSPO_OBJECTIVE": "mean@k"}, r"RSPO_OBJECTIVE='mean@k' is not an RSPO objective"),
        ({"RSPO_ESTIMATOR": "grpo"}, r"RSPO_ESTIMATOR='grpo' is not an estimator"),
    ],
)
def test_bad_environment_names_the_variable(env, match):
    with pytest.raises(ValueError, match=match):
        rspo_openrlhf.settings_from_env(env)


def test_install_is_idempotent_and_uninstall_restores_openrlhf():
    original = RemoteExperienceMaker.compute_advantages_and_returns, RemoteExperienceMaker.__init__
    rspo_openrlhf.install()
    patched_fns = RemoteExperienceMaker.compute_advantages_and_returns, RemoteExperienceMaker.__init__
    rspo_openrlhf.install()
    now = RemoteExperienceMaker.compute_advantages_and_returns, RemoteExperienceMaker.__init__
    assert now == patched_fns and all(p is not o for p, o in zip(patched_fns, original, strict=False))
    rspo_openrlhf.uninstall()
    assert (RemoteExperienceMaker.compute_advantages_and_returns, RemoteExperienceMaker.__init__) == original

    # Unpatched, OpenRLHF computes its own (dr_grpo: reward minus group mean) advantages.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    experiences, order, mask, _, _ = _experiences(rewards)
    out = _maker(estimator="dr_grpo").compute_advantages_and_returns(experiences)
    torch.testing.assert_close(torch.cat([e.advantages for e in out]), ((rewards - 0.25)[:, None] * mask)[order])


def test_runtime_env_hook_adds_the_setup_hook_and_forwards_settings(monkeypatch):
    monkeypatch.setenv("RSPO_K", "8")
    monkeypatch.delenv("RSPO_OBJECTIVE", raising=False)
    env = rspo_openrlhf.runtime_env_hook({"env_vars": {"NCCL_DEBUG": "WARN", "RSPO_K": "6"}})
    assert env["worker_process_setup_hook"] == "rspo_kernels.integrations.openrlhf.install"
    assert env["env_vars"] == {"NCCL_DEBUG": "WARN", "RSPO_K": "6"}  # the job's own value wins
    assert rspo_openrlhf.runtime_env_hook(None)["env_vars"] == {"RSPO_K": "8"}
    with pytest.raises(ValueError, match=r"already has worker_process_setup_hook='my\.hook'"):
        rspo_openrlhf.runtime_env_hook({"worker_process_setup_hook": "my.hook"})


def test_ray_worker_runs_install_through_the_runtime_env_hook(tmp_path):
    """A real local Ray job: the driver's ray.init applies RAY_RUNTIME_ENV_HOOK, and the worker that
    imports OpenRLHF's experience maker finds it patched, with the driver's RSPO_K."""
    import subprocess

    pytest.importorskip("ray")
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import ray\n"
        "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "@ray.remote\n"
        "def probe():\n"
        "    import os\n"
        "    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker as M\n"
        "    patched = getattr(M.compute_advantages_and_returns, '_rspo_original', None) is not None\n"
        "    return patched, os.environ.get('RSPO_K')\n"
        "print('RESULT', ray.get(probe.remote()))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSPO_")}
    env.update(RSPO_K="3", RAY_RUNTIME_ENV_HOOK="rspo_kernels.integrations.openrlhf.runtime_env_hook")
    if _missing:  # the worker imports OpenRLHF too, so it needs the same stand-ins
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), STUBS]))
    result = subprocess.run(
        [sys.executable, "-W", "ignore", str(driver)], env=env, capture_output=True, text=True, timeout=300
    )
    assert "RESULT (True, '3')" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]


def _run_readme_driver(monkeypatch, env: dict, argv: list[str], runtime_env=None) -> dict:
    """What the driver's ``ray.init`` does with RAY_RUNTIME_ENV_HOOK, for an OpenRLHF command line."""
    import importlib

    for key in rspo_openrlhf.ENV_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    module, _, name = env.get("RAY_RUNTIME_ENV_HOOK", f"{rspo_openrlhf.__name__}.runtime_env_hook").rpartition(".")
    hook = getattr(importlib.import_module(module), name)
    assert argv[:2] == ["-m", "openrlhf.cli.train_ppo_ray"]
    script = importlib.util.find_spec("openrlhf.cli.train_ppo_ray").origin
    monkeypatch.setattr(sys, "argv", [script, *[word for word in argv[2:] if word != "..."]])
    return hook(runtime_env)


def test_readme_launch_commands(monkeypatch):
    import json

    from readme_snippets import commands, snippet

    submit, direct = commands(snippet("### OpenRLHF", "bash"))
    # ray job submit: the runtime env installs the worker hook and carries the settings.
    (env_json,) = [w.split("=", 1)[1] for w in submit if w.startswith("--runtime-env-json=")]
    runtime_env = json.loads(env_json)
    assert runtime_env["worker_process_setup_hook"] == rspo_openrlhf.SETUP_HOOK
    settings = rspo_openrlhf.settings_from_env(runtime_env["env_vars"])
    entry = submit[submit.index("--") + 1 :]
    assert entry[0] == "python3"
    out = _run_readme_driver(monkeypatch, runtime_env["env_vars"], entry[1:])
    assert (settings.k, settings.objective) == (4, "pass@k")
    assert out["worker_process_setup_hook"] == rspo_openrlhf.SETUP_HOOK

    # A driver started directly: the variables before the command, checked inside ray.init.
    assignments = dict(word.split("=", 1) for word in direct[: direct.index("python3")])
    out = _run_readme_driver(monkeypatch, assignments, direct[direct.index("python3") + 1 :])
    assert out == {"worker_process_setup_hook": rspo_openrlhf.SETUP_HOOK, "env_vars": {"RSPO_K": "4"}}


def test_per_sequence_loss_aggregation_warns(monkeypatch, caplog):
    for key in rspo_openrlhf.ENV_VARS:
        monkeypatch.delenv(key, raising=False)
    with caplog.at_level("WARNING", logger=rspo_openrlhf.__name__):
        rspo_openrlhf.check_arguments("reinforce", 8, "token-mean")
        assert not caplog.records
        rspo_openrlhf.check_arguments("reinforce", 8, "seq-mean-token-mean")
    assert "--actor.loss_agg_mode seq-mean-token-mean divides each response by its own length" in caplog.text
