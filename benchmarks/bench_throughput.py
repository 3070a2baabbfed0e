"""pytest-benchmark suite of the throughput cases (the same rows as ``benchmarks/runner.py``).

Run with ``pytest benchmarks/bench_throughput.py`` (add ``--benchmark-only``; ``-k cpp`` for one
row). Each benchmark group is one case and objective, so pytest-benchmark's table lines the rows up
side by side. Slow baselines (the numpy loop, Algorithm 2 on a few groups) are marked ``slow``; the
runner reports Algorithm 2 scaled to the whole batch, this suite times the few groups as they are.
"""

from __future__ import annotations

import pytest

from benchmarks.runner import CASES, OBJECTIVES, build_rows

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
