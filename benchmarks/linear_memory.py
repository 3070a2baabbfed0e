"""Peak extra CPU memory and time of the fused-linear RSPO loss, forward + backward, side by side.

Variants, on the same inputs (hidden states ``(B, T, H)``, ``lm_head`` weight ``(V, H)`` and bias,
float32 by default; the token-mean clipped loss with old log-probs and, with ``--beta`` (default
0.04, the issue's setting), the k3 KL penalty to given reference log-probs; a padding mask, by
default half of one response padded as in every RL batch (``--pad``); ``--entropy-coeff`` adds the
entropy bonus):

- ``rspo_linear``: :func:`rspo_kernels.rspo_linear_loss` (for these token-local losses the one-pass
  route: gradients formed block by block in forward, three matmuls);
- ``rspo_two_pass``: the same call forced onto the two-pass route (log-probs first, logits
  recomputed in backward: four matmuls), the route non-local losses and ``tp_group`` take;
- ``unfused``: eager torch: ``F.linear``, ``log_softmax``, ``gather``, the clipped loss, backward;
- ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (``loss_type="bnpo"``, which is our
  ``token-mean``; ``beta`` with ``ref_per_token_logps``; the mask as ``attention_mask``) with its
  defaults (``chunk_size=1``, ``compiled=True``), when installed; it has no entropy bonus.

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
``python benchmarks/linear_memory.py`` (4096 tokens as (B, T) = (8, 512), H = 1024, V = 32000,
float32, padding mask) prints a table and writes ``benchmarks/results/cpu-linear-<date>.json`` and
``.md`` (``--out`` picks the JSON path). ``--preset long`` is the long-context row: 65,536 tokens in
one call, H = 256, V = 8192, a fifth padding, entropy bonus 0.01 (target: extra memory within the
gradients plus 64 MiB). ``--suite`` runs the float32 shape, the same in bfloat16 where the CPU has
bfloat16 instructions, and the long row, into one JSON. ``--smoke`` runs tiny shapes in a few
seconds and writes to a temporary directory.
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

VARIANTS = ("rspo_linear", "rspo_two_pass", "unfused", "liger")
# The targets (issue 28), each a ratio of rspo_linear to another variant.
TARGETS = {
    "memory_vs_unfused": 0.1,
    "memory_vs_liger": 0.5,
    "time_vs_liger": 0.6,
    "time_vs_unfused": 0.85,
}
# Long context (issue 28): extra memory at most the gradients plus this many MiB.
LONG_SLACK_MIB = 64.0
PADS = ("half-response", "fifth", "none")
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


def _make_step(variant: str, smoke: bool, beta: float, entropy_coeff: float = 0.0, chunk_rows: int | None = None):
    """``step(inputs)``: one forward + backward of ``variant``; returns the loss value."""
    import torch

    if variant.startswith("rspo_linear@"):  # a --frontier point: rspo_linear at a given chunk_rows
        variant, chunk_rows = "rspo_linear", int(variant.split("@", 1)[1])
    if variant in ("rspo_linear", "rspo_two_pass"):
        import rspo_kernels as rk
        import rspo_kernels.loss.linear as rk_linear

        def never(options, tensors):
            return False

        def step(h, w, b, ids, adv, old, ref, mask):
            one_pass = rk_linear.use_one_pass
            if variant == "rspo_two_pass":  # force the route non-local losses take (benchmark only)
                rk_linear.use_one_pass = never
            try:
                return _rspo_step(h, w, b, ids, adv, old, ref, mask)
            finally:
                rk_linear.use_one_pass = one_pass

        def _rspo_step(h, w, b, ids, adv, old, ref, mask):
            loss = rk.rspo_linear_loss(
                h,
                w,
                ids,
                adv,
                mask,
                bias=b,
                old_logprobs=old,
                ref_logprobs=ref if beta else None,
                beta=beta,
                epsilon_low=EPS_LOW,
                epsilon_high=EPS_HIGH,
                entropy_coeff=entropy_coeff,
                chunk_rows=chunk_rows,
            )
            loss.backward()
            return float(loss.detach())

        return step
    if variant == "unfused":

        def step(h, w, b, ids, adv, old, ref, mask):
            logits = torch.nn.functional.linear(h, w, b).float()
            logp_all = torch.log_softmax(logits, dim=-1)
            logp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
            a = adv.unsqueeze(-1)
            per_token = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH))
            if beta:
                d = torch.clamp(ref - logp, -20.0, 20.0)
                per_token = per_token + beta * (torch.exp(d) - d - 1.0)
            if entropy_coeff:
                per_token = per_token + entropy_coeff * (logp_all.exp() * logp_all).sum(-1)
            m = mask.to(per_token.dtype)
            loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
            loss.backward()
            return float(loss.detach())

        return step
    if variant == "liger":
        if entropy_coeff:
            raise NotImplementedError("LigerFusedLinearGRPOLoss has no entropy bonus")
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

        def step(h, w, b, ids, adv, old, ref, mask):
            loss, _ = crit(
                h,
                w,
                ids,
                mask.long(),
                adv,
                bias=b,
                old_per_token_logps=old,
                ref_per_token_logps=ref if beta else None,
            )
            loss.backward()
            return float(loss.detach())

        return step
    raise ValueError(variant)


def padding_mask(B: int, T: int, pad: str):
    """``(B, T)`` bool mask: ``half-response`` pads the second half of response 0 (a typical RL batch:
    responses of unequal length), ``fifth`` the last fifth of every response, ``none`` nothing."""
    import torch

    mask = torch.ones(B, T, dtype=torch.bool)
    if pad == "half-response":
        mask[0, T - T // 2 :] = False
    elif pad == "fifth":
        mask[:, T - T // 5 :] = False
    elif pad != "none":
        raise ValueError(f"pad must be one of {PADS}, got {pad!r}")
    return mask


def _make_inputs(args: argparse.Namespace, tiny: bool = False) -> tuple:
    """``(hidden, weight, bias, ids, advantages, old_logprobs, ref_logprobs, mask)``, built in place."""
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
    return h, w, b, ids, adv, old, ref, padding_mask(B, T, args.pad)


def _child(variant: str, args: argparse.Namespace) -> dict:
    step = _make_step(variant, args.smoke, args.beta, args.entropy_coeff, args.chunk_rows)
    return {"variant": variant, **measure_peak(step, lambda tiny: _make_inputs(args, tiny=tiny), 3)}


def _timing_child(variants: list[str], args: argparse.Namespace) -> dict:
    """Median forward + backward time of each variant, round-robin in one process (:func:`round_robin`)."""
    inputs = _make_inputs(args)
    steps = {}
    for v in variants:
        try:
            steps[v] = _make_step(v, args.smoke, args.beta, args.entropy_coeff, args.chunk_rows)
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
        "--pad",
        args.pad,
        "--entropy-coeff",
        str(args.entropy_coeff),
    ]
    if args.chunk_rows:
        argv += ["--chunk-rows", str(args.chunk_rows)]
    return run_child(__file__, variant, argv + (["--smoke"] if args.smoke else []))


def _ratios(rows: dict, ours_name: str = "rspo_linear") -> dict:
    """Each ratio of ``ours_name``'s row to another variant's, with its target (issue 28) and whether it is met."""
    ours = rows.get(ours_name, {})

    def ratio(key: str, other: str):
        o = rows.get(other, {})
        if ours.get(key) is None or not o.get(key):
            return None
        return ours[key] / o[key]

    got = {
        "memory_vs_unfused": ratio("extra_mib", "unfused"),
        "memory_vs_two_pass": ratio("extra_mib", "rspo_two_pass"),
        "time_vs_two_pass": ratio("median_s", "rspo_two_pass"),
        "memory_vs_liger": ratio("extra_mib", "liger"),
        "time_vs_liger": ratio("median_s", "liger"),
        "time_vs_unfused": ratio("median_s", "unfused"),
    }
    return {
        k: {"ratio": v, "target": TARGETS.get(k), "met": None if v is None or k not in TARGETS else v <= TARGETS[k]}
        for k, v in got.items()
    }


def markdown(report: dict) -> str:
    s = report["shape"]
    lines = [
        f"Fused-linear RSPO loss, forward + backward, CPU {s['dtype']}, {s['tokens']} tokens, H={s['hidden']}, "
        f"V={s['vocab']}, token-mean, bias, beta={report['loss']['beta']} with reference log-probs, "
        f"padding {report['loss']['pad']}, entropy_coeff={report['loss']['entropy_coeff']} "
        f"({report['date_utc'][:10]}, {report['machine']['cpus']} CPUs, load average "
        f"{report['machine']['loadavg'][0]:.1f}; median of "
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
        target = "-" if v["target"] is None else f"<= {v['target']:.3g}"
        lines.append(f"| {k.replace('_vs_', ' vs ')} | {ratio} | {target} | {v['met']} |")
    if "long_context" in report:
        lc = report["long_context"]
        lines += [
            "",
            f"Long context: extra {lc['extra_mib']:.1f} MiB, gradients {lc['gradients_mib']:.1f} MiB: "
            f"{lc['extra_mib'] - lc['gradients_mib']:.1f} MiB above them (target <= {LONG_SLACK_MIB:.0f}): {lc['met']}",
        ]
    return "\n".join(lines) + "\n"


PRESETS = {
    # (n, h, v, batch, pad, entropy_coeff, variants)
    "issue": (4096, 1024, 32000, 8, "half-response", 0.0, ",".join(VARIANTS)),
    "long": (65536, 256, 8192, 4, "fifth", 0.01, "rspo_linear,rspo_two_pass"),
}


def cpu_has_bf16() -> bool:
    """Whether the CPU has bfloat16 instructions (AVX512-BF16 or AMX-BF16; Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="issue", choices=sorted(PRESETS), help="issue (default) or long")
    p.add_argument("--suite", action="store_true", help="float32, bfloat16 (if the CPU has it) and long, one JSON")
    p.add_argument("--n", type=int, default=None, help="tokens B * T (default 4096; smoke 256)")
    p.add_argument("--h", type=int, default=None, help="hidden size (default 1024; smoke 64)")
    p.add_argument("--v", type=int, default=None, help="vocabulary size (default 32000; smoke 1000)")
    p.add_argument("--batch", type=int, default=None, help="B, T = n / B (default 8; smoke 2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 5; smoke 1)")
    p.add_argument("--beta", type=float, default=0.04, help="k3 KL weight, with reference log-probs (0: no KL)")
    p.add_argument("--pad", default=None, choices=PADS, help="padding mask (default half-response; long: fifth)")
    p.add_argument("--entropy-coeff", type=float, default=None, help="entropy bonus (default 0; long: 0.01)")
    p.add_argument("--chunk-rows", type=int, default=None, help="rspo_linear's chunk_rows (default: its own choice)")
    p.add_argument("--variants", default=None, help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds; not a measurement")
    p.add_argument("--out", default=None, help="JSON path (the markdown table goes next to it)")
    p.add_argument(
        "--frontier",
        default=None,
        help="comma-separated chunk_rows values: rspo_linear at each, against unfused and Liger (the "
        "memory/time trade-off of the block size; writes a .png next to the JSON when matplotlib is there)",
    )
    p.add_argument(
        "--replot",
        nargs="+",
        default=None,
        metavar="JSON",
        help="redraw the frontier figure from --frontier results files (one line per file) into --out (a .png)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what was not given from the preset (or the smoke shapes)."""
    n, h, v, batch, pad, coeff, variants = PRESETS[args.preset]
    args.n = args.n or (256 if args.smoke else n)
    args.h = args.h or (64 if args.smoke else h)
    args.v = args.v or (1000 if args.smoke else v)
    args.batch = args.batch or (2 if args.smoke else batch)
    args.pad = args.pad or pad
    args.entropy_coeff = coeff if args.entropy_coeff is None else args.entropy_coeff
    args.variants = args.variants or variants
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 5)
    return args


def _run_config(args: argparse.Namespace) -> dict:
    """Measure one configuration (one process per variant for memory, one for time) and report it."""
    import torch

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    rows = {v: _run_child(v, args) for v in variants}
    timing = _run_child("timing", args) if args.repeats else {}
    for v, r in rows.items():
        r.update(timing.get(v, {"median_s": None, "times_s": []}))
    now = _dt.datetime.now(_dt.timezone.utc)
    report = {
        "benchmark": "rspo_linear_loss CPU forward+backward: peak extra RSS (VmHWM, one process per variant) and time",
        "command": "python benchmarks/linear_memory.py " + " ".join(getattr(args, "argv", [])),
        "preset": args.preset,
        "date_utc": now.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "machine": {
            "host": platform.node(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "bf16_instructions": cpu_has_bf16(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "liger_kernel": _version("liger_kernel"),
        },
        "shape": {"tokens": args.n, "hidden": args.h, "vocab": args.v, "batch": args.batch, "dtype": args.dtype},
        "loss": {
            "loss_agg_mode": "token-mean",
            "beta": args.beta,
            "ref_logprobs": bool(args.beta),
            "bias": True,
            "pad": args.pad,
            "entropy_coeff": args.entropy_coeff,
            "chunk_rows": args.chunk_rows,
        },
        "allocator": {"MALLOC_MMAP_THRESHOLD_": "65536"},
        "repeats": args.repeats,
        "results": list(rows.values()),
        "ratios": _ratios(rows),
    }
    ours = rows.get("rspo_linear", {})
    if args.preset == "long" and "extra_mib" in ours:
        report["long_context"] = {
            "extra_mib": ours["extra_mib"],
            "gradients_mib": ours["gradients_mib"],
            "slack_mib": LONG_SLACK_MIB,
            "met": ours["extra_mib"] <= ours["gradients_mib"] + LONG_SLACK_MIB,
        }
    return report


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.child:
        _resolve(args)
        if args.n % args.batch:
            p.error("--n must be a multiple of --batch")
        if args.child == "timing":
            print(json.dumps(_timing_child([v.strip() for v in args.variants.split(",") if v.strip()], args)))
        else:
            print(json.dumps(_child(args.child, args)))
        return 0
    if args.variants is not None:
        unknown = sorted({v.strip() for v in args.variants.split(",") if v.strip()} - set(VARIANTS))
        if unknown:
            p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if args.replot:
        if not args.out or not args.out.endswith(".png"):
            p.error("--replot needs --out FIGURE.png")
        return _replot(args.replot, args.out)
    if args.frontier:
        return _frontier_main(args)
    configs = []
    if args.suite:
        for preset, dtype in (("issue", "float32"), ("issue", "bfloat16"), ("long", "float32")):
            if dtype == "bfloat16" and not cpu_has_bf16():
                print("bfloat16: skipped (no AVX512-BF16 / AMX-BF16 on this CPU)")
                continue
            sub = argparse.Namespace(**vars(args))
            sub.preset, sub.dtype = preset, dtype
            configs.append(_resolve(sub))
    else:
        configs.append(_resolve(args))
    for c in configs:
        if c.n % c.batch:
            p.error("--n must be a multiple of --batch")
    reports = [_run_config(c) for c in configs]
    table = "\n".join(markdown(r) for r in reports)
    print(table, end="")
    now = _dt.datetime.now(_dt.timezone.utc)
    if args.out:
        out = args.out
    else:
        folder = (
            tempfile.mkdtemp() if args.smoke else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        )
        name = "suite" if args.suite else ("long" if args.preset == "long" else "")
        out = os.path.join(folder, f"cpu-linear-{now:%Y-%m-%d}{'-' + name if name else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(reports[0] if len(reports) == 1 else {"suite": reports}, f, indent=2)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table)
    print(f"wrote {out}")
    failed = [r["variant"] for rep in reports for r in rep["results"] if "error" in r and r["variant"] != "liger"]
    return 1 if failed else 0


def frontier_points(report: dict) -> list[dict]:
    """One row per ``rspo_linear@rows`` result: its memory and time, and their ratios to unfused and Liger."""
    by = {r["variant"]: r for r in report["results"] if "error" not in r}
    points = []
    for name, r in by.items():
        if not name.startswith("rspo_linear@"):
            continue
        row = {"chunk_rows": int(name.split("@")[1]), "extra_mib": r["extra_mib"], "median_s": r["median_s"]}
        ratios = {k: v for k, v in _ratios(by, name).items() if k in TARGETS}
        row.update({k: v["ratio"] for k, v in ratios.items()})
        row["met"] = {k: v["met"] for k, v in ratios.items()}
        row["all_met"] = all(v is True for v in row["met"].values())
        points.append(row)
    return sorted(points, key=lambda p: p["chunk_rows"])


def frontier_markdown(report: dict) -> str:
    head = markdown(report).split("\n\n")[0]
    lines = [
        head.replace("Fused-linear RSPO loss", "Block-size frontier of the fused-linear RSPO loss", 1),
        "",
        "| chunk_rows | extra MiB | time (s) | memory vs unfused | memory vs Liger | time vs unfused | time vs Liger"
        " | all four targets |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for pt in report["frontier"]:
        lines.append(
            f"| {pt['chunk_rows']} | {pt['extra_mib']:.1f} | {f(pt['median_s'])} | {f(pt['memory_vs_unfused'])} | "
            f"{f(pt['memory_vs_liger'])} | {f(pt['time_vs_unfused'])} | {f(pt['time_vs_liger'])} | {pt['all_met']} |"
        )
    targets = ", ".join(f"{k.replace('_vs_', ' vs ')} <= {TARGETS[k]:g}" for k in TARGETS)
    lines += ["", f"Targets: {targets}."]
    return "\n".join(lines) + "\n"


def frontier_plot(reports: list[dict], path: str) -> bool:
    """Time vs unfused against memory vs Liger, one point per block size and one line per run, the
    targets as dashed lines and the region where both are met shaded. False without matplotlib;
    ValueError when no point has both ratios (Liger not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xmax, ymax, drawn = 0.6, 1.0, False
    for n, report in enumerate(reports):
        pts = [p for p in report["frontier"] if p["memory_vs_liger"] is not None and p["time_vs_unfused"] is not None]
        if not pts:
            continue
        xs, ys = [p["memory_vs_liger"] for p in pts], [p["time_vs_unfused"] for p in pts]
        when = report["date_utc"][:16].replace("T", " ")
        ax.plot(xs, ys, "o-", label=f"rspo_linear_loss, run of {when} UTC")
        if n == 0:
            for p, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(f"{p['chunk_rows']} rows", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        xmax, ymax, drawn = max(xmax, max(xs) * 1.1), max(ymax, max(ys) * 1.1), True
    if not drawn:
        plt.close(fig)
        raise ValueError("no frontier point has both a Liger and an unfused ratio (is liger-kernel installed?)")
    ax.axvline(TARGETS["memory_vs_liger"], color="tab:red", ls="--", lw=1, label="targets (issue 28)")
    ax.axhline(TARGETS["time_vs_unfused"], color="tab:red", ls="--", lw=1)
    ax.fill_between(
        [0, TARGETS["memory_vs_liger"]], 0, TARGETS["time_vs_unfused"], color="tab:green", alpha=0.12, label="both met"
    )
    ax.set_xlim(0, xmax)
    ax.set_ylim(0, ymax)
    ax.set_xlabel("extra memory / Liger's (lower is better)")
    ax.set_ylabel("time / unfused eager's (lower is better)")
    s = reports[0]["shape"]
    ax.set_title(f"Block size trade-off, CPU {s['dtype']}, N={s['tokens']}, H={s['hidden']}, V={s['vocab']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _replot(paths: list[str], out: str) -> int:
    """Redraw the frontier figure from results files (one line per file)."""
    reports = []
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        if "frontier" not in report:
            raise SystemExit(f"--replot: {path} has no 'frontier' (write one with --frontier)")
        reports.append(report)
    try:
        drawn = frontier_plot(reports, out)
    except ValueError as exc:
        raise SystemExit(f"--replot: {exc}") from None
    if not drawn:
        raise SystemExit("--replot: matplotlib is not installed (pip install 'rspo-kernels[plot]')")
    print(f"wrote {out}")
    return 0


def _frontier_main(args: argparse.Namespace) -> int:
    rows_list = [int(r) for r in args.frontier.split(",") if r.strip()]
    if not rows_list or min(rows_list) < 1:
        raise SystemExit("--frontier: give positive chunk_rows values, e.g. --frontier 64,128,256")
    _resolve(args)
    args.variants = ",".join([f"rspo_linear@{r}" for r in rows_list] + ["unfused", "liger"])
    report = _run_config(args)
    report["frontier"] = frontier_points(report)
    table = frontier_markdown(report)
    print(table, end="")
    now = _dt.datetime.now(_dt.timezone.utc)
    folder = tempfile.mkdtemp() if args.smoke else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    out = args.out or os.path.join(folder, f"cpu-linear-frontier-{now:%Y-%m-%d}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table)
    try:
        if frontier_plot([report], os.path.splitext(out)[0] + ".png"):
            print(f"wrote {os.path.splitext(out)[0]}.png")
    except ValueError as exc:
        print(f"no figure: {exc}")
    print(f"wrote {out}")
    return 1 if any("error" in r and r["variant"] != "liger" for r in report["results"]) else 0


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module.replace("_", "-"))
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
