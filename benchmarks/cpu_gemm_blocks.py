"""The BLAS rate of the fused-linear loss's three matmuls, over row blocks and over the whole batch.

Why the one-pass fused-linear route cannot reach 0.85x unfused eager's time on a small CPU while
its blocks stay small (issue 28; :mod:`rspo_kernels.loss.linear_fused`): its three ``N x H x V``
matmuls run per block of ``rows`` tokens, and each one streams the whole ``(V, H)`` head, while
unfused eager runs each once over the whole batch. This measures, side by side in one process,
the GFLOPS of

- ``whole``: the three matmuls of an unfused step over all ``N`` rows
  (``h W^T``, ``G W``, ``G^T h``);
- ``blocks``: the same over blocks of ``rows`` rows, one block at a time (the GPU schedule);
- ``tiles``: the same over blocks of ``rows`` rows, one tile of the head at a time serving two
  blocks, as the CPU schedule does (``W_t h'^T`` for the next block, ``W_t^T G_t`` and
  ``G_t h`` for this one).

Each GFLOPS figure is ``3 * 2 N H V`` over the median time of ``--repeats`` round-robin runs.

Usage
-----
``python benchmarks/cpu_gemm_blocks.py`` (N = 3840 live tokens of the issue's 4096, H = 1024,
V = 32000, float32; rows 64, 128, 256, 512) prints a table and writes
``benchmarks/results/cpu-gemm-blocks-<date>.{json,md}``; ``--smoke`` runs tiny shapes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable


def schedules(n: int, h: int, v: int, rows: int, tile: int) -> dict[str, Callable[[], tuple]]:
    """``{name: step}``; each step does the three matmuls and returns its ``(dh, dW)`` buffers.

    ``rows = 0``: the whole batch at once. The inputs are random and the same for every ``rows``.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * h**-0.5
    grad = torch.randn(n, v, generator=g) * 1e-3
    dh, dw = torch.empty(n, h), torch.empty(v, h)
    spans = [(r0, min(r0 + (rows or n), n)) for r0 in range(0, n, rows or n)]
    tiles = [(v0, min(v0 + tile, v)) for v0 in range(0, v, tile)]
    block = torch.empty(v * rows) if rows else None
    # each block's G, transposed as the CPU schedule keeps it
    gT = [grad[r0:r1].t().contiguous() for r0, r1 in spans] if rows else []

    def whole() -> tuple:
        torch.mm(hid, w.t())
        torch.mm(grad, w, out=dh)
        torch.mm(grad.t(), hid, out=dw)
        return dh, dw

    def blocks() -> tuple:
        for i, (r0, r1) in enumerate(spans):
            torch.mm(hid[r0:r1], w.t())
            torch.mm(grad[r0:r1], w, out=dh[r0:r1])
            if i == 0:
                torch.mm(grad[r0:r1].t(), hid[r0:r1], out=dw)
            else:
                dw.addmm_(grad[r0:r1].t(), hid[r0:r1])
        return dh, dw

    def tiled() -> tuple:
        for i, (r0, r1) in enumerate(spans):
            k = r1 - r0
            assert block is not None
            x = block[: v * k].view(v, k)
            dhT = torch.empty(h, k)
            nxt = hid[spans[i + 1][0] : spans[i + 1][1]] if i + 1 < len(spans) else hid[r0:r1]
            for j, (v0, v1) in enumerate(tiles):
                w_t, g_t = w[v0:v1], gT[i][v0:v1]
                if j == 0:
                    torch.mm(w_t.t(), g_t, out=dhT)
                else:
                    dhT.addmm_(w_t.t(), g_t)
                if i == 0:
                    torch.mm(g_t, hid[r0:r1], out=dw[v0:v1])
                else:
                    dw[v0:v1].addmm_(g_t, hid[r0:r1])
                if nxt.shape[0] == k:
                    torch.mm(w_t, nxt.t(), out=x[v0:v1])
            dh[r0:r1] = dhT.t()
        return dh, dw

    return {"blocks": blocks, "tiles": tiled} if rows else {"whole": whole}


