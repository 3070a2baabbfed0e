"""Vocabulary-parallel (Megatron-style) heads on tp = 2, 3, 4 gloo processes, float64, against one process.

Each spawned process holds the rows ``[rank * V_local, (rank + 1) * V_local)`` of a vocabulary of
``V_REAL`` entries padded to a multiple of ``tp`` (the padded rows hold garbage on purpose: they must
be masked). It runs every case in :func:`_cases` and compares values and gradients with the float64
autograd of the unfused specification over the real vocabulary, computed in the same process: the
loss, the statistics, ``hidden``'s gradient, its slice of the weight's and bias's gradients (0 on
padded rows) and of the logits' gradient, to 1e-10. One spawn per tp size runs all cases; a
deadline kills the processes if a collective hangs.
"""

from __future__ import annotations

import datetime
import math
import socket
import time

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

V_REAL, H, B, T = 23, 6, 3, 5
DEADLINE_S = 240.0
TOL = 1e-10


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: torch.Tensor, b: torch.Tensor, what: str, errors: list[str]) -> None:
    a, b = a.detach().double(), b.detach().double()
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1.0)
    if a.shape != b.shape:
        errors.append(f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
        return
    err = float((a - b).abs().max()) if a.numel() else 0.0
    if not err <= TOL * scale:
        errors.append(f"{what}: max error {err:.3e} (scale {scale:.3e})")


def _inputs(tp: int, seed: int = 0) -> dict:
    """The same global inputs on every rank (seeded), with a padded, garbage-filled vocabulary."""
    from rspo_kernels.loss.reference import token_logprobs_reference

    g = torch.Generator().manual_seed(seed)
    v_local = math.ceil(V_REAL / tp)
    v_pad = v_local * tp
    weight = torch.randn(v_pad, H, generator=g, dtype=torch.float64)
    weight[V_REAL:] = 50.0  # garbage rows: they would dominate the softmax if not masked
    bias = torch.randn(v_pad, generator=g, dtype=torch.float64) * 0.3
    bias[V_REAL:] = 7.0
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V_REAL, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[1] = False
    mask[0, 0] = True
    ids = ids.masked_fill(~mask, -100)
    weights = torch.randn(B, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logits = hidden @ weight[:V_REAL].T + bias[:V_REAL]
        true = token_logprobs_reference(logits, ids.clamp(min=0), temperature=0.7)
    old = true + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = true + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return dict(
        v_local=v_local, weight=weight, bias=bias, hidden=hidden, ids=ids, mask=mask, weights=weights, old=old, ref=ref
    )


LOSS_KW = dict(temperature=0.7, epsilon_high=0.28, clip_ratio_c=3.0, beta=0.04, entropy_coeff=0.11)


def _reference_loss(x: dict, mode: str, vocab: int) -> tuple:
    """float64 autograd of the unfused specification over the first ``vocab`` rows."""
    from rspo_kernels.loss.reference import rspo_loss_reference

    h = x["hidden"].clone().requires_grad_()
    w = x["weight"][:vocab].clone().requires_grad_()
    b = x["bias"][:vocab].clone().requires_grad_()
    logits = (h @ w.T + b).detach().requires_grad_()
    loss, stats = rspo_loss_reference(
        logits,
        x["ids"],
        x["weights"],
        x["mask"],
        old_logprobs=x["old"],
        ref_logprobs=x["ref"],
        loss_agg_mode=mode,
        return_stats=True,
        **LOSS_KW,
    )
    (g_logits,) = torch.autograd.grad(loss, logits)
    g_h, g_w, g_b = torch.autograd.grad(h @ w.T + b, (h, w, b), g_logits)
    return loss, stats, g_logits, g_h, g_w, g_b


def _pad_rows(g: torch.Tensor, v_pad: int) -> torch.Tensor:
    out = torch.zeros((v_pad, *g.shape[1:]), dtype=g.dtype)
    out[: g.shape[0]] = g
    return out


def _run_rank(rank: int, tp: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=tp,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        errors: list[str] = []
        _cases(rank, tp, dist.group.WORLD, errors)
        if errors:
            raise AssertionError(f"rank {rank} of tp={tp}:\n" + "\n".join(errors))
    finally:
        dist.destroy_process_group()


def _cases(rank: int, tp: int, group, errors: list[str]) -> None:
    import rspo_kernels as rk
    from rspo_kernels.loss.options import LOSS_AGG_MODES
    from rspo_kernels.loss.reference import token_logprobs_reference

    x = _inputs(tp)
    v_local = x["v_local"]
    v_pad = v_local * tp
    start = rank * v_local
    rows = slice(start, start + v_local)
    blocks = dict(chunk_rows=4, vocab_block=4)
    # Vocabularies to test: the padded one, and (tp > 1) one whose last rank holds padding only.
    vocabs = [V_REAL] + ([v_local * (tp - 1)] if tp > 1 and v_local * (tp - 1) < V_REAL else [])
    for vocab in vocabs:
        y = dict(x, ids=x["ids"].clamp(max=vocab - 1).masked_fill(~x["mask"], -100))
        for mode in LOSS_AGG_MODES:
            loss_r, stats_r, gl_r, gh_r, gw_r, gb_r = _reference_loss(y, mode, vocab)
            tag = f"vocab={vocab} {mode}"
            # Fused-linear path, tensor parallel.
            h = y["hidden"].clone().requires_grad_()
            w = y["weight"][rows].clone().requires_grad_()
            b = y["bias"][rows].clone().requires_grad_()
            loss, stats = rk.rspo_linear_loss(
                h,
                w,
                y["ids"],
                y["weights"],
                y["mask"],
                bias=b,
                old_logprobs=y["old"],
                ref_logprobs=y["ref"],
                loss_agg_mode=mode,
                return_stats=True,
                tp_group=group,
                vocab_start=start,
                vocab_size=vocab,
                **blocks,
                **LOSS_KW,
            )
            loss.backward()
            _close(loss, loss_r, f"linear loss {tag}", errors)
            for k in stats_r:
                _close(stats[k], stats_r[k], f"linear stat {k} {tag}", errors)
            _close(h.grad, gh_r, f"linear d hidden {tag}", errors)
            _close(w.grad, _pad_rows(gw_r, v_pad)[rows], f"linear d weight {tag}", errors)
            _close(b.grad, _pad_rows(gb_r, v_pad)[rows], f"linear d bias {tag}", errors)
            # Logits path: this rank's slice of the padded logits.
            full = y["hidden"] @ y["weight"].T + y["bias"]
            z = full[..., rows].clone().requires_grad_()
            inplace = mode == "token-mean"  # the gradient overwrites a non-leaf slice: the same values
            loss_z = rk.rspo_loss(
                z * 1.0 if inplace else z,
                y["ids"],
                y["weights"],
                y["mask"],
                old_logprobs=y["old"],
                ref_logprobs=y["ref"],
                loss_agg_mode=mode,
                tp_group=group,
                vocab_start=start,
                vocab_size=vocab,
                inplace_backward=inplace,
                **LOSS_KW,
            )
            (gz,) = torch.autograd.grad(loss_z, z)
            _close(loss_z, loss_r, f"logits loss {tag}", errors)
            gl_pad = torch.zeros(B, T, v_pad, dtype=torch.float64)
            gl_pad[..., :vocab] = gl_r
            _close(gz, gl_pad[..., rows], f"logits grad {tag}", errors)

    # Other policy losses (sequence-level, batch-level, rollout weights): the same per-token algebra
    # on the same log-probs, so the vocabulary-parallel loss and slice gradient equal single-process ones.
    from rspo_kernels.loss.reference import rspo_loss_reference

    is_w = 0.5 + torch.rand(B, T, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for name, opts in (("gspo", None), ("clip_cov", {"clip_cov_ratio": 0.3, "clip_cov_lb": 0.0}), ("vespo", None)):
        kw = dict(
            old_logprobs=x["old"],
            ref_logprobs=x["ref"],
            policy_loss=name,
            policy_loss_options=opts,
            rollout_is_weights=is_w,
            kl_penalty="low_var_kl",
            **LOSS_KW,
        )
        full = (x["hidden"] @ x["weight"][:V_REAL].T + x["bias"][:V_REAL]).requires_grad_()
        loss_r = rspo_loss_reference(
            full, x["ids"], x["weights"], x["mask"], generator=torch.Generator().manual_seed(3), **kw
        )
        (g_r,) = torch.autograd.grad(loss_r, full)
        z = (x["hidden"] @ x["weight"].T + x["bias"])[..., rows].clone().requires_grad_()
        loss_z = rk.rspo_loss(
            z,
            x["ids"],
            x["weights"],
            x["mask"],
            tp_group=group,
            vocab_start=start,
            vocab_size=V_REAL,
            generator=torch.Generator().manual_seed(3),
            **kw,
        )
        (gz,) = torch.autograd.grad(loss_z, z)
        _close(loss_z, loss_r, f"{name} loss", errors)
        g_pad = torch.zeros(B, T, v_pad, dtype=torch.float64)
        g_pad[..., :V_REAL] = g_r
        _close(gz, g_pad[..., rows], f"{name} logits grad", errors)

    # Both outputs of the log-prob functions, with random upstream gradients, packed rows.
    g = torch.Generator().manual_seed(5)
    up_lp, up_h = torch.randn(B * T, generator=g, dtype=torch.float64), torch.randn(B * T, generator=g).double()
    ids = x["ids"].clamp(min=0).reshape(-1)
    hp, wp, bp = (
        t.clone().requires_grad_() for t in (x["hidden"].reshape(B * T, H), x["weight"][:V_REAL], x["bias"][:V_REAL])
    )
    lp_r, ent_r = token_logprobs_reference(hp @ wp.T + bp, ids, temperature=0.7, return_entropy=True)
    want = torch.autograd.grad((lp_r * up_lp + ent_r * up_h).sum(), (hp, wp, bp))
    h = x["hidden"].reshape(B * T, H).clone().requires_grad_()
    w = x["weight"][rows].clone().requires_grad_()
    b = x["bias"][rows].clone().requires_grad_()
    lp, ent = rk.token_logprobs_linear(
        h, w, ids, bias=b, temperature=0.7, return_entropy=True, tp_group=group, vocab_start=start, vocab_size=V_REAL
    )
    got = torch.autograd.grad((lp * up_lp + ent * up_h).sum(), (h, w, b))
    _close(lp, lp_r, "token_logprobs_linear logp", errors)
    _close(ent, ent_r, "token_logprobs_linear entropy", errors)
    _close(got[0], want[0], "token_logprobs_linear d hidden", errors)
    _close(got[1], _pad_rows(want[1], v_pad)[rows], "token_logprobs_linear d weight", errors)
    _close(got[2], _pad_rows(want[2], v_pad)[rows], "token_logprobs_linear d bias", errors)
    full = x["hidden"].reshape(B * T, H) @ x["weight"].T + x["bias"]
    zr = full[:, :V_REAL].clone().requires_grad_()
    lp_r, ent_r = token_logprobs_reference(zr, ids, temperature=0.7, return_entropy=True)
    (gz_r,) = torch.autograd.grad((lp_r * up_lp + ent_r * up_h).sum(), zr)
    z = full[:, rows].clone().requires_grad_()
    lp, ent = rk.token_logprobs(
        z, ids, temperature=0.7, return_entropy=True, tp_group=group, vocab_start=start, vocab_size=V_REAL
    )
    (gz,) = torch.autograd.grad((lp * up_lp + ent * up_h).sum(), z)
    _close(lp, lp_r, "token_logprobs logp", errors)
    _close(ent, ent_r, "token_logprobs entropy", errors)
    gz_pad = torch.zeros(B * T, v_pad, dtype=torch.float64)
    gz_pad[:, :V_REAL] = gz_r
    _close(gz, gz_pad[:, rows], "token_logprobs d logits", errors)

    if tp == 2:
        # Sequence parallelism: hidden's gradient comes back unreduced; the caller's reduce-scatter
        # (here an all-reduce, then this rank's half of the sequence) completes it.
        h = x["hidden"].clone().requires_grad_()
        w = x["weight"][rows].clone().requires_grad_()
        loss = rk.rspo_linear_loss(
            h,
            w,
            x["ids"],
            x["weights"],
            x["mask"],
            old_logprobs=x["old"],
            ref_logprobs=x["ref"],
            tp_group=group,
            vocab_start=start,
            vocab_size=V_REAL,
            sequence_parallel=True,
            **LOSS_KW,
        )
        loss.backward()
        y = dict(x, bias=torch.zeros(v_pad, dtype=torch.float64))
        _, _, _, gh_r, gw_r, _ = _reference_loss(y, "token-mean", V_REAL)
        partial = h.grad.clone()
        summed = h.grad.clone()
        dist.all_reduce(summed, group=group)
        _close(summed, gh_r, "sequence-parallel sum of d hidden", errors)
        if float((partial - gh_r).abs().max()) < 1e-6:
            errors.append("sequence_parallel=True returned an already reduced d hidden")
        _close(w.grad, _pad_rows(gw_r, v_pad)[rows], "sequence-parallel d weight", errors)


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_vocab_parallel_matches_single_process(tp):
    import torch.multiprocessing as mp

    ctx = mp.spawn(_run_rank, args=(tp, _free_port()), nprocs=tp, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"tp={tp}: the processes did not finish within {DEADLINE_S:.0f} s (a hung collective?)")


def test_argument_errors():
    import rspo_kernels as rk

    h, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="vocab_start=5 needs tp_group"):
        rk.token_logprobs_linear(h, w, ids, vocab_start=5)
    with pytest.raises(ValueError, match="sequence_parallel=True needs tp_group"):
        rk.rspo_linear_loss(h, w, ids, torch.ones(2), sequence_parallel=True)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        rk.token_logprobs(torch.randn(2, 3, 5), ids, vocab_size=4.0)
    with pytest.raises(ValueError, match="target_ids must lie in \\[0, V=3\\)"):
        rk.token_logprobs(torch.randn(2, 3, 5), ids + 3, vocab_size=3)
    with pytest.raises(RuntimeError, match="not initialised"):
        rk.token_logprobs(torch.randn(2, 3, 5), ids, tp_group=object())


def test_padded_vocabulary_single_process(monkeypatch):
    """``vocab_size`` without a group masks the padded rows; forcing Triton or the reference raises."""
    import rspo_kernels as rk
    from rspo_kernels.loss.reference import token_logprobs_reference

    x = _inputs(1)
    z = x["hidden"] @ x["weight"].T + x["bias"]  # (B, T, 23): no padding at tp = 1
    z = torch.cat([z, torch.full((B, T, 3), 40.0, dtype=torch.float64)], dim=-1).requires_grad_()
    ids = x["ids"].clamp(min=0)
    lp, ent = rk.token_logprobs(z, ids, return_entropy=True, vocab_size=V_REAL)
    lp_r, ent_r = token_logprobs_reference(z[..., :V_REAL], ids, return_entropy=True)
    errors: list[str] = []
    _close(lp, lp_r, "logp", errors)
    _close(ent, ent_r, "entropy", errors)
    (g,) = torch.autograd.grad((lp + ent).sum(), z)
    (g_r,) = torch.autograd.grad((lp_r + ent_r).sum(), z)
    _close(g, g_r, "grad", errors)
    assert not errors, errors
    for forced in ("triton", "reference"):
        monkeypatch.setenv("RSPO_KERNELS_BACKEND", forced)
        with pytest.raises(NotImplementedError, match="tp_group"):
            rk.token_logprobs(z, ids, vocab_size=V_REAL)
