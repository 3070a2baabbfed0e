"""Memory and time of the trainers' log-prob + entropy paths against rspo_kernels' fused head, on CPU.

What each trainer computes per training step from the last hidden state ``(N, H)`` and ``lm_head``
``(V, H)``: per-token log-probs of the sampled tokens and entropies at the sampling temperature, then
backward through a policy-gradient loss with an entropy bonus
(``-(adv * logp).sum() - 0.01 * entropy.sum()``), into the hidden states and the head.

Variants, on the same inputs:

- ``logits``: the full-logits path of OpenRLHF's ``Actor.forward`` and verl's unfused path
  (``(N, V)`` float32 logits divided by the temperature, log-softmax + gather, entropy from the logits);
- ``verl_torch``: verl's own fused backend (``FusedLinearForPPO(impl_backend="torch")``,
  ``impl_backend=torch``);
- ``trl_chunked``: TRL's native path (``trl.kernels.ChunkedLogProbFunction``, which ``GRPOTrainer``
  and so ``RSPOTrainer`` use by default through ``add_fused_lm_head``), with its default chunk size;
- ``rspo``: :func:`rspo_kernels.token_logprobs_linear` (``impl_backend=rspo``,
  ``RSPO_FUSED_LOGPROBS=1``).

Method: as ``benchmarks/linear_memory.py`` (one fresh process per variant with
``MALLOC_MMAP_THRESHOLD_=65536``; a full-size warm-up, then the peak resident set size above the
inputs over one more forward + backward, gradients included). Time: one process, the variants
round-robin on the same inputs, median of ``--repeats``; with ``--repeats 0``, the time of the
measured step in each variant's own process instead (fewer runs on a busy machine).

Usage: ``python benchmarks/fused_trainers.py`` (4096 tokens, H = 896, V = 151936: Qwen2.5-0.5B's head,
float32) writes ``benchmarks/results/cpu-fused-trainers-<date>.json``; ``--smoke`` runs tiny shapes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.linear_memory import clear_grads, measure_peak, round_robin, run_child

VARIANTS = ("logits", "verl_torch", "trl_chunked", "rspo")
TEMPERATURE = 0.7
ENTROPY_COEFF = 0.01


def _logprobs_fn(variant: str):
    """``fn(hidden, weight, ids) -> (logp, entropy)`` of ``variant``."""
    import torch

    if variant == "logits":

        def fn(h, w, ids):
            logits = torch.nn.functional.linear(h, w).float() / TEMPERATURE
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            p = torch.softmax(logits, dim=-1)
            return logp, torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)

        return fn
    if variant == "verl_torch":
        from verl.utils.experimental.torch_functional import FusedLinearForPPO

        fused = FusedLinearForPPO(impl_backend="torch")
        return lambda h, w, ids: fused(h, w, ids, TEMPERATURE)
    if variant == "trl_chunked":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        def fn(h, w, ids):
            out = ChunkedLogProbFunction.apply(
                h, w, None, ids, TEMPERATURE, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("entropy",)
            )
            return out[0], out[1]

        return fn
    if variant == "rspo":
        import rspo_kernels as rk

        return lambda h, w, ids: rk.token_logprobs_linear(h, w, ids, temperature=TEMPERATURE, return_entropy=True)
    raise ValueError(variant)


def _make_step(variant: str):
    fn = _logprobs_fn(variant)

    def step(h, w, ids, adv):
        logp, entropy = fn(h, w, ids)
        loss = -(adv * logp).sum() - ENTROPY_COEFF * entropy.sum()
        loss.backward()
        return float(loss.detach())

    return step


def _make_inputs(args: argparse.Namespace, tiny: bool = False) -> tuple:
    import torch

    N, H, V = (8, 8, 16) if tiny else (args.n, args.h, args.v)
    g = torch.Generator().manual_seed(0)
    h = torch.empty(N, H).normal_(generator=g).requires_grad_()
    w = torch.empty(V, H).normal_(std=H**-0.5, generator=g).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=g)
    adv = torch.empty(N).normal_(generator=g)
    return h, w, ids, adv


def _memory_child(variant: str, args: argparse.Namespace) -> dict:
    step = _make_step(variant)
    return {"variant": variant, **measure_peak(step, lambda tiny: _make_inputs(args, tiny=tiny), 2)}


def _timing_child(variants: list[str], args: argparse.Namespace) -> dict:
    inputs = _make_inputs(args)
    steps = {v: _make_step(v) for v in variants}
    for step in steps.values():
        step(*inputs)
        clear_grads(inputs, 2)
    return round_robin(steps, inputs, args.repeats, 2)


def _run_child(what: str, args: argparse.Namespace) -> dict:
    argv = ["--variants", args.variants, "--n", str(args.n), "--h", str(args.h), "--v", str(args.v)]
    return run_child(__file__, what, argv + ["--repeats", str(args.repeats)])


def markdown(report: dict) -> str:
    s = report["shape"]
    runs = f"median of {report['repeats']} runs" if report["repeats"] else "one timed run per variant"
    lines = [
        f"Log-probs + entropy (with an entropy bonus), forward + backward, CPU float32, {s['tokens']} tokens, "
        f"H={s['hidden']}, V={s['vocab']} ({report['date_utc'][:10]}, {report['machine']['cpus']} CPUs, {runs}). "
        "Extra memory: peak RSS above the inputs, gradients included.",
        "",
        "| variant | extra MiB | vs rspo | time (s) |",
        "|---|---:|---:|---:|",
    ]
    ours = next((r for r in report["results"] if r.get("variant") == "rspo" and "extra_mib" in r), None)
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {' '.join(r['error'])[:60]} | | |")
            continue
        ratio = "-" if ours is None else f"{r['extra_mib'] / ours['extra_mib']:.2f}x"
        t = r.get("median_s") or r.get("step_s")
        t = "-" if t is None else f"{t:.2f}"
        lines.append(f"| {r['variant']} | {r['extra_mib']:.0f} | {ratio} | {t} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="tokens (default 4096; smoke 64)")
    p.add_argument("--h", type=int, default=None, help="hidden size (default 896; smoke 32)")
    p.add_argument("--v", type=int, default=None, help="vocabulary size (default 151936; smoke 1000)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 3; smoke 1)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds; not a measurement")
    p.add_argument("--out", default=None, help="JSON path (the markdown table goes next to it)")
    p.add_argument("--child", default=None, choices=VARIANTS + ("timing",), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.n = args.n or (64 if args.smoke else 4096)
    args.h = args.h or (32 if args.smoke else 896)
    args.v = args.v or (1000 if args.smoke else 151936)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 3)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.child == "timing":
        print(json.dumps(_timing_child(variants, args)))
        return 0
    if args.child:
        print(json.dumps(_memory_child(args.child, args)))
        return 0
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")

    import torch

    rows = {v: _run_child(v, args) for v in variants}
    timing = _run_child("timing", args) if args.repeats else {}
    for v, r in rows.items():
        r.update(timing.get(v, {"median_s": None, "times_s": []}))
    now = _dt.datetime.now(_dt.timezone.utc)
    report = {
        "benchmark": "trainer log-prob + entropy paths, CPU forward+backward: peak extra RSS and time",
        "date_utc": now.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "shape": {"tokens": args.n, "hidden": args.h, "vocab": args.v, "dtype": "float32"},
        "temperature": TEMPERATURE,
        "entropy_coeff": ENTROPY_COEFF,
        "allocator": {"MALLOC_MMAP_THRESHOLD_": "65536"},
        "repeats": args.repeats,
        "results": list(rows.values()),
    }
    if args.out:
        out = args.out
    elif args.smoke:
        out = os.path.join(tempfile.mkdtemp(), "fused-trainers-smoke.json")
    else:
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        out = os.path.join(here, f"cpu-fused-trainers-{now:%Y-%m-%d}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    table = markdown(report)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
