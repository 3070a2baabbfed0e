"""Throughput benchmark runner: ``rspo-kernels bench`` or ``python -m benchmarks``.

For every case (shape, k) and objective (Pass@k, Max@k) it times, side by side in one process,
interleaving the rows round by round, and reports medians:

- ``floor``: a bare ``torch.sort`` of the same rewards (Max@k) or ``rewards.sum(-1)`` (Pass@k; a
  segment sum ``index_add_`` for ragged groups) -- what any implementation must at least pay;
- ``cpp``: the C++ backend on the canonical layout (``rspo_kernels.weights._cpu_backend``);
- ``api``: the public function end to end (validation, layout, dispatch; C++ on CPU);
- ``spec``: the torch specification on the canonical layout (``rspo_kernels.weights.estimators``);
- ``numpy-loop``: a per-group numpy loop, what a user would write (``baselines.py``);
- ``algorithm-2``: the paper's Algorithm 2 (n <= 64 only, O(n^2 k)); timed on a few groups and
  scaled linearly to the whole batch (its cost is exactly linear in the number of groups).

It prints a table and writes ``<machine>-<date>.json`` (into ``benchmarks/results/local/``, a
folder git ignores, or ``--out``) with the machine, versions, date, every median and the ratios
checked against the targets. The results the docs quote were moved into ``benchmarks/results/`` by
hand.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["main", "Case", "CASES", "QUICK_CASES", "build_rows", "measure"]


@dataclass(frozen=True)
class Case:
    name: str
    batch: int  # groups (dense) or 0 for ragged
    n: int  # group size (dense) or total N (ragged)
    k: int

    @property
    def ragged(self) -> bool:
        return self.batch == 0


CASES = (
    Case("B=4096 n=16", 4096, 16, 4),
    Case("B=1024 n=64", 1024, 64, 8),
    Case("B=64 n=1024", 64, 1024, 16),
    Case("B=1 n=2^20", 1, 2**20, 64),
    Case("ragged N=65536", 0, 65536, 4),
    Case("B=16384 n=64", 16384, 64, 8),
)
QUICK_CASES = (
    Case("B=64 n=16", 64, 16, 4),
    Case("B=2 n=256", 2, 256, 8),
    Case("ragged N=1024", 0, 1024, 4),
)
OBJECTIVES = ("pass@k", "max@k")
ALG2_MAX_N = 64
ALG2_GROUPS = 4

# Targets from the issue, as (row, reference row, max allowed ratio row/reference).
TARGETS = (
    ("cpp", "spec", 1 / 5, ("B=4096 n=16", "B=1024 n=64"), OBJECTIVES, "cpp at least 5x faster than spec"),
    ("cpp", "floor", 2.0, None, ("max@k",), "Max@k at most 2x a bare torch.sort"),
    ("cpp", "floor", 3.0, None, ("pass@k",), "Pass@k at most 3x a bare sum"),
    ("api", "floor", 3.0, ("B=16384 n=64",), ("pass@k",), "validated public Pass@k at most 3x a bare sum"),
)


# --------------------------------------------------------------------------- inputs
def _ragged_ids(total: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffled labels of groups with random sizes in [k, 16 k] summing to ``total``."""
    sizes = []
    left = total
    while left > 0:
        size = int(rng.integers(k, 16 * k + 1))
        if left - size < k:
            size = left
        sizes.append(size)
        left -= size
    ids = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(ids)
    return ids


