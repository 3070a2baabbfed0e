"""GPU validation and benchmark of the fused RSPO loss, in one call on a lent GPU.

What it does, in order, at the real shape (bf16 logits, V = 151936, 8192 tokens by default):

1. **Correctness**: ``token_logprobs`` and ``rspo_loss`` (loss, statistics and logits gradient) against
   the unfused float32 reference on the same bf16 values.
2. **Copy bandwidth**: the device-to-device copy rate of a logits-sized buffer (bytes read +
   written per second), the roof the kernels are judged against.
3. **token_logprobs**: median time, achieved bandwidth (logits bytes read once / time) and its
   fraction of the copy rate, side by side with eager torch (and Liger's
   ``fused_selective_log_softmax`` when importable).
4. **rspo_loss forward + backward**: median time and peak extra memory (peak allocated minus the
   inputs minus the logits' gradient) for torch eager (the reference), ``torch.compile`` of the
   reference, rspo_kernels (with and without ``inplace_backward``) and Liger-Kernel's
   ``triton_grpo_loss`` when importable. All variants run in the same process on the same inputs,
   so the ratios are measured side by side.

5. **RSPO weights**: the Triton weight kernels against the torch specification (values), timed
   next to the public API, the specification and a bare sort / sum, at the CPU benchmark's cases.

Targets (H100, 8192 x 151936 bf16): token_logprobs >= 80% of the copy rate; rspo_loss fwd+bwd
>= 5x eager and >= 1x Liger; extra memory O(tokens). The script prints a table and writes
``benchmarks/results/<device>-<date>-gpu.json`` (or ``--out``).

``--smoke`` runs everything end to end on the CPU at tiny shapes (Triton kernels under
``TRITON_INTERPRET=1`` when Triton is installed, else the chunked torch path) and writes its JSON
to ``--out`` or a temporary file: a check that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU; checks the script runs")
    p.add_argument("--tokens", type=int, default=None, help="B * T (default 8192; smoke 32)")
    p.add_argument("--batch", type=int, default=None, help="B (default 16; smoke 2)")
    p.add_argument("--vocab", type=int, default=None, help="V (default 151936; smoke 512)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs (default 3; smoke 1)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument(
        "--sweep",
        default=None,
        help="also time rspo_kernels at launch configs BLOCKxWARPS, e.g. '2048x4,4096x8,8192x8,8192x16,16384x16'",
    )
    p.add_argument("--out", default=None, help="JSON path")
    a = p.parse_args(argv)
    a.tokens = a.tokens or (32 if a.smoke else 8192)
    a.batch = a.batch or (2 if a.smoke else 16)
    a.vocab = a.vocab or (512 if a.smoke else 151936)
    a.repeats = a.repeats or (2 if a.smoke else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 3)
    if a.tokens % a.batch:
        p.error("--tokens must be a multiple of --batch")
    return a


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])
if ARGS.smoke and __name__ == "__main__":
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        # Exercise the Triton kernels on the CPU: the interpreter must be on before triton is
        # imported, and CPU tensors dispatch to the chunked path unless the backend is forced.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("RSPO_KERNELS_BACKEND", "triton")

import torch  # noqa: E402

import rspo_kernels.loss as rk  # noqa: E402
from rspo_kernels._dispatch import implementation  # noqa: E402
from rspo_kernels.loss.reference import rspo_loss_reference, token_logprobs_reference  # noqa: E402

EPS_LOW, EPS_HIGH = 0.2, 0.28


# --------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, setup, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Times of ``fn(*setup())`` in ms; ``setup`` (fresh inputs) is outside the timed region."""
    out = []
    for i in range(warmup + repeats):
        args = setup()
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn(*args)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            out.append(ms)
        del args
    return out


