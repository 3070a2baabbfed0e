"""The chunked CPU path and the public API on CPU, against the unfused reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_loss_reference import assert_matches, loss_kwargs, make_case

import rspo_kernels.loss as L
from rspo_kernels._chunked_loss import rspo_loss_torch, token_logprobs_torch
from rspo_kernels._dispatch import BACKEND_ENV, implementation
from rspo_kernels.loss_reference import LOSS_AGG_MODES, rspo_loss_reference, token_logprobs_reference


def _ref_loss_and_grad(case, mode, **kw):
    x = case["logits"].clone().requires_grad_()
    loss, stats = rspo_loss_reference(
        x, case["target_ids"], case["weights"], case["mask"], loss_agg_mode=mode, return_stats=True, **kw
    )
    (g,) = torch.autograd.grad(loss, x)
    return loss, g, stats


def _fast_loss_and_grad(fn, case, mode, logits=None, **kw):
    x = (case["logits"] if logits is None else logits).clone().requires_grad_()
    loss, stats = fn(x, case["target_ids"], case["weights"], case["mask"], loss_agg_mode=mode, return_stats=True, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss, g, stats


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("with_old,with_ref", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("per_token", [False, True])
def test_chunked_matches_reference(mode, with_old, with_ref, per_token):
    case = make_case(B=4, T=5, V=37, per_token=per_token, with_old=with_old, with_ref=with_ref)
    kw = loss_kwargs(case)
    loss_r, g_r, st_r = _ref_loss_and_grad(case, mode, **kw)
    loss_c, g_c, st_c = _fast_loss_and_grad(rspo_loss_torch, case, mode, chunk_rows=3, **kw)
    assert_matches(loss_c, loss_r, torch.float32, f"loss {mode}")
    assert_matches(g_c, g_r, torch.float32, f"grad {mode}")
    assert set(st_c) == set(st_r)
    for k in st_r:
        assert_matches(st_c[k], st_r[k], torch.float32, k)
    assert torch.all(g_c[1] == 0)  # the all-masked row
    if with_old:
        assert 0.0 < st_r["clip_fraction"].item() < 1.0


def test_strided_logits_and_inplace_backward():
    case = make_case(B=3, T=4, V=29)
    padded = torch.cat([case["logits"], torch.randn(3, 1, 29)], dim=1)  # (B, T+1, V): slice is not a view of rows
    kw = loss_kwargs(case)
    loss_r, g_r, _ = _ref_loss_and_grad(case, "seq-mean-token-mean", **kw)
    x = padded.clone().requires_grad_()
    loss = rspo_loss_torch(
        x[:, :-1],
        case["target_ids"],
        case["weights"],
        case["mask"],
        loss_agg_mode="seq-mean-token-mean",
        chunk_rows=2,
        **kw,
    )
    (g,) = torch.autograd.grad(loss, x)
    assert_matches(loss, loss_r, torch.float32)
    assert_matches(g[:, :-1], g_r, torch.float32)
    assert torch.all(g[:, -1] == 0)

    y = case["logits"].clone()  # not a leaf that requires grad: overwrite is allowed
    y.requires_grad_()
    z = y * 1.0  # a non-leaf, like an lm_head output
    loss = rspo_loss_torch(
        z,
        case["target_ids"],
        case["weights"],
        case["mask"],
        loss_agg_mode="seq-mean-token-mean",
        inplace_backward=True,
        **kw,
    )
    assert_matches(loss, loss_r, torch.float32)
    loss.backward()
    assert_matches(y.grad, g_r, torch.float32)
    assert_matches(z.detach(), g_r, torch.float32)  # the gradient lives in the logits' memory


def test_grad_output_scaling_and_all_masked_batch():
    case = make_case(B=2, T=3, V=11)
    kw = loss_kwargs(case)
    x = case["logits"].clone().requires_grad_()
    (3.0 * rspo_loss_torch(x, case["target_ids"], case["weights"], case["mask"], **kw)).backward()
    _, g_r, _ = _ref_loss_and_grad(case, "token-mean", **kw)
    assert_matches(x.grad, 3.0 * g_r, torch.float32)

    x = case["logits"].clone().requires_grad_()
    loss, stats = rspo_loss_torch(x, case["target_ids"], case["weights"], torch.zeros(2, 3), return_stats=True, **kw)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    assert all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_within_half_accuracy(dtype):
    case = make_case(B=3, T=4, V=41, dtype=dtype)
    kw = loss_kwargs(case)
    ref_case = dict(case, logits=case["logits"].float())  # the same values, upcast
    loss_r, g_r, _ = _ref_loss_and_grad(ref_case, "token-mean", **kw)
    loss_c, g_c, _ = _fast_loss_and_grad(rspo_loss_torch, case, "token-mean", **kw)
    assert loss_c.dtype == torch.float32 and g_c.dtype == dtype
    assert_matches(loss_c, loss_r, torch.float32)  # float32 arithmetic on the same inputs
    assert_matches(g_c, g_r, dtype)  # only the stored gradient is rounded


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_gradcheck_float64(mode):
    case = make_case(B=3, T=3, V=6, dtype=torch.float64)
    kw = loss_kwargs(case)
    x = case["logits"].clone().requires_grad_()
    fn = lambda z: rspo_loss_torch(  # noqa: E731
        z, case["target_ids"], case["weights"], case["mask"], loss_agg_mode=mode, chunk_rows=2, **kw
    )
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_token_logprobs_chunked_and_public():
    case = make_case(B=3, T=7, V=50, masked=False)
    lr, er = token_logprobs_reference(case["logits"], case["target_ids"], temperature=0.7, return_entropy=True)
    lc, ec = token_logprobs_torch(
        case["logits"], case["target_ids"], temperature=0.7, return_entropy=True, chunk_rows=4
    )
    assert_matches(lc, lr, torch.float32)
    assert_matches(ec, er, torch.float32)
    lp = L.token_logprobs(case["logits"].reshape(21, 50), case["target_ids"].reshape(21), temperature=0.7)
    assert lp.shape == (21,) and lp.dtype == torch.float32 and not lp.requires_grad
    assert_matches(lp, lr.reshape(21), torch.float32)
    bf = case["logits"].bfloat16()
    assert_matches(
        L.token_logprobs(bf, case["target_ids"]),
        token_logprobs_reference(bf.float(), case["target_ids"]),
        torch.float32,
    )


@settings(max_examples=8)
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 6),
    V=st.integers(1, 40),
    chunk=st.integers(1, 7),
    mode=st.sampled_from(LOSS_AGG_MODES),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_reference_any_shape(B, T, V, chunk, mode, seed):
    case = make_case(B=B, T=T, V=V, seed=seed)
    kw = loss_kwargs(case)
    loss_r, g_r, _ = _ref_loss_and_grad(case, mode, **kw)
    loss_c, g_c, _ = _fast_loss_and_grad(rspo_loss_torch, case, mode, chunk_rows=chunk, **kw)
    assert_matches(loss_c, loss_r, torch.float32)
    assert_matches(g_c, g_r, torch.float32)


# --------------------------------------------------------------------------- public API on CPU
def test_public_rspo_loss_dispatches_to_chunked_path(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert implementation("rspo_loss", "cpu")[0] == "torch"
    assert implementation("token_logprobs", "cpu")[0] == "torch"
    case = make_case()
    kw = loss_kwargs(case)
    loss = L.rspo_loss(case["logits"].requires_grad_(), case["target_ids"], case["weights"], case["mask"], **kw)
    assert "ChunkedRSPOLoss" in type(loss.grad_fn).__name__
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert implementation("rspo_loss", "cpu")[0] == "reference"
    loss_r = L.rspo_loss(case["logits"], case["target_ids"], case["weights"], case["mask"], inplace_backward=True, **kw)
    assert_matches(loss, loss_r, torch.float32)


@pytest.mark.parametrize(
    "change, err, match",
    [
        (dict(logits=torch.zeros(2, 3)), ValueError, r"logits must be \(B, T, V\), got shape \(2, 3\).*logits\[None\]"),
        (dict(logits=torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError, "logits must be float16"),
        (dict(target_ids=torch.zeros(2, 3)), TypeError, "target_ids must be an integer tensor.*long"),
        (dict(target_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"target_ids must have shape .*\(2, 3\)"),
        (dict(target_ids=torch.full((2, 3), 4)), ValueError, r"target_ids must lie in \[0, V=4\)"),
        (
            dict(weights=torch.zeros(3)),
            ValueError,
            r"weights must have shape \(2,\) per response or \(2, 3\) per token",
        ),
        (dict(weights=torch.zeros(2, dtype=torch.long)), TypeError, "weights must be a floating tensor"),
        (dict(mask=torch.ones(3, 2)), ValueError, r"mask must have shape \(2, 3\)"),
        (dict(old_logprobs=torch.zeros(2, 2)), ValueError, r"old_logprobs must have shape \(2, 3\)"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(epsilon_low=1.0), ValueError, r"epsilon_low must lie in \[0, 1\)"),
        (dict(epsilon_high=-0.1), ValueError, "epsilon_high must be >= 0"),
        (dict(beta=0.1), ValueError, "beta=0.1 > 0 needs ref_logprobs"),
        (dict(loss_agg_mode="seq-mean"), ValueError, "loss_agg_mode='seq-mean' is not one of"),
        (dict(max_response_length=0), ValueError, "max_response_length must be >= 1"),
        (dict(max_response_length=2.5), TypeError, "max_response_length must be an int"),
    ],
)
def test_public_rspo_loss_errors(change, err, match):
    args = dict(logits=torch.zeros(2, 3, 4), target_ids=torch.zeros(2, 3, dtype=torch.long), weights=torch.ones(2))
    args.update(change)
    with pytest.raises(err, match=match):
        L.rspo_loss(**args)


def test_padding_ids_allowed_under_mask_and_token_logprobs_errors():
    ids = torch.tensor([[0, -100]])
    L.rspo_loss(torch.zeros(1, 2, 3), ids, torch.ones(1), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, V=3\).*-100"):
        L.token_logprobs(torch.zeros(1, 2, 3), ids)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        L.token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=-1.0)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        L.token_logprobs([[0.0]], torch.zeros(1, dtype=torch.long))


# --------------------------------------------------------------------------- RSPOLoss
def test_rspo_loss_module_matches_functional(monkeypatch):
    from rspo_kernels import api

    seen = {}
    real = api.pass_at_k_weights

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "pass_at_k_weights", spy)
    case = make_case(B=8, T=4, V=13, with_ref=False)
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1])
    crit = L.RSPOLoss("pass@k", k=2, loss_agg_mode="seq-mean-token-mean", temperature=case["temperature"])
    loss = crit(
        case["logits"], case["target_ids"], rewards, group_size=4, mask=case["mask"], old_logprobs=case["old_logprobs"]
    )
    assert seen["validate"] is False
    w = real(rewards, 2, group_size=4)
    expected = rspo_loss_reference(
        case["logits"],
        case["target_ids"],
        w,
        case["mask"],
        old_logprobs=case["old_logprobs"],
        temperature=case["temperature"],
        loss_agg_mode="seq-mean-token-mean",
    )
    assert_matches(loss, expected, torch.float32)


def test_rspo_loss_module_max_at_k_2d_rewards_and_group_ids():
    case = make_case(B=6, T=3, V=9, with_old=False, with_ref=False)
    rewards = torch.tensor([[0.1, 0.5, 0.9], [3.0, 1.0, 2.0]])
    crit = L.RSPOLoss("max@k", k=2, temperature=case["temperature"])
    loss_2d = crit(case["logits"], case["target_ids"], rewards, mask=case["mask"])
    loss_ids = crit(
        case["logits"], case["target_ids"], rewards.reshape(-1), group_ids=[0, 0, 0, 1, 1, 1], mask=case["mask"]
    )
    from rspo_kernels.api import max_at_k_weights

    w = max_at_k_weights(rewards, 2).reshape(-1)
    expected = rspo_loss_reference(case["logits"], case["target_ids"], w, case["mask"], temperature=case["temperature"])
    assert_matches(loss_2d, expected, torch.float32)
    assert_matches(loss_ids, expected, torch.float32)
    assert "objective='max@k', k=2" in repr(crit)


def test_rspo_loss_module_errors():
    with pytest.raises(ValueError, match="objective must be 'pass@k' or 'max@k'"):
        L.RSPOLoss("best@k")
    with pytest.raises(TypeError, match=r"unknown rspo_loss arguments \['clip'\]"):
        L.RSPOLoss(clip=0.2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        L.RSPOLoss(k=0)
    with pytest.raises(ValueError, match="rewards has 3 entries but logits has B=2"):
        L.RSPOLoss(k=1)(torch.zeros(2, 1, 3), torch.zeros(2, 1, dtype=torch.long), torch.zeros(3), group_size=3)


# --------------------------------------------------------------------------- docs and benchmark scripts
def test_docstring_examples():
    import doctest

    import rspo_kernels

    if not hasattr(rspo_kernels, "rspo_loss"):
        pytest.skip("rspo_kernels does not export the loss API yet")
    result = doctest.testmod(L, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


_BENCH = __import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"


def _run_script(args, tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k not in ("TRITON_INTERPRET", BACKEND_ENV)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_gpu_benchmark_smoke_runs_end_to_end(tmp_path):
    import json

    pytest.importorskip("triton")  # the script exercises the Triton kernels (the [triton] extra)

    out = tmp_path / "gpu.json"
    proc = _run_script([str(_BENCH / "gpu.py"), "--smoke", "--no-compile", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] and report["correctness"]["ok"]
    assert {"rspo_kernels", "torch_eager"} <= set(report["rspo_loss_fwd_bwd"])
    assert all("median_ms" in r for r in report["rspo_loss_fwd_bwd"].values())
    weights = report["weights"]
    assert weights["ok"] and {(r["case"], r["objective"]) for r in weights["rows"]} >= {
        ("B=8 n=16", "pass@k"),
        ("ragged N=600", "max@k"),
    }


def test_memory_benchmark_runs(tmp_path):
    import json

    out = tmp_path / "mem.json"
    proc = _run_script([str(_BENCH / "memory.py"), "--n", "64", "--v", "2000", "--out", str(out)], tmp_path)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: target missed (tiny shapes are noise)
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == ["reference", "torch", "torch-inplace"]