def build_rows(case: Case, objective: str, seed: int = 0, with_slow: bool = True) -> dict[str, Callable[[], object]]:
    """The callables timed for one case and objective, all on the same float32 rewards."""
    from benchmarks import baselines
    from rspo_kernels.weights import _cpu_backend, api
    from rspo_kernels.weights import estimators as spec
    from rspo_kernels.weights._layout import to_groups

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    k = case.k
    total = case.n if case.ragged else case.batch * case.n
    flat = torch.rand(total, generator=gen, dtype=torch.float32)
    if objective == "pass@k":
        flat = (flat < 0.3).to(torch.float32)
    if case.ragged:
        ids_np = _ragged_ids(total, k, rng)
        ids = torch.from_numpy(ids_np)
        groups, _ = to_groups(flat, shape=(total,), container="torch", group_size=None, group_ids=ids)
        rewards = flat
        layout = {"group_ids": ids}
        num_groups = groups.num_groups
        seg = ids  # the labels are 0..G-1 already, so they index the segment sum directly
        off = groups.offsets.numpy()
        gv = groups.values.numpy()
        np_groups = [gv[off[g] : off[g + 1]] for g in range(num_groups)]
        floor = (
            (lambda: torch.sort(rewards))
            if objective == "max@k"
            else (lambda: rewards.new_zeros(num_groups).index_add_(0, seg, rewards))
        )
    else:
        rewards = flat.reshape(case.batch, case.n)
        groups, _ = to_groups(rewards, shape=rewards.shape, container="torch", group_size=None, group_ids=None)
        layout = {}
        num_groups = case.batch
        np_groups = rewards.numpy()
        floor = (lambda: torch.sort(rewards, dim=-1)) if objective == "max@k" else (lambda: rewards.sum(-1))

    public = api.max_at_k_weights if objective == "max@k" else api.pass_at_k_weights
    loop = baselines.numpy_loop_max_at_k if objective == "max@k" else baselines.numpy_loop_pass_at_k
    rows: dict[str, Callable[[], object]] = {
        "floor": floor,
        "cpp": lambda: _cpu_backend.grouped_weights(groups, k, objective, "rspo"),
        "api": lambda: public(rewards, k, **layout),
        "spec": lambda: spec.grouped_weights(groups, k, objective, "rspo"),
    }
    if with_slow:
        rows["numpy-loop"] = lambda: loop(np_groups, k)
        max_n = int(groups.sizes.max())
        if max_n <= ALG2_MAX_N:
            subset = [np.asarray(g, dtype=np.float64) for g in np_groups[:ALG2_GROUPS]]
            scale = num_groups / len(subset)

            def alg2(subset=subset):
                for g in subset:
                    baselines.algorithm_2(g, k)

            alg2.scale = scale  # type: ignore[attr-defined]
            rows["algorithm-2"] = alg2
    return rows


