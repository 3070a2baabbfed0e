"""pytest-benchmark suite of the throughput cases (the same rows as ``benchmarks/runner.py``).

Run with ``pytest benchmarks/bench_throughput.py`` (add ``--benchmark-only``; ``-k cpp`` for one
row). Each benchmark group is one case and objective, so pytest-benchmark's table lines the rows up
side by side. Slow baselines (the numpy loop, Algorithm 2 on a few groups) are marked ``slow``; the
runner reports Algorithm 2 scaled to the whole batch, this suite times the few groups as they are.
"""

from __future__ import annotations

import pytest

from benchmarks.runner import CASES, OBJECTIVES, build_rows, measure

ROWS = ("floor", "cpp", "api", "spec", "numpy-loop", "algorithm-2")
_built: dict = {}


def _rows(case, objective):
    key = (case.name, objective)
    if key not in _built:
        _built.clear()  # keep one case's inputs alive at a time
        _built[key] = build_rows(case, objective)
    return _built[key]


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "_") for c in CASES])
def test_throughput(benchmark, case, objective, row):
    rows = _rows(case, objective)
    if row not in rows:
        pytest.skip(f"{row} is not run for {case.name}")
    benchmark.group = f"{case.name} {objective}"
    if row in ("numpy-loop", "algorithm-2", "spec"):
        benchmark.pedantic(rows[row], rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark(rows[row])


def test_validated_pass_at_k_ratio_to_sum(benchmark):
    """Issue 14 §2: the public Pass@k with validation on, as a ratio to a bare ``sum`` timed in the same run.

    Both rows are sampled round-robin by :func:`benchmarks.runner.measure` (medians), so machine
    load hits them alike; the target is a ratio of at most 3 at B=16384, n=64.
    """
    case = next(c for c in CASES if c.name == "B=16384 n=64")
    rows = build_rows(case, "pass@k", with_slow=False)
    timed = measure({"sum": rows["floor"], "api": rows["api"]}, budget_s=1.0)
    ratio = timed["api"]["median_s"] / timed["sum"]["median_s"]
    benchmark.group = "validated Pass@k vs sum"
    benchmark.extra_info.update(
        sum_median_s=timed["sum"]["median_s"], api_median_s=timed["api"]["median_s"], ratio_api_to_sum=ratio
    )
    print(f"\nB=16384 n=64 validated pass_at_k_weights / sum (medians, same run): {ratio:.2f}x")
    benchmark(rows["api"])
