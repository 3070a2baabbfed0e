"""Memory of the fused-linear RSPO loss at SmolLM2-135M's head shape, against the unfused loss and Liger.

Runs :mod:`benchmarks.linear_memory` (one fresh process per variant, peak RSS above the inputs,
gradients included; see its docstring for the method) at two shapes with SmolLM2-135M-Instruct's
hidden size H = 576:

- ``smollm2``: V = 49152, SmolLM2's own vocabulary;
- ``qwen-vocab``: V = 151936, Qwen2.5 / Qwen3's vocabulary with the same H (the share of the
  logits in a step's memory grows with V / H, so this is where fusing pays most).

Each shape: 4096 response tokens (8 x 512), float32, the token-mean clipped loss with old
log-probs. The script's inputs carry an output bias (V floats, 0.2 / 0.6 MiB) that SmolLM2 lacks;
it is included for every variant alike.

``python -m benchmarks.real_model_memory`` writes ``benchmarks/results/real-model-memory-<date>.json``
and ``.md`` (``--out`` picks the JSON path); ``--smoke`` runs tiny shapes into a temporary directory.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile

from benchmarks import linear_memory

SHAPES = {"smollm2": (576, 49152), "qwen-vocab": (576, 151936)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_model_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="tokens B * T (default 4096)")
    p.add_argument("--batch", type=int, default=8, help="B (default 8, T = n / B)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default 3; 0 skips timing)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    p.add_argument(
        "--beta", type=float, default=0.0, help="k3 KL weight with reference log-probs (default 0: the recorded run)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds; not a measurement")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    now = _dt.datetime.now(_dt.timezone.utc)
    folder = tempfile.mkdtemp() if args.smoke else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    out = args.out or os.path.join(folder, f"real-model-memory-{now:%Y-%m-%d}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    reports, status = {}, 0
    for name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        if name not in SHAPES:
            p.error(f"--shapes: unknown {name!r}; choose from {list(SHAPES)}")
        h, v = SHAPES[name]
        part = os.path.splitext(out)[0] + f"-{name}.json"
        common = ["--repeats", str(args.repeats), "--beta", str(args.beta), "--out", part]
        if args.smoke:
            common += ["--smoke", "--h", "64", "--v", "1000"]
        else:
            common += ["--n", str(args.n), "--batch", str(args.batch), "--h", str(h), "--v", str(v)]
        status |= linear_memory.main(common)
        with open(part) as f:
            reports[name] = json.load(f)
        os.remove(part)
        os.remove(os.path.splitext(part)[0] + ".md")
    lines = [
        "Fused-linear RSPO loss at SmolLM2-135M's head (H = 576), forward + backward, CPU float32, "
        f"{args.n} tokens ({now:%Y-%m-%d}). Extra MiB: peak RSS above the inputs, gradients included.",
        "",
        "| shape | V | rspo_linear MiB | unfused MiB | liger MiB | vs unfused | vs liger "
        "| rspo_linear s | unfused s | liger s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rep in reports.items():
        rows = {r["variant"]: r for r in rep["results"]}

        def mib(v: str, rows: dict = rows) -> str:
            r = rows.get(v, {})
            return f"{r['extra_mib']:.0f}" if "extra_mib" in r else "error"

        def sec(v: str, rows: dict = rows) -> str:
            r = rows.get(v, {})
            return f"{r['median_s']:.2f}" if r.get("median_s") else "-"

        def ratio(k: str, rep: dict = rep) -> str:
            x = rep["ratios"][k]["ratio"]
            return "-" if x is None else f"{x:.3f}"

        lines.append(
            f"| {name} | {rep['shape']['vocab']} | {mib('rspo_linear')} | {mib('unfused')} | {mib('liger')} | "
            f"{ratio('memory_vs_unfused')} | {ratio('memory_vs_liger')} | "
            f"{sec('rspo_linear')} | {sec('unfused')} | {sec('liger')} |"
        )
    table = "\n".join(lines) + "\n"
    report = {
        "benchmark": "benchmarks.real_model_memory: benchmarks.linear_memory at SmolLM2-135M's H with two vocabularies",
        "date_utc": now.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "shapes": {k: {"hidden": SHAPES[k][0], "vocab": SHAPES[k][1]} for k in reports},
        "reports": reports,
    }
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table)
    print(table, end="")
    print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