def _peak_extra_mib(fn, setup, device: torch.device, grad_bytes: int) -> float | None:
    """Peak allocated during ``fn`` beyond what existed before it and the logits' gradient."""
    if device.type != "cuda":
        return None
    args = setup()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(*args)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del args
    return (peak - before - grad_bytes) / 2**20


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu-smoke"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _liger():
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception:  # not installed, or an incompatible version
        return None, None
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
    except Exception:
        fused_selective_log_softmax = None
    return triton_grpo_loss, fused_selective_log_softmax


def _versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "liger_kernel"):
        try:
            v[mod] = getattr(__import__(mod), "__version__", "unknown")
        except Exception:
            v[mod] = None
    return v


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> dict:
    """Max error against ``rtol`` times the reference's largest entry (errors of sums scale so)."""
    # float32 is exact enough for a bf16 / float32 comparison and halves the memory of float64.
    a, b = a.detach().float(), b.detach().float()
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    return {"max_abs_err": err, "ref_scale": scale, "rtol": rtol, "ok": err <= rtol * max(scale, 1e-30)}


# --------------------------------------------------------------------------- RSPO weights
def _weights_section(device: torch.device, smoke: bool, repeats: int, warmup: int) -> dict:
    """RSPO weights on the device: Triton kernels against the torch specification.

    For each case and objective: the largest difference between the kernels and the
    float64-internal specification (float32 rewards), relative to the largest weight, and median
    times of the kernels alone, the public API (``validate=False``, as in a training step), the
    specification, and the floor (a bare ``torch.sort`` for Max@k, a ``sum`` for Pass@k), all side
    by side in this process.
    """
    import numpy as np

    import rspo_kernels as rk_api
    from rspo_kernels.ops import weights as triton_weights
    from rspo_kernels.weights import estimators
    from rspo_kernels.weights._layout import to_groups

    g = torch.Generator(device=device).manual_seed(1)
    dense = [(8, 16, 4), (2, 300, 8)] if smoke else [(4096, 16, 4), (1024, 64, 8), (64, 1024, 16), (1, 2**20, 64)]
    n_ragged = 600 if smoke else 65536
    cases = [(f"B={b} n={n}", (b, n), k) for b, n, k in dense] + [(f"ragged N={n_ragged}", None, 8)]
    rows = []
    for label, shape, k in cases:
        if shape is None:
            ids = np.random.default_rng(0).integers(0, n_ragged // 16, n_ragged)
            base = torch.randn(n_ragged, device=device, generator=g)
            layout = {"group_size": None, "group_ids": ids}
        else:
            base = torch.randn(*shape, device=device, generator=g)
            layout = {"group_size": None, "group_ids": None}
        api_layout = {key: val for key, val in layout.items() if val is not None}
        for objective in ("pass@k", "max@k"):
            values = (base > 1.0).float() if objective == "pass@k" else base
            groups = to_groups(values, shape=values.shape, container="torch", **layout)[0]
            if int(groups.sizes.min()) < k:
                continue
            fast = triton_weights.grouped_weights(groups, k, objective, "rspo")
            ref = estimators.grouped_weights(groups, k, objective, "rspo")
            scale = ref.abs().max().clamp_min(1e-30)
            api = rk_api.pass_at_k_weights if objective == "pass@k" else rk_api.max_at_k_weights
            floor = (
                functools.partial(torch.sort, values, dim=-1)
                if objective == "max@k"
                else functools.partial(values.sum, -1)
            )
            variants = {
                "triton": functools.partial(triton_weights.grouped_weights, groups, k, objective, "rspo"),
                "api": functools.partial(api, values, k, validate=False, **api_layout),
                "spec": functools.partial(estimators.grouped_weights, groups, k, objective, "rspo"),
                "floor": floor,
            }
            times = {
                name: statistics.median(_time_ms(fn, lambda: (), device, repeats, warmup))
                for name, fn in variants.items()
            }
            rows.append(
                {
                    "case": label,
                    "objective": objective,
                    "k": k,
                    "max_err_over_max_weight": float((fast - ref).abs().max() / scale),
                    "median_ms": times,
                    "triton_over_floor": times["triton"] / times["floor"],
                    "spec_over_triton": times["spec"] / times["triton"],
                }
            )
    return {"rows": rows, "ok": all(r["max_err_over_max_weight"] < 1e-5 for r in rows)}


# --------------------------------------------------------------------------- fused-linear loss
def _linear_section(device: torch.device, smoke: bool, repeats: int, warmup: int) -> dict:
    """``rspo_linear_loss`` forward + backward from bf16 hidden states and ``lm_head``, side by side.

    Shape: 8192 tokens, H = 4096, V = 151936 (smoke: 64 x 32 x 512). Variants on the same inputs,
    the token-mean clipped loss with old log-probs: rspo_kernels (blocks of logits, recomputed in
    backward), unfused eager torch (``F.linear``, float32 ``log_softmax``, gather, loss, backward)
    and Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (``loss_type="bnpo"`` = our token-mean) when
    importable. Correctness: loss and the three gradients against the unfused float32 computation
    on the same bf16 values. Memory: peak allocated beyond the inputs, the gradients of hidden,
    weight and bias included (they are what every variant must produce).
    """
    import rspo_kernels as rk_api

    B, T, H, V = (2, 32, 32, 512) if smoke else (16, 512, 4096, 151936)
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(2)
    hidden = torch.randn(B, T, H, device=device, generator=g).to(dtype)
    weight = (torch.randn(V, H, device=device, generator=g) * H**-0.5).to(dtype)
    bias = (torch.randn(V, device=device, generator=g) * 0.1).to(dtype)
    ids = torch.randint(0, V, (B, T), device=device, generator=g)
    adv = torch.randn(B, device=device, generator=g)
    old = torch.randn(B, T, device=device, generator=g) * 0.3 - math.log(V)
    eps = dict(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)

    def leaves(dt=dtype):
        return [t.to(dt).clone().requires_grad_() for t in (hidden, weight, bias)]

    def ours(h, w, b):
        loss = rk_api.rspo_linear_loss(h, w, ids, adv, bias=b, old_logprobs=old, **eps)
        loss.backward()
        return loss

    def unfused(h, w, b):
        logp = torch.log_softmax(torch.nn.functional.linear(h, w, b).float(), dim=-1)
        logp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
        a = adv.unsqueeze(-1)
        loss = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH)).mean()
        loss.backward()
        return loss

    section: dict = {"shape": {"B": B, "T": T, "H": H, "V": V, "tokens": B * T, "dtype": str(dtype)}}
    # 1. correctness: bf16 fused against float32 unfused on the same values.
    fast, slow = leaves(), leaves(torch.float32)
    loss_f, loss_s = ours(*fast), unfused(*slow)
    section["correctness"] = {"loss": _close(loss_f, loss_s, 1e-5)}
    for name, a_, b_ in zip(("d_hidden", "d_weight", "d_bias"), fast, slow, strict=False):
        section["correctness"][name] = _close(a_.grad, b_.grad, 2.0**-7)  # one bf16 rounding (+ fp32 sums)
    section["correctness"]["ok"] = all(v["ok"] for v in section["correctness"].values())
    del fast, slow
    variants = {"rspo_kernels": ours, "torch_eager": unfused}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # compiled=True (its default) on the GPU; a CPU smoke run skips the compile time.
        crit = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo", compiled=not smoke, **eps)

        def liger(h, w, b):
            loss, _ = crit(h, w, ids, torch.ones_like(ids), adv, bias=b, old_per_token_logps=old)
            loss.backward()
            return loss

        variants["liger_fused_linear_grpo"] = liger
    except Exception as exc:  # not installed, or an incompatible version
        section["liger_error"] = f"{type(exc).__name__}: {exc}"
    grad_bytes = sum(t.numel() * t.element_size() for t in (hidden, weight, bias))
    rows = {}
    for name, fn in variants.items():
        try:
            times = _time_ms(fn, leaves, device, repeats, warmup)
            rows[name] = {
                "median_ms": statistics.median(times),
                "times_ms": times,
                "peak_extra_mib_incl_grads": (lambda e: None if e is None else e + grad_bytes / 2**20)(
                    _peak_extra_mib(fn, leaves, device, 0) if device.type == "cuda" else None
                ),
            }
        except Exception as exc:
            rows[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=3)}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _add_time_vs_ours(rows)
    section["fwd_bwd"] = rows
    return section


