"""End-to-end tests of the ``rspo-kernels`` command: demo, weights, bench."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import rspo_kernels as rk
from rspo_kernels.cli import main
from rspo_kernels.demo import run as demo

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]
METHODS = [
    "initial (uniform)",
    "PG (k=1)",
    "hitchhiking k=2",
    "hitchhiking k=4",
    "hitchhiking k=8",
    "RSPO k=2",
    "RSPO k=4",
    "RSPO k=8",
]


def _run_module(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rspo_kernels", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        input=stdin,
        timeout=120,
    )


# --------------------------------------------------------------------------- demo
@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("demo")
    return _run_module("demo", "--quick", "--no-progress", "--out", str(out)), out


_HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
_HAS_EXTENSION = importlib.util.find_spec("rspo_kernels._cpu") is not None
_HIDE = Path(__file__).resolve().parent / "hide_modules"


def test_demo_quick_runs_end_to_end(quick_demo):
    proc, out = quick_demo
    assert proc.returncode == 0, proc.stderr
    # No progress bar without a terminal, and no warnings (but the one that says the C++
    # extension is not built, where it is not).
    stderr = (
        proc.stderr
        if _HAS_EXTENSION
        else re.sub(r".*RuntimeWarning: rspo_kernels: the C\+\+ extension.*\n", "", proc.stderr)
    )
    assert stderr == ""
    record = json.loads((out / "results.json").read_text())
    assert set(record) == {"config", "versions", "tables", "claims"}
    assert record["config"] == json.loads(json.dumps(dataclasses.asdict(demo.QUICK)))
    assert set(record["versions"]) >= {"rspo_kernels", "torch", "numpy", "python"}


@pytest.mark.skipif(not _HAS_MATPLOTLIB, reason="the figure needs matplotlib: pip install 'rspo_kernels[plot]'")
def test_demo_writes_the_figure(quick_demo):
    _, out = quick_demo
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_without_matplotlib_says_how_to_get_the_figure(tmp_path):
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(_HIDE), str(ROOT)]), "RSPO_TEST_HIDE_MODULES": "matplotlib"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rspo_kernels",
            "demo",
            "--quick",
            "--steps",
            "2",
            "--seeds",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "matplotlib is not installed, so no figure: pip install 'rspo_kernels[plot]'" in proc.stdout
    assert (tmp_path / "results.json").exists() and not (tmp_path / "results.png").exists()


def test_demo_trains_on_one_torch_thread_and_restores_the_setting(monkeypatch):
    seen = []
    train = demo._train_objective

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return train(*args, **kwargs)

    monkeypatch.setattr(demo, "_train_objective", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        demo.run_demo(TINY)
        assert seen == [1, 1]  # both objectives trained single-threaded
        assert torch.get_num_threads() == 2  # and the caller's setting is back
        demo.run_demo(TINY, threads=None)
        assert seen[2:] == [2, 2]
    finally:
        torch.set_num_threads(before)


def test_demo_help_states_the_thread_count_and_a_current_time(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "about a minute" not in text
    assert "--threads N" in text and "About 10-15 s on 2 idle CPU cores" in text


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--threads", "0"], "--threads must be at least 1"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--seeds", "0"], "--seeds must be at least 1"),
    ],
)
def test_demo_bad_flags_exit_2_and_name_the_flag(capsys, tmp_path, args, flag):
    assert main(["demo", "--quick", "--out", str(tmp_path), *args]) == 2
    assert flag in capsys.readouterr().err


def test_demo_json_holds_exactly_the_printed_table(quick_demo):
    proc, out = quick_demo
    record = json.loads((out / "results.json").read_text())
    printed = proc.stdout.splitlines()
    assert list(record["tables"]) == ["pass@k", "max@k"]
    for objective, table in record["tables"].items():
        name = objective.split("@")[0]
        assert table["columns"] == [f"{name}@{j}" for j in (1, 2, 4, 8, 16)] + ["entropy"]
        chen = [f"PassK-Training k={k}" for k in (2, 4, 8)] if objective == "pass@k" else []
        assert [row["method"] for row in table["rows"]] == METHODS + chen
        header = next(line for line in printed if line.startswith("method") and f"{name}@1" in line)
        assert header.split() == ["method", *table["columns"]]
        for row in table["rows"]:
            assert set(row) == {"method", *table["columns"]}
            cells = "".join(f"{row[c]['mean']:.3f} ± {row[c]['std']:.3f}".rjust(14) for c in table["columns"])
            assert any(line.startswith(row["method"]) and line.endswith(cells) for line in printed), row["method"]
    for claim in record["claims"]:
        assert (
            f"[{claim['objective']}] {claim['claim']}: {claim['holds']} ({claim['passed']}/{claim['checked']})"
            in proc.stdout
        )
    assert "estimator='passk_training_std'), biased" in proc.stdout


def test_demo_numbers_are_sane(quick_demo):
    _, out = quick_demo
    tables = json.loads((out / "results.json").read_text())["tables"]
    for objective, table in tables.items():
        rows = {row["method"]: row for row in table["rows"]}
        name = objective.split("@")[0]
        assert rows["initial (uniform)"]["entropy"]["mean"] == round(math.log(32), 3)
        for method in METHODS[1:]:
            means = [rows[method][f"{name}@{j}"]["mean"] for j in (1, 2, 4, 8, 16)]
            assert all(0 <= m <= 1 for m in means)
            assert means == sorted(means)  # metric@k never decreases in k
            assert rows[method]["entropy"]["mean"] < rows["initial (uniform)"]["entropy"]["mean"]
        for method in (r for r in rows if r.startswith("PassK-Training")):
            means = [rows[method][f"{name}@{j}"]["mean"] for j in (1, 2, 4, 8, 16)]
            assert all(0 <= m <= 1 for m in means) and means == sorted(means)
        # Training helps the objective it was run for: PG raises metric@1 well above the uniform start.
        assert rows["PG (k=1)"][f"{name}@1"]["mean"] > rows["initial (uniform)"][f"{name}@1"]["mean"] + 0.2


TINY = dataclasses.replace(demo.QUICK, steps=6, seeds=(3, 4), eval_prompts=32, entropy_every=3)


def test_demo_is_deterministic_and_depends_on_the_seed():
    first = demo.json_record(demo.run_demo(TINY))
    assert first == demo.json_record(demo.run_demo(TINY))
    other = demo.json_record(demo.run_demo(dataclasses.replace(TINY, seeds=(5, 6))))
    assert other["tables"] != first["tables"]


def test_demo_config_rejects_too_few_samples():
    with pytest.raises(ValueError, match="samples_per_prompt=8 must be >= 2 \\* max\\(train_ks\\)"):
        dataclasses.replace(demo.QUICK, samples_per_prompt=8)


def test_claim_checks_detect_failures():
    """Hand-built tables where every claim fails must be reported as failing."""
    config = demo.DemoConfig()
    rows = [
        {"method": m}
        | {c: {"mean": 0.5, "std": 0.0} for c in ("pass@1", "pass@2", "pass@4", "pass@8", "pass@16", "entropy")}
        for m in METHODS
    ]
    by_name = {row["method"]: row for row in rows}
    for k, value in ((2, 0.3), (4, 0.4), (8, 0.5)):  # hitchhiking improves with k
        by_name[f"hitchhiking k={k}"]["pass@1"]["mean"] = value
    for k, entropy in ((2, 2.0), (4, 1.5), (8, 1.0)):  # RSPO entropy falls with k
        by_name[f"RSPO k={k}"]["entropy"]["mean"] = entropy
    by_name["PG (k=1)"]["entropy"]["mean"] = 3.0
    for j in (1, 2, 4, 8):
        by_name["PG (k=1)"][f"pass@{j}"]["mean"] = 0.9  # PG best everywhere
    claims = {c["claim"]: c for c in demo.check_claims({"pass@k": {"columns": [], "rows": rows}}, config)}
    assert claims["hitchhiking degrades as k grows"]["holds"] == "no"
    assert claims["RSPO keeps more entropy as k grows"]["holds"] == "no"
    best = claims["RSPO trained with k is best at the same k"]
    assert (best["holds"], best["passed"], best["checked"]) == ("partly", 1, 4)


# --------------------------------------------------------------------------- weights
def _read_csv_output(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.parametrize("k", [2, 4])
def test_weights_csv_equals_library(capsys, k):
    path = FIXTURES / "graded_rewards.csv"
    code = main(
        [
            "weights",
            str(path),
            "-k",
            str(k),
            "--objective",
            "max@k",
            "--group-col",
            "prompt_id",
            "--reward-col",
            "score",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    rows = _read_csv_output(out)
    source = _read_csv_output(path.read_text())
    assert [{key: row[key] for key in source[0]} for row in rows] == source  # input rows kept, in order
    groups = [row["prompt_id"] for row in source]
    expected = rk.max_at_k_weights(np.array([float(row["score"]) for row in source]), k, group_ids=groups)
    np.testing.assert_array_equal(np.array([float(row["weight"]) for row in rows]), expected)


def test_weights_csv_worked_values(capsys):
    """docs/math.md worked values: [.1, .5, .5, .9], k=2 -> [0, 4/15, 4/15, 16/15]; [3, 1, 2, 5], k=4 -> [0,0,0,8]."""
    main(
        [
            "weights",
            str(FIXTURES / "graded_rewards.csv"),
            "-k",
            "2",
            "--objective",
            "max@k",
            "--group-col",
            "prompt_id",
            "--reward-col",
            "score",
        ]
    )
    p1 = [float(row["weight"]) for row in _read_csv_output(capsys.readouterr().out) if row["prompt_id"] == "p1"]
    np.testing.assert_allclose(p1, [0, 4 / 15, 4 / 15, 16 / 15], rtol=1e-12)
    main(
        [
            "weights",
            str(FIXTURES / "graded_rewards.csv"),
            "-k",
            "4",
            "--objective",
            "max@k",
            "--group-col",
            "prompt_id",
            "--reward-col",
            "score",
        ]
    )
    p2 = [float(row["weight"]) for row in _read_csv_output(capsys.readouterr().out) if row["prompt_id"] == "p2"]
    np.testing.assert_allclose(p2, [0, 0, 0, 8], rtol=1e-12)


def test_weights_jsonl_pass_at_k(capsys, tmp_path):
    out_file = tmp_path / "weights.jsonl"
    code = main(["weights", str(FIXTURES / "binary_rewards.jsonl"), "-k", "4", "-o", str(out_file)])
    assert code == 0 and capsys.readouterr().out == ""
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(rows) == 12 and all(set(row) == {"group", "reward", "text", "weight"} for row in rows)
    q7 = [row["weight"] for row in rows if row["group"] == "q7"]
    # 2 of 8 correct, k=4: k C(6,3)/C(7,3) = 16/7 for the correct ones (docs/math.md worked value).
    np.testing.assert_allclose(q7, [16 / 7, 0, 0, 16 / 7, 0, 0, 0, 0], rtol=1e-12)
    # Group 12 has n - c = 2 < k - 1 = 3: it passes almost surely, so every weight is 0.
    assert [row["weight"] for row in rows if row["group"] == 12] == [0.0] * 4


def test_weights_from_stdin_sniffs_the_format(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"group": 1, "reward": 3.0}\n{"group": 1, "reward": 1.0}\n'))
    assert main(["weights", "-", "-k", "2", "--objective", "max@k"]) == 0
    assert [json.loads(line)["weight"] for line in capsys.readouterr().out.splitlines()] == [4.0, 0.0]
    monkeypatch.setattr(sys, "stdin", io.StringIO("group,reward\ng,1\ng,0\n"))
    assert main(["weights", "-k", "1", "--estimator", "hitchhiking"]) == 0
    assert capsys.readouterr().out == "group,reward,weight\ng,1,1.0\ng,0,0.0\n"


@pytest.mark.parametrize(
    ("fixture", "message"),
    [
        ("bad_reward_not_number.csv", r"line 4: 'reward' is not a number: 'zero'"),
        ("bad_reward_nan.csv", r"line 5: 'reward' must be finite, got 'nan'"),
        ("bad_missing_field.csv", r"line 3: missing value for column 'reward'"),
        ("bad_invalid_json.jsonl", r"line 3: invalid JSON"),
        ("bad_missing_key.jsonl", r"line 2: missing field 'reward'"),
        (
            "bad_not_binary.csv",
            r"group 0 \(group_id 'a'\) has reward 0.5 .*line 3.*Pass@k needs rewards in \{0, 1\}",
        ),
    ],
)
def test_weights_bad_rows_name_their_line(capsys, fixture, message):
    assert main(["weights", str(FIXTURES / fixture), "-k", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("rspo-kernels weights: error: ")
    assert len(captured.err.splitlines()) == 1
    assert re.search(message, captured.err), captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "5"], "group 0 (group_id 'p1') has 4 samples but k=5"),
        (["-k", "2", "--reward-col", "missing"], "line 1: the header has no column 'missing'"),
        (["-k", "4", "--estimator", "pkpo_loo"], "the 'pkpo_loo' estimator needs n > k"),
    ],
)
def test_weights_library_and_header_errors(capsys, args, message):
    argv = [
        "weights",
        str(FIXTURES / "graded_rewards.csv"),
        "--objective",
        "max@k",
        "--group-col",
        "prompt_id",
        "--reward-col",
        "score",
    ]
    assert main(argv + args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "2"], "Pass@k needs rewards in {0, 1}: pass --objective max@k for graded rewards"),
        (["-k", "0", "--objective", "max@k"], "-k must be at least 1, got 0"),
        (["-k", "5", "--objective", "max@k"], "has 4 samples but k=5; max@k needs n >= k"),
        (["-k", "5", "--objective", "max@k"], "lower -k to at most 4"),
        (["-k", "4", "--objective", "max@k", "--estimator", "pkpo_loo"], "lower -k, or choose another --estimator"),
        (["-k", "3", "--objective", "max@k", "--estimator", "hitchhiking"], "change -k, or choose another --estimator"),
    ],
)
def test_weights_errors_name_the_flag_to_change(capsys, args, message):
    argv = ["weights", str(FIXTURES / "graded_rewards.csv"), "--group-col", "prompt_id", "--reward-col", "score"]
    assert main(argv + args) == 2
    err = capsys.readouterr().err
    assert message in err and "max_at_k_weights" not in err, err


def test_weights_refuses_unknown_extension_and_existing_weight_column(capsys, tmp_path):
    unknown = tmp_path / "rewards.txt"
    unknown.write_text("group,reward\na,1\n")
    assert main(["weights", str(unknown), "-k", "1"]) == 2
    assert "pass --format csv or --format jsonl" in capsys.readouterr().err
    assert main(["weights", str(unknown), "-k", "1", "--format", "csv"]) == 0
    assert capsys.readouterr().out == "group,reward,weight\na,1,1.0\n"
    clash = tmp_path / "rewards.csv"
    clash.write_text("group,reward,weight\na,1,3\n")
    assert main(["weights", str(clash), "-k", "1"]) == 2
    assert "already has a 'weight' column" in capsys.readouterr().err


def test_weights_error_exits_2_without_traceback_in_a_real_process(tmp_path):
    proc = _run_module("weights", str(FIXTURES / "bad_reward_not_number.csv"), "-k", "2")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "line 4" in proc.stderr
    missing = _run_module("weights", str(tmp_path / "nope.csv"), "-k", "2")
    assert missing.returncode == 2 and "cannot read" in missing.stderr


# --------------------------------------------------------------------------- bench
def test_bench_passes_arguments_to_the_runner(monkeypatch):
    seen = []
    runner = types.ModuleType("benchmarks.runner")
    runner.main = lambda argv=None: seen.append(argv) or 7
    package = types.ModuleType("benchmarks")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "benchmarks", package)
    monkeypatch.setitem(sys.modules, "benchmarks.runner", runner)
    assert main(["bench", "--quick", "--help"]) == 7
    assert seen == [["--quick", "--help"]]


def test_bench_without_a_source_checkout_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "benchmarks.runner", None)  # makes the import fail
    assert main(["bench"]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_pass_at_k_training_trains_beside_rspo_for_pass_at_k_only():
    from rspo_kernels.demo.config import methods

    passk = {m.name: m for m in methods((2, 4), "pass@k")}
    assert passk["PassK-Training k=4"].estimator == "passk_training_std" and passk["PassK-Training k=4"].k == 4
    assert not any(m.estimator == "passk_training_std" for m in methods((2, 4), "max@k"))


def test_jsonl_ids_1_true_and_1_0_are_refused_naming_the_group_column(capsys, tmp_path):
    """Python's 1 == True == 1.0 would merge three labels into one group: the CLI refuses, by column."""
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"g": 1, "r": 1}\n{"g": 1, "r": 0}\n{"g": 1.0, "r": 0}\n{"g": 1.0, "r": 1}\n')
    assert main(["weights", str(path), "-k", "2", "--group-col", "g", "--reward-col", "r"]) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "'g' column (--group-col)" in err and "group_ids" not in err, err
    path.write_text('{"g": 1, "r": 1}\n{"g": 1, "r": 0}\n{"g": true, "r": 0}\n{"g": true, "r": 1}\n')
    assert main(["weights", str(path), "-k", "2", "--group-col", "g", "--reward-col", "r"]) == 2
    assert "(--group-col)" in capsys.readouterr().err


