"""Peak extra CPU memory and time of the fused-linear RSPO loss, forward + backward, side by side.

Variants, on the same inputs (hidden states ``(B, T, H)``, ``lm_head`` weight ``(V, H)`` and bias,
float32 by default; the token-mean clipped loss with old log-probs and, with ``--beta`` (default
0.04, the issue's setting), the k3 KL penalty to given reference log-probs):

- ``rspo_linear``: :func:`rspo_kernels.rspo_linear_loss` (blocks of logits, recomputed in backward);
- ``unfused``: eager torch: ``F.linear``, ``log_softmax``, ``gather``, the clipped loss, backward;
- ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (``loss_type="bnpo"``, which is our
  ``token-mean``; ``beta`` with ``ref_per_token_logps``) with its defaults (``chunk_size=1``,
  ``compiled=True``), when installed.

Method
------
Each variant runs in its own fresh Python process with ``MALLOC_MMAP_THRESHOLD_=65536``, so every
large buffer is ``mmap``-ed and returned to the OS when freed, and the resident set size tracks
what is alive. The child builds the inputs in place (no temporaries), runs forward + backward once
at full size (loading code paths, thread pools and Liger's compiled kernels), frees the gradients,
resets the kernel's high-water mark (``/proc/self/clear_refs``), reads the resident size
(baseline), runs forward + backward once more and reads the high-water mark (``VmHWM``).
``extra = peak - baseline`` includes the gradients of hidden, weight and bias (the buffers every
variant must produce). Where ``clear_refs`` is not writable the warm-up runs at a tiny shape
instead, before the baseline.

Time: one more process builds the inputs once, warms every variant up, then runs ``--repeats``
rounds of one forward + backward per variant, round-robin, so that every variant meets the same
machine load (the CPUs may be shared); the table reports medians.

Usage
-----
``python benchmarks/linear_memory.py`` (4096 tokens, H = 1024, V = 32000, float32) prints a
table and writes ``benchmarks/results/cpu-linear-<date>.json`` and ``.md`` (``--out`` picks the
JSON path). ``--smoke`` runs tiny shapes in a few seconds and writes to a temporary directory.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("rspo_linear", "unfused", "liger")
# The targets (issue 19, item 5), each a ratio of rspo_linear to another variant.
TARGETS = {
    "memory_vs_unfused": 0.1,
    "memory_vs_liger": 0.5,
    "time_vs_liger": 1.0,
    "time_vs_unfused": 2.0,
}
EPS_LOW, EPS_HIGH = 0.2, 0.28


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
        return True
    except OSError:
        return False


def clear_grads(inputs: tuple, n_grads: int) -> None:
    """Drop the gradients of the first ``n_grads`` inputs (the leaves each step differentiates)."""
    for t in inputs[:n_grads]:
        t.grad = None


def measure_peak(step, make_inputs, n_grads: int) -> dict:
    """Peak resident memory of one ``step(*inputs)`` above the resident size after the inputs.

    ``make_inputs(tiny)`` builds the step's inputs; the first ``n_grads`` are the leaves whose
    gradients every variant must produce (counted apart as ``gradients_mib``). After a full-size
    warm-up (code paths, thread pools, compiled kernels) the high-water mark is reset; where the
    kernel cannot reset it, a tiny warm-up keeps it from counting the warm-up's peak.
    """
    inputs = make_inputs(False)
    can_reset = _reset_peak()
    if can_reset:
        step(*inputs)
        clear_grads(inputs, n_grads)
        _reset_peak()
    else:
        step(*make_inputs(True))
    baseline = _status_kib("VmRSS")
    t0 = time.perf_counter()
    loss = step(*inputs)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {
        "loss": loss,
        "step_s": seconds,
        "baseline_mib": baseline / 1024,
        "peak_mib": peak / 1024,
        "extra_mib": (peak - baseline) / 1024,
        "gradients_mib": sum(t.numel() * t.element_size() for t in inputs[:n_grads]) / 2**20,
        "peak_reset": can_reset,
    }


def round_robin(steps: dict, inputs: tuple, repeats: int, n_grads: int) -> dict:
    """Median time of each (warmed-up) step, one run of each per round on the same inputs.

    Interleaving the variants exposes them to the same machine load, so their ratios hold on a
    shared machine where back-to-back blocks of runs would not.
    """
    times: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(repeats):
        for v, step in steps.items():
            clear_grads(inputs, n_grads)
            t0 = time.perf_counter()
            step(*inputs)
            times[v].append(time.perf_counter() - t0)
    return {v: {"median_s": statistics.median(ts) if ts else None, "times_s": ts} for v, ts in times.items()}


def run_child(script: str, what: str, argv: list[str]) -> dict:
    """Run ``script --child what argv...`` in a fresh process (the allocator setting only applies at
    start-up) and return the JSON on its last line, or ``{"variant": what, "error": ...}``."""
    cmd = [sys.executable, os.path.abspath(script), "--child", what, *argv]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", RSPO_KERNELS_BACKEND="")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"variant": what, "error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _make_step(variant: str, smoke: bool, beta: float):
    """``step(inputs)``: one forward + backward of ``variant``; returns the loss value."""
    import torch

    if variant == "rspo_linear":
        import rspo_kernels as rk

        def step(h, w, b, ids, adv, old, ref):
            loss = rk.rspo_linear_loss(
                h,
                w,
                ids,
                adv,
                bias=b,
                old_logprobs=old,
                ref_logprobs=ref if beta else None,
                beta=beta,
                epsilon_low=EPS_LOW,
                epsilon_high=EPS_HIGH,
            )
            loss.backward()
            return float(loss.detach())

        return step
    if variant == "unfused":

        def step(h, w, b, ids, adv, old, ref):
            logits = torch.nn.functional.linear(h, w, b).float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
            a = adv.unsqueeze(-1)
            per_token = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH))
            if beta:
                d = torch.clamp(ref - logp, -20.0, 20.0)
                per_token = per_token + beta * (torch.exp(d) - d - 1.0)
            loss = per_token.mean()
            loss.backward()
            return float(loss.detach())

        return step
    if variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # compiled=True is Liger's default; compiling takes longer than a smoke run may.
        crit = LigerFusedLinearGRPOLoss(
            beta=beta,
            use_ref_model=bool(beta),
            loss_type="bnpo",
            epsilon_low=EPS_LOW,
            epsilon_high=EPS_HIGH,
            compiled=not smoke,
        )

        def step(h, w, b, ids, adv, old, ref):
            loss, _ = crit(
                h,
                w,
                ids,
                torch.ones_like(ids),
                adv,
                bias=b,
                old_per_token_logps=old,
                ref_per_token_logps=ref if beta else None,
            )
            loss.backward()
            return float(loss.detach())

        return step
    raise ValueError(variant)


def _make_inputs(args: argparse.Namespace, tiny: bool = False) -> tuple:
    """``(hidden, weight, bias, ids, advantages, old_logprobs, ref_logprobs)``, built in place (no temporaries)."""
    import torch

    dtype = getattr(torch, args.dtype)
    B, T, H, V = (1, 4, 8, 16) if tiny else (args.batch, args.n // args.batch, args.h, args.v)
    g = torch.Generator().manual_seed(0)
    h = torch.empty(B, T, H, dtype=dtype).normal_(generator=g).requires_grad_()
    w = torch.empty(V, H, dtype=dtype).normal_(std=H**-0.5, generator=g).requires_grad_()
    b = torch.empty(V, dtype=dtype).normal_(std=0.1, generator=g).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.empty(B).normal_(generator=g)
    old = torch.empty(B, T).normal_(generator=g).mul_(0.3).sub_(torch.log(torch.tensor(float(V))))
    ref = torch.empty(B, T).normal_(generator=g).mul_(0.3).sub_(torch.log(torch.tensor(float(V))))
    return h, w, b, ids, adv, old, ref


def _child(variant: str, args: argparse.Namespace) -> dict:
    step = _make_step(variant, args.smoke, args.beta)
    return {"variant": variant, **measure_peak(step, lambda tiny: _make_inputs(args, tiny=tiny), 3)}


def _timing_child(variants: list[str], args: argparse.Namespace) -> dict:
    """Median forward + backward time of each variant, round-robin in one process (:func:`round_robin`)."""
    inputs = _make_inputs(args)
    steps = {}
    for v in variants:
        try:
            steps[v] = _make_step(v, args.smoke, args.beta)
            steps[v](*inputs)  # warm-up (Liger compiles here)
        except Exception as exc:  # an optional peer may be missing or fail; record why
            steps.pop(v, None)
            print(f"{v}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return round_robin(steps, inputs, args.repeats, 3)


def _run_child(variant: str, args: argparse.Namespace) -> dict:
    argv = ["--variants", args.variants, "--n", str(args.n), "--h", str(args.h), "--v", str(args.v)]
    argv += [
        "--batch",
        str(args.batch),
        "--dtype",
        args.dtype,
        "--repeats",
        str(args.repeats),
        "--beta",
        str(args.beta),
    ]
    return run_child(__file__, variant, argv + (["--smoke"] if args.smoke else []))


def _ratios(rows: dict) -> dict:
    ours = rows.get("rspo_linear", {})

    def ratio(key: str, other: str):
        o = rows.get(other, {})
        if key not in ours or key not in o or not o[key]:
            return None
        return ours[key] / o[key]

    got = {
        "memory_vs_unfused": ratio("extra_mib", "unfused"),
        "memory_vs_liger": ratio("extra_mib", "liger"),
        "time_vs_liger": ratio("median_s", "liger"),
        "time_vs_unfused": ratio("median_s", "unfused"),
    }
    return {
        k: {"ratio": v, "target": TARGETS[k], "met": None if v is None else v <= TARGETS[k]} for k, v in got.items()
    }


def markdown(report: dict) -> str:
    s = report["shape"]
    lines = [
        f"Fused-linear RSPO loss, forward + backward, CPU {s['dtype']}, {s['tokens']} tokens, H={s['hidden']}, "
        f"V={s['vocab']}, token-mean, bias, beta={report['loss']['beta']} with reference log-probs "
        f"({report['date_utc'][:10]}, {report['machine']['cpus']} CPUs; median of "
        f"{report['repeats']} runs). Extra memory: peak RSS above the inputs, gradients included.",
        "",
        "| variant | extra MiB | of which gradients | time (s) |",
        "|---|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {' '.join(r['error'])[:60]} | | |")
            continue
        t = "-" if r["median_s"] is None else f"{r['median_s']:.3f}"
        lines.append(f"| {r['variant']} | {r['extra_mib']:.1f} | {r['gradients_mib']:.1f} | {t} |")
    lines += ["", "| rspo_linear vs | ratio | target | met |", "|---|---:|---:|---|"]
    for k, v in report["ratios"].items():
        ratio = "-" if v["ratio"] is None else f"{v['ratio']:.3f}"
        lines.append(f"| {k.replace('_vs_', ' vs ')} | {ratio} | <= {v['target']:.3g} | {v['met']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="tokens B * T (default 4096; smoke 256)")
    p.add_argument("--h", type=int, default=None, help="hidden size (default 1024; smoke 64)")
    p.add_argument("--v", type=int, default=None, help="vocabulary size (default 32000; smoke 1000)")
    p.add_argument("--batch", type=int, default=None, help="B, T = n / B (default 8; smoke 2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 5; smoke 1)")
    p.add_argument("--beta", type=float, default=0.04, help="k3 KL weight, with reference log-probs (0: no KL)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds; not a measurement")
    p.add_argument("--out", default=None, help="JSON path (the markdown table goes next to it)")
    p.add_argument("--child", default=None, choices=VARIANTS + ("timing",), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.n = args.n or (256 if args.smoke else 4096)
    args.h = args.h or (64 if args.smoke else 1024)
    args.v = args.v or (1000 if args.smoke else 32000)
    args.batch = args.batch or (2 if args.smoke else 8)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 5)
    if args.n % args.batch:
        p.error("--n must be a multiple of --batch")
    if args.child == "timing":
        print(json.dumps(_timing_child([v.strip() for v in args.variants.split(",") if v.strip()], args)))
        return 0
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return 0

    import torch

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    rows = {v: _run_child(v, args) for v in variants}
    timing = _run_child("timing", args) if args.repeats else {}
    for v, r in rows.items():
        r.update(timing.get(v, {"median_s": None, "times_s": []}))
    now = _dt.datetime.now(_dt.timezone.utc)
    report = {
        "benchmark": "rspo_linear_loss CPU forward+backward: peak extra RSS (VmHWM, one process per variant) and time",
        "date_utc": now.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "machine": {
            "host": platform.node(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "liger_kernel": _version("liger_kernel"),
        },
        "shape": {"tokens": args.n, "hidden": args.h, "vocab": args.v, "batch": args.batch, "dtype": args.dtype},
        "loss": {"loss_agg_mode": "token-mean", "beta": args.beta, "ref_logprobs": bool(args.beta), "bias": True},
        "allocator": {"MALLOC_MMAP_THRESHOLD_": "65536"},
        "repeats": args.repeats,
        "results": list(rows.values()),
        "ratios": _ratios(rows),
    }
    table = markdown(report)
    print(table, end="")
    if args.out:
        out = args.out
    else:
        folder = (
            tempfile.mkdtemp() if args.smoke else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        )
        out = os.path.join(folder, f"cpu-linear-{now:%Y-%m-%d}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table)
    print(f"wrote {out}")
    failed = [r["variant"] for r in rows.values() if "error" in r and r["variant"] != "liger"]
    return 1 if failed else 0


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module.replace("_", "-"))
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