def _add_time_vs_ours(rows: dict) -> None:
    """Each timed row's median over the ``rspo_kernels`` row's (> 1: rspo_kernels is faster)."""
    ours_ms = rows.get("rspo_kernels", {}).get("median_ms")
    for r in rows.values():
        if ours_ms and "median_ms" in r:
            r["time_vs_rspo_kernels"] = r["median_ms"] / ours_ms


def _print_linear(section: dict) -> None:
    s = section["shape"]
    print(
        f"\nrspo_linear_loss fwd+bwd  tokens={s['tokens']} H={s['H']} V={s['V']} {s['dtype']}  "
        f"correctness: {'OK' if section['correctness']['ok'] else 'FAILED'}"
    )
    print(f"{'variant':<26}{'median ms':>11}{'x ours':>9}{'extra MiB':>11}")
    for name, r in section["fwd_bwd"].items():
        if "error" in r:
            print(f"{name:<26} error: {r['error'][:70]}")
            continue
        ex = "-" if r["peak_extra_mib_incl_grads"] is None else f"{r['peak_extra_mib_incl_grads']:.1f}"
        print(f"{name:<26}{r['median_ms']:>11.3f}{r.get('time_vs_rspo_kernels', math.nan):>9.2f}{ex:>11}")


# --------------------------------------------------------------------------- the benchmark
def _contract_section(logits_full, ids, weights, mask, kw) -> dict:
    """The loss-v2 regression cases at the real shape: loss scaling, retain_graph, grad_output, no_grad."""
    kw = dict(kw, return_stats=False)
    out: dict = {}
    x = logits_full.clone().requires_grad_()
    loss = rk.rspo_loss(x[:, :-1], ids, weights, mask, **kw)
    loss.backward(retain_graph=True)
    once = x.grad.float()
    loss.backward(retain_graph=True)
    out["retain_graph_twice_is_2x"] = _close(x.grad.float(), 2 * once, 2.0**-7)
    x.grad = None
    (loss * 65536.0).backward()
    out["loss_scaling_65536"] = _close(x.grad.float() / 65536.0, once, 2.0**-7)
    out["loss_scaling_finite"] = {"ok": bool(torch.isfinite(x.grad).all())}
    del x, loss, once
    y = logits_full.clone().requires_grad_()
    dev = logits_full.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    with torch.no_grad():
        rk.rspo_loss(y[:, :-1], ids, weights, mask, **kw)
    if dev.type == "cuda":
        extra = torch.cuda.max_memory_allocated(dev) - base
        out["no_grad_extra_bytes"] = int(extra)
        out["no_grad_o_tokens"] = {"ok": extra < logits_full.numel() * logits_full.element_size() / 16}
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def main() -> int:
    a = ARGS
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    if device.type != "cuda" and not a.smoke:
        print("no CUDA device: run on a GPU, or pass --smoke for a CPU check of the script", file=sys.stderr)
        return 2
    B, T, V = a.batch, a.tokens // a.batch, a.vocab
    N = B * T
    dtype = torch.bfloat16
    elt = torch.finfo(dtype).bits // 8
    g = torch.Generator(device=device).manual_seed(0)
    # Logits for T + 1 positions, as a model returns them; the loss reads the strided [:, :-1].
    logits_full = torch.empty(B, T + 1, V, device=device, dtype=dtype)
    logits_full.copy_(torch.randn(B, T + 1, V, device=device, generator=g, dtype=torch.float32).mul_(2.0))
    ids = torch.randint(0, V, (B, T), device=device, generator=g)
    weights = torch.randn(B, device=device, generator=g)
    mask = torch.rand(B, T, device=device, generator=g) > 0.1
    mask[0] = False  # one fully masked response
    with torch.no_grad():
        true_logp = token_logprobs_reference(logits_full[:, :-1], ids)
    old = true_logp + 0.3 * torch.randn(B, T, device=device, generator=g)
    ref = true_logp + 0.3 * torch.randn(B, T, device=device, generator=g)
    backend = implementation("token_logprobs", device.type, dtype)[0]
    report: dict = {
        "benchmark": "fused RSPO loss (benchmarks/gpu.py)",
        "smoke": a.smoke,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": {"host": platform.node(), "platform": platform.platform()},
        "versions": _versions(),
        "shape": {"B": B, "T": T, "V": V, "tokens": N, "dtype": str(dtype)},
        "backend": backend,
        "repeats": a.repeats,
        "warmup": a.warmup,
    }
    kw = dict(
        old_logprobs=old,
        ref_logprobs=ref,
        beta=0.04,
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        clip_ratio_c=3.0,
        return_stats=True,
    )

    # 1. correctness -------------------------------------------------------------------------
    correct: dict = {}
    with torch.no_grad():
        lp = rk.token_logprobs(logits_full[:, :-1], ids)
    correct["token_logprobs"] = _close(lp, true_logp, 1e-5)
    x = logits_full.clone().requires_grad_()
    loss, stats = rk.rspo_loss(x[:, :-1], ids, weights, mask, **kw)
    loss.backward()
    grad_fast = x.grad
    del x
    y = logits_full.float().requires_grad_()
    loss_r, stats_r = rspo_loss_reference(y[:, :-1], ids, weights, mask, **kw)
    loss_r.backward()
    correct["rspo_loss"] = _close(loss, loss_r, 1e-5)
    # bf16 unit roundoff; the CPU interpreter truncates instead of rounding: one ulp.
    correct["rspo_loss_grad_bf16"] = _close(grad_fast, y.grad, 2.0**-8 if device.type == "cuda" else 2.0**-7)
    correct["stats"] = {k: _close(stats[k], stats_r[k], 1e-5) for k in stats_r}
    del y, grad_fast, loss_r, loss
    correct["ok"] = all(v["ok"] for k, v in correct.items() if k != "stats") and all(
        v["ok"] for v in correct["stats"].values()
    )
    report["correctness"] = correct
    report["autograd_contract"] = _contract_section(logits_full, ids, weights, mask, kw)
    correct["ok"] = correct["ok"] and report["autograd_contract"]["ok"]
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. copy bandwidth ----------------------------------------------------------------------
    src = logits_full.reshape(-1)
    copy_ms = statistics.median(
        _time_ms(lambda s, d: d.copy_(s), lambda: (src, torch.empty_like(src)), device, a.repeats, a.warmup)
    )
    copy_bytes = 2 * src.numel() * elt  # read + write
    copy_gbs = copy_bytes / copy_ms / 1e6
    report["copy"] = {"median_ms": copy_ms, "bytes": copy_bytes, "GB_per_s": copy_gbs}

    # 3. token_logprobs ----------------------------------------------------------------------
    liger_loss, liger_logp = _liger()
    view = logits_full[:, :-1]
    logp_variants = {
        "rspo_kernels": lambda: rk.token_logprobs(view, ids),
        "torch_eager": lambda: token_logprobs_reference(view, ids),
    }
    if liger_logp is not None:
        logp_variants["liger"] = lambda: liger_logp(logits_full, ids, temperature=1.0)
    read_bytes = N * V * elt
    tl_rows = {}
    for name, fn in logp_variants.items():
        try:
            with torch.no_grad():
                times = _time_ms(fn, lambda: (), device, a.repeats, a.warmup)
                extra = _peak_extra_mib(fn, lambda: (), device, 0)
            med = statistics.median(times)
            tl_rows[name] = {
                "median_ms": med,
                "times_ms": times,
                "GB_per_s": read_bytes / med / 1e6,
                "fraction_of_copy": read_bytes / med / 1e6 / copy_gbs,
                "peak_extra_mib": extra,
            }
        except Exception as exc:  # a baseline may not run here; record why
            tl_rows[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=3)}
    report["token_logprobs"] = tl_rows

    # 4. rspo_loss forward + backward ----------------------------------------------------------
    kw_loss = dict(kw, return_stats=False)
    grad_bytes = B * (T + 1) * V * elt

    def fresh():
        return (logits_full.clone().requires_grad_(),)

    def ours(x, inplace=False):
        rk.rspo_loss(x[:, :-1], ids, weights, mask, inplace_backward=inplace, **kw_loss).backward()

    def eager(x):
        rspo_loss_reference(x[:, :-1], ids, weights, mask, **kw_loss).backward()

    variants = {"rspo_kernels": ours, "rspo_kernels_inplace": lambda x: ours(x, True), "torch_eager": eager}
    if not a.no_compile:
        compiled = torch.compile(lambda z: rspo_loss_reference(z[:, :-1], ids, weights, mask, **kw_loss))
        variants["torch_compile"] = lambda x: compiled(x).backward()
    if liger_loss is not None:
        maskf = mask.to(torch.float32)

        def liger(x):
            out = liger_loss(
                x,
                old,
                ref,
                ids,
                weights,
                mask.to(torch.int32),
                temperature=1.0,
                beta=0.04,
                eps_low=EPS_LOW,
                eps_high=EPS_HIGH,
                inplace=True,
            )
            per_tok = out[0] if isinstance(out, (tuple, list)) else out
            ((per_tok * maskf).sum() / maskf.sum().clamp(min=1)).backward()

        variants["liger_triton_grpo_loss"] = liger
    rows = {}
    for name, fn in variants.items():
        try:
            times = _time_ms(fn, fresh, device, a.repeats, a.warmup)
            g_bytes = 0 if name in ("rspo_kernels_inplace", "liger_triton_grpo_loss") else grad_bytes
            extra = _peak_extra_mib(fn, fresh, device, g_bytes)
            med = statistics.median(times)
            rows[name] = {
                "median_ms": med,
                "times_ms": times,
                "peak_extra_mib": extra,
                "GB_per_s_3_passes": 3 * N * V * elt / med / 1e6,
            }
        except Exception as exc:
            rows[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=3)}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _add_time_vs_ours(rows)
    report["rspo_loss_fwd_bwd"] = rows

    # 5. optional launch-config sweep (sets the kernels' override variable, then restores it) ------
    if a.sweep:
        from rspo_kernels.ops.token_logprobs import LAUNCH_ENV

        saved = os.environ.get(LAUNCH_ENV)
        sweep = {}
        try:
            for cfg in a.sweep.split(","):
                os.environ[LAUNCH_ENV] = cfg.strip()
                with torch.no_grad():
                    t_lp = statistics.median(
                        _time_ms(logp_variants["rspo_kernels"], lambda: (), device, a.repeats, a.warmup)
                    )
                t_loss = statistics.median(_time_ms(ours, fresh, device, a.repeats, a.warmup))
                sweep[cfg.strip()] = {
                    "token_logprobs_ms": t_lp,
                    "token_logprobs_fraction_of_copy": read_bytes / t_lp / 1e6 / copy_gbs,
                    "rspo_loss_fwd_bwd_ms": t_loss,
                }
        finally:
            if saved is None:
                os.environ.pop(LAUNCH_ENV, None)
            else:
                os.environ[LAUNCH_ENV] = saved
        report["launch_sweep"] = sweep

    # targets ------------------------------------------------------------------------------------
    def ratio(name):
        r = rows.get(name, {})
        return r.get("time_vs_rspo_kernels")

    tl_frac = tl_rows.get("rspo_kernels", {}).get("fraction_of_copy")
    targets = {
        "token_logprobs_fraction_of_copy>=0.8": None if tl_frac is None else tl_frac >= 0.8,
        "rspo_loss_speedup_vs_eager>=5": None if ratio("torch_eager") is None else ratio("torch_eager") >= 5,
        "rspo_loss_speedup_vs_liger>=1": None
        if ratio("liger_triton_grpo_loss") is None
        else ratio("liger_triton_grpo_loss") >= 1,
        "rspo_loss_extra_mib_per_1k_tokens": None
        if rows.get("rspo_kernels", {}).get("peak_extra_mib") is None
        else rows["rspo_kernels"]["peak_extra_mib"] / (N / 1024),
    }
    report["targets"] = targets
    report["weights"] = _weights_section(device, a.smoke, a.repeats, a.warmup)
    report["linear_loss"] = _linear_section(device, a.smoke, a.repeats, a.warmup)

    # print and write ------------------------------------------------------------------------------
    print(f"device {report['device']}  backend {backend}  shape B={B} T={T} V={V} {dtype}  (smoke={a.smoke})")
    print(
        f"correctness: {'OK' if correct['ok'] else 'FAILED'}  "
        + "  ".join(
            f"{k}: err {v['max_abs_err']:.2e}/scale {v['ref_scale']:.2e}"
            for k, v in correct.items()
            if isinstance(v, dict) and "max_abs_err" in v
        )
    )
    print(f"device copy: {copy_gbs:8.1f} GB/s")
    print(f"\n{'token_logprobs':<26}{'median ms':>11}{'GB/s':>9}{'of copy':>9}{'extra MiB':>11}")
    for name, r in tl_rows.items():
        if "error" in r:
            print(f"{name:<26} error: {r['error'][:70]}")
            continue
        ex = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        print(f"{name:<26}{r['median_ms']:>11.3f}{r['GB_per_s']:>9.1f}{r['fraction_of_copy']:>9.2f}{ex:>11}")
    print(f"\n{'rspo_loss fwd+bwd':<26}{'median ms':>11}{'x ours':>9}{'extra MiB':>11}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<26} error: {r['error'][:70]}")
            continue
        ex = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        rel = r.get("time_vs_rspo_kernels", math.nan)
        print(f"{name:<26}{r['median_ms']:>11.3f}{rel:>9.2f}{ex:>11}")
    if "launch_sweep" in report:
        print(f"\n{'launch BLOCKxWARPS':<26}{'logprobs ms':>12}{'of copy':>9}{'loss ms':>10}")
        for cfg, r in report["launch_sweep"].items():
            print(
                f"{cfg:<26}{r['token_logprobs_ms']:>12.3f}{r['token_logprobs_fraction_of_copy']:>9.2f}"
                f"{r['rspo_loss_fwd_bwd_ms']:>10.3f}"
            )
    heads = f"{'triton ms':>11}{'api ms':>9}{'spec ms':>9}{'floor ms':>10}{'vs floor':>9}{'rel err':>9}"
    print(f"\n{'RSPO weights':<30}{heads}")
    for r in report["weights"]["rows"]:
        t = r["median_ms"]
        print(
            f"{r['case'] + ' ' + r['objective']:<30}{t['triton']:>11.3f}{t['api']:>9.3f}{t['spec']:>9.3f}"
            f"{t['floor']:>10.3f}{r['triton_over_floor']:>9.2f}{r['max_err_over_max_weight']:>9.1e}"
        )
    _print_linear(report["linear_loss"])
    print("\ntargets: " + ", ".join(f"{k}={v}" for k, v in targets.items()))

    if a.out:
        out = a.out
    elif a.smoke:
        out = os.path.join(tempfile.gettempdir(), f"{_device_name(device)}-{_dt.date.today():%Y-%m-%d}-gpu.json")
    else:
        out = os.path.join(
            os.path.dirname(os.path.abspath(__file__)),
            "results",
            f"{_device_name(device)}-{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}-gpu.json",
        )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"wrote {out}")
    linear_ok = report["linear_loss"].get("correctness", {}).get("ok", True)
    return 0 if correct["ok"] and report["weights"]["ok"] and linear_ok else 1


if __name__ == "__main__":
    sys.exit(main())