def measure(n: int, h: int, v: int, rows_list: list[int], tile: int, repeats: int) -> list[dict]:
    flops = 3 * 2 * n * h * v
    steps: dict[tuple[str, int], Callable[[], tuple]] = {}
    for name, f in schedules(n, h, v, 0, tile).items():
        steps[(name, n)] = f
    for rows in rows_list:
        for name, f in schedules(n, h, v, rows, tile).items():
            steps[(name, rows)] = f
    times: dict[tuple[str, int], list[float]] = {key: [] for key in steps}
    for f in steps.values():
        f()  # warm-up
    try:
        from tqdm import tqdm

        rounds = tqdm(range(repeats), desc="rounds", file=sys.stderr)
    except ImportError:
        rounds = range(repeats)
    for _ in rounds:
        for key, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[key].append(time.perf_counter() - t0)
    return [
        {
            "schedule": name,
            "rows": rows,
            "median_s": statistics.median(times[(name, rows)]),
            "gflops": flops / statistics.median(times[(name, rows)]) / 1e9,
        }
        for name, rows in steps
    ]


def markdown(report: dict) -> str:
    s = report["shape"]
    lines = [
        f"The fused-linear loss's three matmuls (3 x 2 N H V flops), N={s['tokens']}, H={s['hidden']}, "
        f"V={s['vocab']}, float32, head tile {report['tile']} rows ({report['date_utc'][:10]}, "
        f"{report['machine']['cpus']} CPUs, load average {report['machine']['loadavg'][0]:.1f}; "
        f"median of {report['repeats']} round-robin runs).",
        "",
        "| schedule | rows per block | time (s) | GFLOPS | vs whole batch |",
        "|---|---:|---:|---:|---:|",
    ]
    whole = next(r for r in report["results"] if r["schedule"] == "whole")
    for r in report["results"]:
        lines.append(
            f"| {r['schedule']} | {r['rows']} | {r['median_s']:.3f} | {r['gflops']:.0f} | "
            f"{r['median_s'] / whole['median_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="rows (live tokens; default 3840, smoke 96)")
    p.add_argument("--h", type=int, default=None, help="hidden size (default 1024; smoke 32)")
    p.add_argument("--v", type=int, default=None, help="vocabulary (default 32000; smoke 500)")
    p.add_argument("--rows", default=None, help="comma-separated rows per block (default 64,128,256,512)")
    p.add_argument("--tile", type=int, default=2048, help="vocabulary rows per head tile (default 2048)")
    p.add_argument("--repeats", type=int, default=None, help="round-robin runs (default 3; smoke 1)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; not a measurement")
    p.add_argument("--out", default=None, help="JSON path (the markdown table goes next to it)")
    args = p.parse_args(argv)
    n = args.n or (96 if args.smoke else 3840)
    h = args.h or (32 if args.smoke else 1024)
    v = args.v or (500 if args.smoke else 32000)
    rows_list = [int(r) for r in (args.rows or ("16,32" if args.smoke else "64,128,256,512")).split(",")]
    repeats = args.repeats or (1 if args.smoke else 3)
    if min(rows_list) < 1 or min(n, h, v, args.tile, repeats) < 1:
        p.error("--rows, --n, --h, --v, --tile and --repeats must be positive")
    import torch

    now = _dt.datetime.now(_dt.timezone.utc)
    report = {
        "benchmark": "GFLOPS of the fused-linear loss's three matmuls: whole batch, row blocks, shared head tiles",
        "command": "python benchmarks/cpu_gemm_blocks.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date_utc": now.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "machine": {
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "threads": torch.get_num_threads(),
            "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "shape": {"tokens": n, "hidden": h, "vocab": v},
        "tile": args.tile,
        "repeats": repeats,
        "results": measure(n, h, v, rows_list, args.tile, repeats),
    }
    table = markdown(report)
    print(table, end="")
    folder = tempfile.mkdtemp() if args.smoke else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    out = args.out or os.path.join(folder, f"cpu-gemm-blocks-{now:%Y-%m-%d}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
