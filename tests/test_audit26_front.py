"""Issue 26, the front door and the crashes: CI runs the README's Quick start as written, the docs
stack is pinned, the README's figures are the cited files' numbers, and the command line, the
adapters' settings, MaxRL's weights and the loss modules fail (or work) as they say.

The module form of the loss is checked against the function form (itself checked against the
float64 specification elsewhere); the tensor-parallel comparison runs on 2 gloo processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import rspo_kernels as rk
from rspo_kernels.cli import main

_ROOT = Path(__file__).resolve().parents[1]
_HIDE = Path(__file__).resolve().parent / "hide_modules"
_README = (_ROOT / "README.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- 1. CI runs the Quick start
def _commands(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_the_readme_quick_start_before_installing_the_frameworks():
    quick = _README[_README.index("## Quick start") :]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", quick, flags=re.S).group(1)
    readme_make = [line.split("#")[0].strip() for line in block.splitlines() if line.strip().startswith("make ")]
    assert readme_make == ["make demo", "make test"], readme_make
    ci = _commands((_ROOT / ".ci" / "run").read_text(encoding="utf-8"))

    def first(pattern: str) -> int:
        hits = [i for i, line in enumerate(ci) if re.search(pattern, line)]
        assert hits, f".ci/run has no line matching {pattern!r}"
        return hits[0]

    demo, test, frameworks = first(r"^make demo$"), first(r"make test$"), first(r"^make setup-frameworks$")
    assert demo < test < frameworks, (
        "CI must run `make demo`, `make test` (the README's commands) before the frameworks"
    )
    assert not any(re.search(r"make (setup|setup-frameworks)\b", line) for line in ci[:demo]), ci[:demo]
    # ... then the skipped tests again, with the frameworks; then lint, the docs from a fresh venv, Triton 3.6.
    rerun = first(r"pytest .*rerun")
    assert frameworks < rerun and "RSPO_SKIPPED_LOG" in ci[test]
    assert first(r"rm -rf \.venv-docs") < first(r"^make docs") and first(r"^make lint$") > rerun
    assert first(r"\.ci/triton36") > rerun


def test_the_skipped_tests_are_logged_for_the_run_with_the_frameworks(tmp_path):
    """What .ci/run reruns after `make setup-frameworks`: an adapter test module that skips at import
    (here TRL, hidden as in the README's venv) is in the log, by its node id."""
    log = tmp_path / "skipped.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {
        "PYTHONPATH": os.pathsep.join([str(_HIDE), str(_ROOT)]),
        "RSPO_TEST_HIDE_MODULES": "trl,transformers",
        "RSPO_SKIPPED_LOG": str(log),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_integration_trl.py"],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode in (0, 5), proc.stdout + proc.stderr  # 5: all skipped, nothing collected
    assert "tests/test_integration_trl.py" in log.read_text(encoding="utf-8").splitlines()


# --------------------------------------------------------------------------- 2. the docs stack
def _extra(name: str) -> list[str]:
    text = (_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    body = re.search(rf"^{name} = \[(.*?)\]$", text, flags=re.S | re.M).group(1)
    return re.findall(r'"([^"]+)"', body)


def test_the_docs_extra_bounds_every_package_of_the_stack():
    reqs = {re.split(r"[<>=\[]", r, maxsplit=1)[0]: r for r in _extra("docs")}
    for package in ("mkdocs", "mkdocs-material", "mkdocstrings", "mkdocstrings-python", "mkdocs-autorefs", "griffelib"):
        assert package in reqs, f"the docs extra does not pin {package}"
    for req in reqs.values():
        assert "<" in req and ">=" in req, f"{req}: every docs package needs a lower and an upper bound"


def test_make_docs_builds_from_a_venv_of_its_own(tmp_path):
    make = __import__("shutil").which("make")
    if make is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "docs-venv"
    dry = subprocess.run(
        [make, "-n", "docs", f"DOCS_VENV={venv}", f"VENV={tmp_path / 'venv'}"],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"rm -rf {venv}" in dry and f"-m venv {venv}" in dry
    assert f"{venv}/bin/mkdocs build --strict" in dry


def test_api_page_options_are_known_to_the_pinned_handler():
    """mkdocstrings-python 2 rejects unknown options (1.x ignored `show_value`)."""
    handler = pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra")
    import dataclasses

    known = {f.name for f in dataclasses.fields(handler.PythonOptions)}
    for page in (_ROOT / "docs").glob("*.md"):
        for block in re.findall(r"^    options:\n((?:      \S.*\n)+)", page.read_text(encoding="utf-8"), flags=re.M):
            for key in re.findall(r"^      (\w+):", block, flags=re.M):
                assert key in known, f"{page.name}: mkdocstrings option {key!r} is unknown"


def test_api_page_uses_no_option_mkdocstrings_python_2_rejects():
    text = (_ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert "show_value:" not in text  # the 2.x name is show_attribute_values


# --------------------------------------------------------------------------- 3. the README's figures
def _headline_rows() -> list[tuple[str, str, str]]:
    section = _README[_README.index("## Headline numbers") :]
    section = section[: section.index("\n## ", 5)] if "\n## " in section[5:] else section
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("what", "---"):
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+(?:\.\d+)?", text)


def _fmt_like(value: float, shown: str) -> str:
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return f"{value:.{decimals}f}"


def _throughput_claims(data: dict, cell: str) -> None:
    """``AxB-Cx faster; Max@k at D x-E x a bare torch.sort``: spec / C++ over every row, C++ / floor over Max@k."""
    m = re.fullmatch(r"(\d+)x-(\d+)x faster; Max@k at ([\d.]+)x-([\d.]+)x a bare `torch.sort`", cell)
    assert m, cell
    speedups = [r["rows"]["spec"]["median_s"] / r["rows"]["cpp"]["median_s"] for r in data["results"]]
    sort_ratios = [
        r["rows"]["cpp"]["median_s"] / r["rows"]["floor"]["median_s"]
        for r in data["results"]
        if r["objective"] == "max@k"
    ]
    derived = (min(speedups), max(speedups), min(sort_ratios), max(sort_ratios))
    for shown, value in zip(m.groups(), derived, strict=True):
        assert shown == _fmt_like(value, shown), f"README says {shown}, the file gives {value:.4g}: {cell}"


def _memory_claims(data: dict, cell: str) -> None:
    """``A MiB extra memory vs B MiB unfused, C x its time``: the fused (torch) variant vs the reference."""
    m = re.fullmatch(r"([\d.]+) MiB extra memory vs ([\d.]+) MiB unfused, ([\d.]+)x its time", cell)
    assert m, cell
    by = {r["variant"]: r for r in data["results"]}
    derived = (
        by["torch"]["extra_mib"],
        by["reference"]["extra_mib"],
        by["torch"]["median_s"] / by["reference"]["median_s"],
    )
    for shown, value in zip(m.groups(), derived, strict=True):
        assert shown == _fmt_like(value, shown), f"README says {shown}, the file gives {value:.4g}: {cell}"


_JSON_CLAIMS = {
    "amd-epyc-2cpu-2026-11-30.json": _throughput_claims,
    "cpu-2026-12-05-memory.json": _memory_claims,
}


def test_every_readme_headline_number_matches_the_file_it_cites():
    checked = 0
    for what, cell, source in _headline_rows():
        link = re.search(r"\((benchmarks/results/[^)]+)\)", source)
        if not link:
            continue  # a docs page (the demo, the real model): tested where the page is
        path = _ROOT / link.group(1)
        assert path.is_file(), f"{what}: cites {link.group(1)}, which does not exist"
        if path.suffix == ".json":
            assert path.name in _JSON_CLAIMS, f"{what}: no derivation of the README's figures from {path.name}; add one"
            _JSON_CLAIMS[path.name](json.loads(path.read_text(encoding="utf-8")), cell)
        else:  # a report table: every figure is one of the file's numbers, rounded as the README shows it
            numbers = [float(x) for x in _numbers(path.read_text(encoding="utf-8"))]
            for shown in _numbers(cell):
                assert any(_fmt_like(x, shown) == shown for x in numbers), f"{what}: {shown} is not in {path.name}"
        checked += 1
    assert checked >= 5, checked


def test_the_throughput_claim_covers_the_slowest_row():
    """The regression itself: 17x was the README's floor, while the B=1, n=2^20 Max@k row gives 11x."""
    data = json.loads((_ROOT / "benchmarks/results/amd-epyc-2cpu-2026-11-30.json").read_text(encoding="utf-8"))
    (row,) = [r for r in data["results"] if r["case"] == "B=1 n=2^20" and r["objective"] == "max@k"]
    speedup = row["rows"]["spec"]["median_s"] / row["rows"]["cpp"]["median_s"]
    assert f"| {round(speedup)}x-" in _README


# --------------------------------------------------------------------------- 9. `rspo-kernels weights` input
def _weights(tmp_path, name: str, text: str, *args: str) -> int:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return main(["weights", str(path), *args])


def test_cli_reads_a_csv_field_longer_than_the_csv_module_default(tmp_path, capsys):
    import csv

    long = "x" * 200_000  # a completion column; csv's default limit is 131072
    text = "group,completion,reward\n" + "".join(f"g,{long},{r}\n" for r in (1, 0, 0, 1))
    limit = csv.field_size_limit()
    assert _weights(tmp_path, "r.csv", text, "-k", "2") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "group,completion,reward,weight" and len(out) == 5
    got = [float(line.rsplit(",", 1)[1]) for line in out[1:]]
    want = rk.pass_at_k_weights(np.array([1.0, 0, 0, 1]), 2, group_size=4)
    assert got == pytest.approx(want.tolist(), abs=1e-12) and out[1].split(",")[1] == long
    assert csv.field_size_limit() == limit  # the process-wide setting is restored


@pytest.mark.parametrize("digits", [400, 5000])
def test_cli_huge_jsonl_integer_reward_is_one_line_and_exit_2(tmp_path, capsys, digits):
    text = '{"group": 1, "reward": 0}\n{"group": 1, "reward": ' + "9" * digits + "}\n"
    assert _weights(tmp_path, "r.jsonl", text, "-k", "1", "--objective", "max@k") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "line 2" in err, err


def test_cli_huge_integer_reward_through_the_console_script_has_no_traceback(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"group": 1, "reward": ' + "9" * 400 + "}\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "rspo_kernels", "weights", str(path), "-k", "1", "--objective", "max@k"],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


# --------------------------------------------------------------------------- 10. settings, MaxRL, CLI, warnings
def _settings(**kw):
    from rspo_kernels.integrations._common import RSPOSettings

    keys = {
        "objective": "rspo_objective",
        "k": "rspo_k",
        "estimator": "rspo_estimator",
        "order": "rspo_order",
        "schedule": "rspo_k_schedule",
        "n": "num_generations",
    }
    args = dict(objective="pass@k", k=4, estimator="rspo") | kw
    return RSPOSettings.create(keys=keys, **args)


def test_an_integer_k_schedule_is_a_constant_k():
    """What Hydra passes for `rspo_k_schedule=8`: the same as the schedule '8:0'."""
    for value in (8, "8", np.int64(8)):
        s = _settings(schedule=value)
        assert s.schedule == _settings(schedule="8:0").schedule == ((0, 8),)
        assert s.at_step(0).k == s.at_step(10_000).k == 8
    with pytest.raises(ValueError, match=r"rspo_k_schedule=0: entry '0:0' is not 'k:step' with k >= 1"):
        _settings(schedule=0)
    with pytest.raises(ValueError, match=r"rspo_k_schedule=2\.5 \(float\) is not a k schedule"):
        _settings(schedule=2.5)


@pytest.mark.parametrize("step", [-1, 1.5, None])
def test_at_step_names_a_bad_step(step):
    s = _settings(schedule="8:0,4:200")
    with pytest.raises(ValueError, match=rf"at_step\(step={re.escape(repr(step))}\): the training step"):
        s.at_step(step)


def test_order_and_schedule_together_are_refused_naming_both_keys():
    with pytest.raises(ValueError, match=r"rspo_order=4 and rspo_k_schedule='8:0,2:100' both set MaxRL's order"):
        _settings(objective="maxrl", order=4, schedule="8:0,2:100")
    assert _settings(objective="maxrl", schedule="8:0,2:100").at_step(150).order == 2


def test_maxrl_weights_empty_batch_with_too_small_groups_raises_as_pass_at_k_does():
    empty = np.zeros((0, 4))
    with pytest.raises(ValueError, match=r"of 4 samples but k=8"):
        rk.pass_at_k_weights(empty, 8)
    with pytest.raises(ValueError, match=r"\(0, 4\) have groups of 4 samples but order=8; MaxRL"):
        rk.maxrl_weights(empty, 8)
    with pytest.raises(ValueError, match=r"groups of 4 samples but order=8; MaxRL"):
        rk.maxrl_weights(np.zeros(0), 8, group_size=4)
    assert rk.maxrl_weights(empty, 4).shape == (0, 4)  # a valid empty batch stays valid


def test_maxrl_weights_error_for_empty_groups_speaks_of_maxrl():
    with pytest.raises(ValueError) as info:
        rk.maxrl_weights(np.zeros((2, 0)))
    assert "MaxRL (maxrl_weights)" in str(info.value) and "Pass@k" not in str(info.value), info.value


@pytest.mark.parametrize("value", ["١", "1_0", "٢", " 2_0 "])
def test_cli_integer_flags_take_ascii_digits_only(tmp_path, capsys, value):
    (tmp_path / "r.csv").write_text("group,reward\ng,1\ng,0\n", encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        main(["weights", str(tmp_path / "r.csv"), "-k", value])
    assert info.value.code == 2
    assert f"{value!r} is not an integer" in capsys.readouterr().err


def test_cli_duplicated_header_column_is_an_error_naming_it(tmp_path, capsys):
    text = "group,reward,reward\ng,1,0\ng,0,1\n"
    assert _weights(tmp_path, "r.csv", text, "-k", "1") == 2
    err = capsys.readouterr().err
    assert "line 1: the header names the column 'reward' twice" in err, err


@pytest.mark.parametrize("container", ["numpy", "torch"])
def test_max_at_k_weights_that_overflow_are_an_error(container):
    rewards = np.array([[1e308, -1e308, 0.0, 1e308]])
    x = rewards if container == "numpy" else torch.tensor(rewards)
    with pytest.raises(ValueError, match=r"group 0: its Max@k weights overflow torch.float64"):
        rk.max_at_k_weights(x, 2)
    with pytest.raises(ValueError, match=r"overflow torch.float32"):  # finite in float64, not in the float32 output
        rk.max_at_k_weights(torch.tensor([[3e38, -3e38, 0.0, 1.0]], dtype=torch.float32), 2)
    assert np.isfinite(rk.max_at_k_weights(rewards / 1e300, 2)).all()


def test_cli_rewards_that_overflow_the_weights_are_an_error(tmp_path, capsys):
    text = "group,reward\ng,1e308\ng,-1e308\ng,0\ng,1e308\n"
    assert _weights(tmp_path, "r.csv", text, "-k", "2", "--objective", "max@k") == 2
    err = capsys.readouterr().err
    assert "overflow" in err and "rescale" in err and err.count("\n") == 1, err


def test_read_only_numpy_inputs_raise_no_torch_warning():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0]])
    rewards.setflags(write=False)
    flat = np.broadcast_to(np.array([1.0, 0.0]), (2, 2)).reshape(-1)  # a copy: writable, so make one read-only
    flat.setflags(write=False)
    ids = np.broadcast_to(np.array([7]), (4,))  # a read-only view
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (rk.pass_at_k_weights, rk.max_at_k_weights):
            assert np.allclose(fn(rewards, 2), fn(rewards.copy(), 2))
        assert np.allclose(rk.maxrl_weights(rewards), rk.maxrl_weights(rewards.copy()))
        assert np.allclose(rk.pass_at_k(rewards, 2), rk.pass_at_k(rewards.copy(), 2))
        assert np.allclose(
            rk.pass_at_k_weights(flat, 2, group_ids=ids), rk.pass_at_k_weights(flat.copy(), 2, group_ids=ids.copy())
        )
    assert not rewards.flags.writeable  # the caller's array is left as it was


# --------------------------------------------------------------------------- 11. tensor parallel modules
V_REAL, H, B, T = 11, 5, 4, 3


def _tp_inputs() -> dict:
    g = torch.Generator().manual_seed(26)
    weight = torch.randn(12, H, generator=g, dtype=torch.float64)  # V padded to 12 = 2 x 6
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V_REAL, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    return dict(weight=weight, hidden=hidden, ids=ids, mask=mask, rewards=rewards)


def _tp_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    x = _tp_inputs()
    group = dist.group.WORLD
    rows = slice(rank * 6, (rank + 1) * 6)
    shard = dict(tp_group=group, vocab_start=rank * 6, vocab_size=V_REAL)
    kw = dict(temperature=0.8, entropy_coeff=0.05, return_stats=True)

    def run(kind: str, form: str, **extra):
        h = x["hidden"].clone().requires_grad_()
        w = x["weight"][rows].clone().requires_grad_()
        logits = (h @ w.T).detach().requires_grad_() if kind == "logits" else None
        if form == "module":
            crit = (rk.RSPOLoss if kind == "logits" else rk.RSPOLinearLoss)("pass@k", k=2, **kw, **shard, **extra)
            args = (logits,) if kind == "logits" else (h, w)
            loss, stats = crit(*args, x["ids"], x["rewards"], group_size=4, mask=x["mask"])
        else:
            weights = rk.pass_at_k_weights(x["rewards"], 2, group_size=4)
            mode = dict(loss_agg_mode="seq-mean-token-sum")  # the module's default
            if kind == "logits":
                loss, stats = rk.rspo_loss(logits, x["ids"], weights, x["mask"], **kw, **mode, **shard, **extra)
            else:
                loss, stats = rk.rspo_linear_loss(h, w, x["ids"], weights, x["mask"], **kw, **mode, **shard, **extra)
        loss.backward()
        grads = [logits.grad] if kind == "logits" else [h.grad, w.grad]
        return loss.detach(), stats, grads

    for kind, extra in (("logits", {}), ("linear", {}), ("linear", {"sequence_parallel": True})):
        got, want = run(kind, "module", **extra), run(kind, "function", **extra)
        where = f"rank {rank} {kind} {extra}"
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12, msg=where)
        assert got[1].keys() == want[1].keys(), where
        for name in want[1]:
            torch.testing.assert_close(got[1][name], want[1][name], rtol=0, atol=1e-12, msg=f"{where} {name}")
        for a, b in zip(got[2], want[2], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"{where} grad")
    # ... and the sharded loss is the single-process one (the function form is checked elsewhere;
    # here the module on 2 ranks against the module on the whole, unpadded vocabulary in one).
    h = x["hidden"].clone().requires_grad_()
    whole = rk.RSPOLinearLoss("pass@k", k=2, **kw)(
        h, x["weight"][:V_REAL], x["ids"], x["rewards"], group_size=4, mask=x["mask"]
    )
    sharded = run("linear", "module")
    torch.testing.assert_close(sharded[0], whole[0].detach(), rtol=0, atol=1e-12, msg=f"rank {rank} vs one process")


def test_loss_modules_take_the_tensor_parallel_arguments():
    """`RSPOLoss(tp_group=...)` was "unknown rspo_loss arguments ['tp_group']"."""
    dw = pytest.importorskip("dist_workers")
    dw.spawn(_tp_worker, 2, timeout=240)


def test_loss_modules_name_their_tensor_parallel_arguments_without_a_group():
    with pytest.raises(TypeError, match=r"RSPOLoss got unknown rspo_loss arguments \['sequence_parallel'\]"):
        rk.RSPOLoss(sequence_parallel=True)
    crit = rk.RSPOLinearLoss(k=1, vocab_start=3)
    with pytest.raises(ValueError, match="vocab_start=3 needs tp_group"):
        crit(torch.zeros(2, 1, 4), torch.zeros(5, 4), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2), group_size=1)


# --------------------------------------------------------------------------- 13. the modules' unbiased default
@pytest.mark.parametrize("module", ["RSPOLoss", "RSPOLinearLoss"])
@pytest.mark.parametrize("objective", ["pass@k", "max@k"])
def test_module_default_aggregation_keeps_each_response_whole(module, objective):
    """Default: the gradient is ``-(1/B) sum_i w_i sum_t grad log p(y_i,t)``, whatever the lengths.

    That is the unbiased estimator of grad Pass@k (Max@k) on the library's scale (docs/trainers.md §
    Aggregation); ``token-mean``, the old default, divides by the batch's token count instead. The
    oracle is float64 autograd of that sum over ``log_softmax`` of the full logits.
    """
    g = torch.Generator().manual_seed(13)
    Bn, Tn, Vn, Hn = 6, 5, 7, 4
    hidden = torch.randn(Bn, Tn, Hn, generator=g, dtype=torch.float64)
    head = torch.randn(Vn, Hn, generator=g, dtype=torch.float64)
    ids = torch.randint(0, Vn, (Bn, Tn), generator=g)
    lengths = torch.tensor([1, 5, 2, 4, 3, 5])  # unequal lengths: where the modes differ
    mask = torch.arange(Tn)[None] < lengths[:, None]
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    if objective == "max@k":
        rewards = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7, 0.2], dtype=torch.float64)
    w = rk.pass_at_k_weights if objective == "pass@k" else rk.max_at_k_weights
    weights = w(rewards, 2, group_size=3)

    x = (hidden if module == "RSPOLinearLoss" else hidden @ head.T).clone().requires_grad_()
    crit = getattr(rk, module)(objective, k=2)
    args = (x, head) if module == "RSPOLinearLoss" else (x,)
    crit(*args, ids, rewards, group_size=3, mask=mask).backward()

    y = x.detach().clone().requires_grad_()
    logits = y @ head.T if module == "RSPOLinearLoss" else y
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    (-(weights[:, None] * logp * mask).sum() / Bn).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    # Explicitly asked for, the old default still differs (so the comparison above can fail).
    x.grad = None
    getattr(rk, module)(objective, k=2, loss_agg_mode="token-mean")(
        *args, ids, rewards, group_size=3, mask=mask
    ).backward()
    assert not torch.allclose(x.grad, y.grad)


def test_docstrings_state_the_default_aggregation():
    head = (rk.rspo_loss.__doc__ or "").split("Parameters")[0]
    assert "token-mean" in head and "seq-mean-token-sum" in head and "RSPOLoss" in head
    for cls in (rk.RSPOLoss, rk.RSPOLinearLoss):
        doc_head = (cls.__doc__ or "").split("Parameters")[0]
        assert 'loss_agg_mode="seq-mean-token-sum"' in doc_head, cls.__name__