# --------------------------------------------------------------------------- the front door (issue 23)
_NO_TORCH = """
import sys
from rspo_kernels.cli import main
for argv in ({argvs}):
    try:
        main(argv)
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "numpy") if m in sys.modules))
"""


@pytest.mark.parametrize(
    "argvs",
    [
        [["--help"]],
        [["weights", "--help"], ["demo", "--help"]],
        [[], ["weights", "rewards.csv"], ["weights", "-k", "x"], ["nope"]],  # usage errors
    ],
)
def test_help_and_usage_errors_do_not_import_torch(argvs):
    """`rspo-kernels --help` answers at once: torch (4 s to import) is only imported to compute."""
    code = _NO_TORCH.format(argvs=", ".join(map(repr, argvs)) + ",")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("name", "text", "what"),
    [
        ("empty.csv", "", "is empty"),
        ("header.csv", "group,reward\n", "has a header but no rows"),
        ("empty.jsonl", "\n\n", "is empty"),
        ("spaces.jsonl", " \n", "is empty"),
    ],
)
def test_weights_empty_input_is_an_error_naming_the_file(capsys, tmp_path, name, text, what):
    path = tmp_path / name
    path.write_text(text)
    assert main(["weights", str(path), "-k", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{str(path)!r} {what}: nothing to weigh" in captured.err, captured.err


def test_weights_empty_stdin_is_an_error(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["weights", "-k", "1"]) == 2
    assert "stdin is empty" in capsys.readouterr().err


def test_jsonl_missing_group_field_lists_the_fields_and_suggests_group_col(capsys, tmp_path):
    path = tmp_path / "rewards.jsonl"
    path.write_text('{"prompt": "a", "reward": 1}\n')
    assert main(["weights", str(path), "-k", "1"]) == 2
    err = capsys.readouterr().err
    assert "line 1: missing field 'group' (fields: 'prompt', 'reward'); choose the field with --group-col" in err, err
    assert main(["weights", str(path), "-k", "1", "--group-col", "prompt", "--reward-col", "score"]) == 2
    assert "missing field 'score' (fields: 'prompt', 'reward'); choose the field with --reward-col" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(("value", "kind"), [('"1"', "a string"), ("true", "a boolean"), ("null", "not a number")])
def test_jsonl_rewards_must_be_json_numbers(capsys, tmp_path, value, kind):
    """A string "1" and a boolean true are refused alike (docs/cli.md says so)."""
    path = tmp_path / "rewards.jsonl"
    path.write_text(f'{{"group": "a", "reward": 1}}\n{{"group": "a", "reward": {value}}}\n')
    assert main(["weights", str(path), "-k", "1"]) == 2
    err = capsys.readouterr().err
    assert f"line 2: 'reward' must be a JSON number (such as 1 or 0.5), got {value}, which is {kind}" in err, err


def test_csv_rewards_are_text_and_parsed_as_numbers(capsys, tmp_path):
    path = tmp_path / "rewards.csv"
    path.write_text("group,reward\na,1\na,0.0\n")
    assert main(["weights", str(path), "-k", "1"]) == 0
    assert capsys.readouterr().out == "group,reward,weight\na,1,1.0\na,0.0,0.0\n"


def test_unknown_estimator_names_the_choices(capsys):
    argv = ["weights", str(FIXTURES / "graded_rewards.csv"), "--group-col", "prompt_id", "--reward-col", "score"]
    assert main([*argv, "-k", "2", "--objective", "max@k", "--estimator", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--estimator 'nope' is not an estimator; choose one of " + ", ".join(rk.ESTIMATORS) in err, err


@pytest.mark.skipif(not _HAS_MATPLOTLIB, reason="the figure needs matplotlib: pip install 'rspo_kernels[plot]'")
def test_demo_figure_has_one_panel_per_training_k_with_few_distinct_curves(monkeypatch, tmp_path):
    """The pass@k panel used to hold 11 curves, Pass@k-Training greens on top of RSPO reds."""
    from matplotlib.figure import Figure

    from rspo_kernels.demo.plot import plot_demo

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: figures.append(self))
    config = dataclasses.replace(demo.QUICK, steps=3, seeds=(0,), eval_prompts=64)
    plot_demo(demo.run_demo(config), tmp_path / "demo.png")
    (fig,) = figures
    axes = fig.get_axes()
    assert len(axes) == 2 * (len(config.train_ks) + 1)
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        lines = [h if hasattr(h, "get_color") else h[0] for h in handles]  # errorbar: (line, caps, bars)
        colours = [line.get_color() for line in lines]
        assert 3 <= len(labels) <= 5 and len(set(colours)) == len(colours), (ax.get_title(), labels)
    assert "higher is better" in fig.get_suptitle()