# --------------------------------------------------------------------------- timing
def _time_once(fn: Callable[[], object], number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def measure(
    rows: dict[str, Callable[[], object]],
    budget_s: float,
    min_samples: int = 5,
    max_samples: int = 60,
    min_sample_s: float = 2e-3,
) -> dict[str, dict]:
    """Median seconds per call of every row, sampled round-robin so drift hits all rows alike.

    Each sample repeats a call enough times to last ``min_sample_s``; each row gets up to
    ``budget_s`` seconds of samples, at least ``min_samples`` and at most ``max_samples``.
    """
    plan = {}
    for name, fn in rows.items():
        fn()  # warm-up (allocations, first-touch, lazy imports)
        t = _time_once(fn, 1)
        number = max(1, math.ceil(min_sample_s / max(t, 1e-9)))
        samples = int(min(max_samples, max(min_samples, budget_s / max(t * number, 1e-9))))
        plan[name] = (number, samples)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for round_ in range(max(s for _, s in plan.values())):
        for name, fn in rows.items():
            number, samples = plan[name]
            if round_ < samples:
                times[name].append(_time_once(fn, number))
    out = {}
    for name, ts in times.items():
        scale = getattr(rows[name], "scale", 1.0)
        ts = [t * scale for t in ts]
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[name] = {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "q1_s": q[0],
            "q3_s": q[2],
            "samples": len(ts),
            "calls_per_sample": plan[name][0],
            "extrapolated": scale != 1.0,
        }
    return out


# --------------------------------------------------------------------------- reporting
def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from rspo_kernels import _cpu

    info = {
        "cpu": cpu or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpp_openmp": bool(getattr(_cpu, "openmp", False)),
        "cpp_threads": int(_cpu.max_threads()),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    return info


def versions() -> dict:
    import scipy

    import rspo_kernels

    return {
        "rspo_kernels": rspo_kernels.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def machine_slug(info: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", info["cpu"].lower()).strip("-") or "cpu"
    return f"{slug}-{info['logical_cpus']}cpu"


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def check_targets(results: list[dict]) -> list[dict]:
    checks = []
    for row, ref, limit, cases, objectives, text in TARGETS:
        for r in results:
            if (cases is not None and r["case"] not in cases) or r["objective"] not in objectives:
                continue
            t = r["rows"]
            if row not in t or ref not in t:
                continue
            ratio = t[row]["median_s"] / t[ref]["median_s"]
            checks.append(
                {
                    "target": text,
                    "case": r["case"],
                    "objective": r["objective"],
                    "ratio": ratio,
                    "limit": limit,
                    "met": ratio <= limit,
                }
            )
    return checks


def print_table(results: list[dict], checks: list[dict], file=None) -> None:
    file = file if file is not None else sys.stdout
    names = ["floor", "cpp", "api", "spec", "numpy-loop", "algorithm-2"]
    header = f"{'case':<16} {'objective':<7} " + " ".join(f"{n:>12}" for n in names)
    header += f" {'cpp/floor':>9} {'spec/cpp':>9} {'loop/cpp':>9}"
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in results:
        t = r["rows"]
        cells = []
        for n in names:
            if n in t:
                cells.append(f"{_fmt_time(t[n]['median_s']) + ('*' if t[n]['extrapolated'] else ''):>12}")
            else:
                cells.append(f"{'-':>12}")
        cpp = t["cpp"]["median_s"]
        ratios = [
            t["cpp"]["median_s"] / t["floor"]["median_s"],
            t["spec"]["median_s"] / cpp,
            t["numpy-loop"]["median_s"] / cpp if "numpy-loop" in t else None,  # --no-slow skips it
        ]
        print(
            f"{r['case']:<16} {r['objective']:<7} "
            + " ".join(cells)
            + " "
            + " ".join(f"{x:>8.2f}x" if x is not None else f"{'-':>9}" for x in ratios),
            file=file,
        )
    print("(* algorithm-2 timed on a few groups and scaled linearly to the batch)", file=file)
    print("", file=file)
    for c in checks:
        mark = "met   " if c["met"] else "MISSED"
        print(
            f"[{mark}] {c['target']}: {c['case']} {c['objective']}: ratio {c['ratio']:.2f} (limit {c['limit']:.2f})",
            file=file,
        )


# --------------------------------------------------------------------------- entry point
def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


# Beside the committed results, but ignored by git (.gitignore), so `make bench` leaves the clone clean.
_DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results" / "local"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rspo-kernels bench", description="Throughput benchmarks (CPU).")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and budgets (smoke test)")
    parser.add_argument(
        "--budget", type=_positive_seconds, default=None, help="seconds of samples per row (default 1.0)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output JSON file or directory (default {_DEFAULT_OUT_DIR.relative_to(_DEFAULT_OUT_DIR.parents[2])}/, "
        "which git ignores)",
    )
    parser.add_argument("--no-slow", action="store_true", help="skip the numpy loop and Algorithm 2")
    parser.add_argument("--case", action="append", default=None, help="only cases whose name contains this")
    parser.add_argument("--variance", action="store_true", help="also run the estimator-variance benchmark")
    parser.add_argument(
        "--loss-memory",
        action="store_true",
        help="also run the fused loss's CPU memory and time benchmark (benchmarks/memory.py)",
    )
    args = parser.parse_args(argv)

    cases = QUICK_CASES if args.quick else CASES
    if args.case:
        chosen = tuple(c for c in cases if any(s in c.name for s in args.case))
        if not chosen:
            names = ", ".join(repr(c.name) for c in cases)
            parser.error(f"--case {' / '.join(map(repr, args.case))} matches no case; the cases are {names}")
        cases = chosen
    budget = args.budget if args.budget is not None else (0.05 if args.quick else 1.0)
    info = machine_info()
    started = _dt.datetime.now(_dt.timezone.utc)
    results = []
    for case in cases:
        for objective in OBJECTIVES:
            rows = build_rows(case, objective, with_slow=not args.no_slow)
            timed = measure(rows, budget, min_samples=3 if args.quick else 5)
            results.append(
                {
                    "case": case.name,
                    "objective": objective,
                    "k": case.k,
                    "batch": case.batch or None,
                    "n": case.n if not case.ragged else None,
                    "total": case.n if case.ragged else case.batch * case.n,
                    "dtype": "float32",
                    "estimator": "rspo",
                    "rows": timed,
                }
            )
            print(f"  measured {case.name} {objective}", file=sys.stderr, flush=True)
    checks = check_targets(results)
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = list(os.getloadavg())
    print_table(results, checks)

    report = {
        "kind": "throughput",
        "date": started.isoformat(timespec="seconds"),
        "machine": info,
        "versions": versions(),
        "quick": args.quick,
        "budget_s_per_row": budget,
        "results": results,
        "targets": checks,
    }
    out = args.out
    name = f"{machine_slug(info)}-{started.date().isoformat()}{'-quick' if args.quick else ''}.json"
    if out is None:
        out = _DEFAULT_OUT_DIR / name  # ignored by git: a run must not dirty the user's clone
    elif out.suffix != ".json":
        out = out / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")

    status = 0
    if args.loss_memory:
        from benchmarks import memory

        mem_args = ["--n", "256", "--v", "2000"] if args.quick else []
        mem_args += ["--out", str(out.parent / f"cpu-{started.date().isoformat()}-memory.json")]
        status = memory.main(mem_args)
    if args.variance:
        from benchmarks import variance

        var_args = ["--quick"] if args.quick else []
        var_args += ["--out", str(out.parent)]
        return variance.main(var_args) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
