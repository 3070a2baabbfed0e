"""Smoke tests of the benchmark suite: the runner and the variance benchmark at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import oracles
import pytest

# benchmarks/ is not an installed package; make the checkout importable under plain `pytest` too.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import baselines, runner, variance  # noqa: E402

# The throughput runner times the C++ backend beside the others: without the extension it cannot run.
needs_cpp = pytest.mark.skipif(
    importlib.util.find_spec("rspo_kernels._cpu") is None, reason="rspo_kernels._cpu (the C++ extension) is not built"
)


def test_algorithm_2_equals_theorem_c4_and_the_numpy_loop():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 8))
        k = int(rng.integers(1, n + 1))
        palette = rng.normal(size=3).round(2)
        r = rng.choice(palette, size=n) if trial % 2 else rng.normal(size=n)  # with and without ties
        want = np.array(oracles.theorem_c4(list(r), k))
        np.testing.assert_allclose(baselines.algorithm_2(r, k), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(baselines.numpy_loop_max_at_k(r[None, :], k)[0], want, rtol=1e-12, atol=1e-12)
        b = (r > np.median(r)).astype(float)
        np.testing.assert_allclose(
            baselines.numpy_loop_pass_at_k([b], k)[0], oracles.subset_rspo(list(b), k), rtol=1e-12, atol=1e-12
        )


@needs_cpp
def test_runner_quick_writes_json(tmp_path, capsys):
    assert runner.main(["--quick", "--budget", "0.01", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    assert report["kind"] == "throughput" and report["quick"] is True
    assert {"cpu", "logical_cpus", "cpp_openmp"} <= set(report["machine"])
    assert {"torch", "numpy", "rspo_kernels"} <= set(report["versions"])
    assert len(report["results"]) == 2 * len(runner.QUICK_CASES)
    for res in report["results"]:
        assert {"floor", "cpp", "api", "spec", "numpy-loop"} <= set(res["rows"])
        assert all(row["median_s"] > 0 for row in res["rows"].values())
    assert report["targets"] and all(math.isfinite(t["ratio"]) for t in report["targets"])
    out = capsys.readouterr().out
    assert "cpp/floor" in out and "wrote" in out


@needs_cpp
def test_runner_rows_compute_the_same_weights():
    """Every timed row that returns weights returns the same ones (the comparison is fair)."""
    case = runner.QUICK_CASES[0]
    for objective in runner.OBJECTIVES:
        rows = runner.build_rows(case, objective)
        cpp = rows["cpp"]().numpy().reshape(case.batch, case.n)
        np.testing.assert_allclose(rows["api"]().numpy(), cpp, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rows["spec"]().numpy().reshape(case.batch, case.n), cpp, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rows["numpy-loop"](), cpp, rtol=1e-5, atol=1e-5)


def test_variance_exact_moments_are_unbiased_and_ordered(tmp_path):
    rows = variance.run(ns_exact=(4,), ns_mc=(), samples=0)
    by = {(r["policy"], r["k"], r["estimator"]): r for r in rows}
    for r in rows:
        if r["estimator"] not in variance.BIASED:  # every other estimator is exactly unbiased
            assert r["bias"] < 1e-12, r
        if r["k"] == 1 and r["estimator"] in ("pkpo", "hitchhiking", "plugin"):
            assert r["trace_cov"] == pytest.approx(by[(r["policy"], 1, "rspo")]["trace_cov"], rel=1e-12)
    for p in variance.POLICIES:
        for k in (2, 4):  # hitchhiking and pkpo add variance over RSPO
            assert by[(p.name, k, "hitchhiking")]["ratio_to_rspo"] > 1
            assert by[(p.name, k, "pkpo")]["ratio_to_rspo"] > 1
        assert by[(p.name, 2, "plugin")]["bias"] > 1e-3  # plugin is biased


@pytest.mark.parametrize("policy", range(len(variance.POLICIES)))
def test_variance_exact_moments_by_multisets_equal_the_ordered_enumeration(policy):
    """The multiset (and, for hitchhiking, block) shortcut of exact_moments against all m^n ordered groups."""
    p = variance.POLICIES[policy]
    for n in (2, 4):
        for k in variance.k_values(n, exact=True):
            for e in variance.ESTIMATORS:
                if not variance.valid(e, n, k, p.objective):
                    continue
                fast = variance.exact_moments(p, n, k, e)
                mean, trace = variance.exact_moments_ordered(p, n, k, e)
                assert fast["trace_cov"] == pytest.approx(trace, rel=1e-11, abs=1e-15), (p.name, n, k, e)
                grad = variance.true_gradient(p, k)
                assert fast["bias"] == pytest.approx(float(np.linalg.norm(mean - grad)), abs=1e-12)
        for beta in variance.RISK_BETAS:
            fast = variance.exact_moments(p, n, beta, "risk_sensitive")
            assert fast["trace_cov"] == pytest.approx(
                variance.exact_moments_ordered(p, n, beta, "risk_sensitive")[1], rel=1e-11, abs=1e-15
            )


def test_variance_ordergrad_and_risk_sensitive_rows():
    """OrderGrad is exactly unbiased beside RSPO on the exact grid k in {1, 2, 4, n/2}, k < n; RS-GRPO
    is biased for grad J_beta (on binary policies E g = alpha grad J_beta with alpha < 1: docs/math.md)."""
    rows = variance.run(ns_exact=(4, 16), ns_mc=(), samples=0)
    og = [r for r in rows if r["estimator"] == "ordergrad"]
    assert {r["k"] for r in og} == {1, 2, 4, 8} and all(r["k"] < r["n"] for r in og)
    assert all(r["bias"] < 1e-12 for r in og)
    risk = variance.run_risk_sensitive(ns_exact=(4,), ns_mc=(), samples=0)
    assert {r["beta"] for r in risk} == set(variance.RISK_BETAS)
    for r in risk:
        if r["policy"].startswith("pass@k"):  # binary: E g = alpha grad J_beta exactly, alpha < 1
            assert 0 < r["scale"] < 1 and r["bias"] > 1e-3
    text = variance.winners(rows)
    assert "ordergrad" in text and "rspo" in text
    assert "lowest (unbiased)" in variance.markdown_table(rows)
    assert "| 4 | 1 | exact |" in variance.risk_sensitive_table(risk)


def test_variance_maxrl_rows_exact():
    """MaxRL rows: unbiased for grad J_T (exact, n = 4); vr_cond is unbiased only at T = n; on the
    categorical policy the leave-one-out "rloo" beats the released "maclaurin" for T >= 2."""
    rows = variance.run_maxrl(ns_exact=(4,), ns_mc=(), samples=0)
    by = {(r["policy"], r["k"], r["estimator"]): r for r in rows}
    assert {r["estimator"] for r in rows} == set(variance.MAXRL_ESTIMATORS)
    for r in rows:
        if r["estimator"] not in variance.MAXRL_BIASED or r["k"] == 4:
            assert r["bias"] < 1e-12, r
        else:
            assert r["bias"] > 1e-3, r
    categorical = variance.MAXRL_POLICIES[0].name
    for t in (2, 3, 4):
        assert by[(categorical, t, "rloo")]["trace_cov"] < by[(categorical, t, "maclaurin")]["trace_cov"]


def test_variance_quick_writes_outputs(tmp_path, capsys):
    assert variance.main(["--quick", "--samples", "500", "--out", str(tmp_path)]) == 0
    names = {p.suffix for p in tmp_path.iterdir()}
    assert {".json", ".md"} <= names
    if _has_matplotlib():
        assert ".png" in names
        assert len(list(tmp_path.glob("*-maxrl.png"))) == 1
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert report["headline"] and report["rows"] and report["maxrl_headline"]
    assert {r["objective"] for r in report["rows"]} == {"pass@k", "max@k", "maxrl", "risk-sensitive"}
    assert report["winners"].startswith("- pass@k, Bernoulli")
    assert "tr Cov relative to RSPO" in capsys.readouterr().out


def test_variance_figure_shows_passk_training_std_at_matched_scale_and_its_k_equals_n_point():
    rows = variance.run(ns_exact=(4,), ns_mc=(), samples=0)
    categorical = next(p.name for p in variance.POLICIES if p.objective == "pass@k" and len(p.probs) == 4)
    panel = [r for r in rows if r["policy"] == categorical]
    sel, values, _, vanished = variance._series(panel, "passk_training_std")
    assert vanished == [4]  # k = n: every advantage is 0, alpha = 0; marked on the axis edge instead
    assert [r["k"] for r in sel] == [1, 2]  # the exact grid k in {1, 2, 4, n/2}
    # Matched scale: the variance of g / alpha, whose mean is the true gradient (binary rewards).
    for r, value in zip(sel, values, strict=True):
        assert value == pytest.approx(r["trace_cov"] / r["scale"] ** 2) and value > 0
    assert r["scale"] < 1 < sel[0]["scale"]  # alpha is not a fraction: above 1 at k = 1 here
    _, raw, _, none = variance._series(panel, "rspo")
    assert none == [] and len(raw) == 3


def test_variance_replot_redraws_a_results_file(tmp_path):
    if not _has_matplotlib():
        pytest.skip("matplotlib is not installed")
    rows = variance.run(ns_exact=(2, 4), ns_mc=(), samples=0)
    path = tmp_path / "variance-test.json"
    path.write_text(json.dumps({"rows": rows}))
    assert variance.main(["--replot", str(path)]) == 0
    assert (tmp_path / "variance-test.png").read_bytes().startswith(b"\x89PNG")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _git_status() -> str | None:
    """`git status` of the checkout, untracked files included; None outside a git checkout."""
    try:
        proc = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


@needs_cpp
def test_runner_leaves_the_checkout_clean_by_default(tmp_path, monkeypatch, capsys):
    """`rspo-kernels bench` (what `make bench` runs, from the clone) writes into an ignored folder."""
    before = _git_status()
    if before is None:
        pytest.skip("not a git checkout")
    monkeypatch.chdir(_ROOT)
    written = []
    try:
        assert runner.main(["--quick", "--budget", "0.001", "--no-slow", "--case", "ragged"]) == 0
        out = capsys.readouterr().out
        (line,) = [line for line in out.splitlines() if line.startswith("wrote ")]
        path = Path(line.removeprefix("wrote "))
        written.append(path)
        assert path.parent == Path(_ROOT) / "benchmarks" / "results" / "local"
        assert json.loads(path.read_text())["results"][0]["case"] == "ragged N=1024"
        assert _git_status() == before  # no untracked file, nothing modified
    finally:
        for path in written:
            path.unlink(missing_ok=True)


@needs_cpp
def test_runner_without_slow_rows_prints_a_dash_not_nan(tmp_path, capsys):
    assert runner.main(["--quick", "--budget", "0.001", "--no-slow", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith(("B=", "ragged"))]
    assert rows and all(line.split()[-1] == "-" for line in rows), table
    assert "nan" not in table.lower(), table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--case", "no such case"], "--case 'no such case' matches no case; the cases are 'B=64 n=16'"),
        (["--budget", "-1"], "--budget: must be a positive number of seconds, got -1"),
        (["--budget", "nan"], "--budget: must be a positive number of seconds, got nan"),
    ],
)
def test_runner_usage_errors_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, args, message):
    from rspo_kernels.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    assert cli_main(["bench", "--quick", *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert list(tmp_path.iterdir()) == []
