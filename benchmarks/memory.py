"""Peak extra CPU memory of ``rspo_loss`` forward + backward: chunked path against the unfused reference.

Method
------
Each variant runs in its own fresh Python process, so no allocator cache or earlier peak carries
over. The child

1. builds the inputs without temporaries (``torch.empty(...).normal_()``, so creating them does
   not raise the peak above their own size), and runs the variant once on a tiny problem so that
   code paths and thread pools are loaded;
2. reads its peak resident set size, ``getrusage(RUSAGE_SELF).ru_maxrss`` (the kernel's high-water
   mark of resident pages, ``VmHWM``): this is the baseline;
3. runs forward + backward once at full size and reads the peak again.

``extra = peak - baseline - gradient``, where ``gradient`` is the size of the logits' gradient
(the one buffer every implementation must produce; 0 for ``inplace_backward``, whose gradient
reuses the logits' memory). Large tensors are ``mmap``-ed by glibc and are resident only once
written, so the high-water mark counts exactly the pages the variant touched; it is not the noisy
"current RSS" that depends on when freed memory returns to the OS. Resolution: a few MiB of
allocator and library noise, against differences of hundreds of MiB.

Usage
-----
``python benchmarks/memory.py`` (N = 4096 tokens, V = 32000, float32) prints a table and writes
``benchmarks/results/cpu-<date>-memory.json``; ``--out`` picks another path.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys

VARIANTS = ("reference", "torch", "torch-inplace")
TARGET_RATIO = 1 / 8
MMAP_THRESHOLD = os.environ.get(
    "MALLOC_MMAP_THRESHOLD_", "65536"
)  # the issue's bound: fused extra <= reference extra / 8


def _child(variant: str, n_tokens: int, vocab: int, dtype_name: str, batch: int) -> dict:
    import time

    import torch

    from rspo_kernels import rspo_loss
    from rspo_kernels.loss.reference import rspo_loss_reference

    dtype = getattr(torch, dtype_name)
    fn = rspo_loss_reference if variant == "reference" else rspo_loss  # CPU tensors: the chunked path
    inplace = variant == "torch-inplace"

    def make(B: int, T: int, V: int):
        base = torch.empty(B * T * V, dtype=dtype).normal_()  # in place: no temporary
        base.requires_grad_()
        logits = base.view(B, T, V)  # a non-leaf, like an lm_head output
        ids = torch.randint(0, V, (B, T))
        weights = torch.empty(B).normal_()
        old = torch.empty(B, T).normal_().sub_(11.0)  # ratios spread on both sides of the clip range
        return base, logits, ids, weights, old

    def run(base, logits, ids, weights, old) -> None:
        loss = fn(logits, ids, weights, None, old_logprobs=old, loss_agg_mode="token-mean", inplace_backward=inplace)
        loss.backward()
        assert base.grad is not None
        base.grad = None

    run(*make(1, 2, 8))  # warm-up: load code paths and thread pools
    inputs = make(batch, n_tokens // batch, vocab)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    run(*inputs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(3):  # after the peak is read: timing runs cannot raise it
        inputs = make(batch, n_tokens // batch, vocab)
        t0 = time.perf_counter()
        run(*inputs)
        times.append(time.perf_counter() - t0)
    grad_bytes = 0 if inplace else n_tokens * vocab * torch.finfo(dtype).bits // 8
    return {
        "variant": variant,
        "baseline_mib": baseline / 1024,
        "peak_mib": peak / 1024,
        "gradient_mib": grad_bytes / 2**20,
        "extra_mib": (peak - baseline) / 1024 - grad_bytes / 2**20,
        "median_s": sorted(times)[1],
    }


def _run_child(variant: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--n",
        str(args.n),
        "--v",
        str(args.v),
        "--dtype",
        args.dtype,
        "--batch",
        str(args.batch),
    ]
    # A fixed mmap threshold makes glibc return freed chunks to the OS the same way every run.
    env = dict(os.environ, RSPO_KERNELS_BACKEND="", MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _previous(args: argparse.Namespace, rows: dict) -> dict[str, float]:
    """Extra MiB per variant from an earlier results file at the same shape (the old design's numbers)."""
    if not args.previous or not os.path.exists(args.previous):
        return {}
    with open(args.previous) as f:
        old = json.load(f)
    same = old.get("shape", {}) == {"tokens": args.n, "vocab": args.v, "batch": args.batch, "dtype": args.dtype}
    return {r["variant"]: r["extra_mib"] for r in old.get("results", [])} if same else {}


_PREVIOUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu-2026-11-23-memory.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="tokens (B * T)")
    p.add_argument("--v", type=int, default=32000, help="vocabulary size")
    p.add_argument("--batch", type=int, default=8, help="B (T = n / B)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu-<date>-memory.json)")
    p.add_argument("--previous", default=_PREVIOUS, help="earlier results JSON to print beside (old design)")
    p.add_argument("--child", default=None, choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n % args.batch:
        p.error("--n must be a multiple of --batch")
    if args.child:
        print(json.dumps(_child(args.child, args.n, args.v, args.dtype, args.batch)))
        return 0

    import torch

    rows = {v: _run_child(v, args) for v in VARIANTS}
    ref_extra = rows["reference"]["extra_mib"]
    for r in rows.values():
        r["ratio_to_reference"] = r["extra_mib"] / ref_extra if ref_extra > 0 else float("nan")
    ok = rows["torch"]["ratio_to_reference"] <= TARGET_RATIO
    print(
        f"rspo_loss forward+backward, N={args.n} V={args.v} {args.dtype}, peak extra memory beyond inputs and gradient"
    )
    previous = _previous(args, rows)
    print(
        f"{'variant':<15}{'extra MiB':>12}{'peak MiB':>12}{'gradient MiB':>14}{'vs reference':>14}{'time s':>9}"
        f"{'time vs ref':>13}{'prev extra MiB':>16}"
    )
    ref_time = rows["reference"]["median_s"]
    for r in rows.values():
        r["time_ratio_to_reference"] = r["median_s"] / ref_time
        prev = previous.get(r["variant"])
        print(
            f"{r['variant']:<15}{r['extra_mib']:>12.1f}{r['peak_mib']:>12.1f}{r['gradient_mib']:>14.1f}"
            f"{r['ratio_to_reference']:>14.4f}{r['median_s']:>9.3f}{r['time_ratio_to_reference']:>13.2f}"
            f"{'' if prev is None else f'{prev:.1f}':>16}"
        )
    print(f"target: chunked extra <= 1/8 of the reference's: {'met' if ok else 'NOT met'}")

    now = _dt.datetime.now(_dt.timezone.utc)
    result = {
        "benchmark": "rspo_loss CPU peak extra memory (ru_maxrss high-water mark, one process per variant)",
        "date_utc": now.isoformat(timespec="seconds"),
        "machine": {
            "host": platform.node(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "allocator": {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD},
        "shape": {"tokens": args.n, "vocab": args.v, "batch": args.batch, "dtype": args.dtype},
        "results": list(rows.values()),
        "previous_extra_mib": previous,
        "previous_source": args.previous,
        "target_ratio": TARGET_RATIO,
        "target_met": ok,
    }
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"cpu-{now:%Y-%m-%d}-memory.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
