"""Regression tests of issue 18: the adversarial audit's silent wrong results, crashes and false claim.

Each test goes through the public API, on every backend the defect touched (``backend`` is the
chunked torch path and the Triton kernels, under ``TRITON_INTERPRET=1`` without a GPU), and is
checked against an independent oracle: the unfused float64 specification in the padded layout,
autograd, exact rational arithmetic, or brute-force enumeration. Section numbers are the issue's.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from loss_backends import DEVICE, HAS_TRITON
from oracles import expected_gradient
from test_loss_reference import assert_matches

import rspo_kernels as rk
from rspo_kernels._dispatch import BACKEND_ENV
from rspo_kernels.loss import LossOptions
from rspo_kernels.loss.api import rspo_loss_with_options
from rspo_kernels.loss.reference import LOSS_AGG_MODES, rspo_loss_reference

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
from benchmarks import passk_alpha  # noqa: E402

F32 = torch.float32


def _grad_of(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


# 1 + 5 + 9: chunk_rows ------------------------------------------------------------------------------
def _small_case(seed: int = 0, B: int = 2, T: int = 5, V: int = 40):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).to(DEVICE)
    ids = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    weights = torch.randn(B, generator=g).to(DEVICE)
    return logits, ids, weights


@pytest.mark.parametrize("bad", [-1, 0, -(2**40)])
def test_chunk_rows_below_one_is_refused(backend, bad):
    logits, ids, weights = _small_case()
    with pytest.raises(ValueError, match=rf"chunk_rows must be >= 1 .*got {bad}"):
        rspo_loss_with_options(logits.requires_grad_(), ids, weights, None, LossOptions(), chunk_rows=bad)
    with pytest.raises(TypeError, match="chunk_rows must be an int or None"):
        rspo_loss_with_options(logits, ids, weights, None, LossOptions(), chunk_rows=2.0)


@pytest.mark.parametrize("chunk_rows", [1, 4, np.int64(3)])
def test_chunk_rows_is_served_by_every_backend(backend, chunk_rows):
    """Triton used to raise TypeError (it has no chunks); numpy integers are accepted as for ``k``."""
    logits, ids, weights = _small_case(seed=1)
    want_loss, want = _grad_of(lambda x: rspo_loss_reference(x, ids, weights), logits.double())
    loss, got = _grad_of(
        lambda x: rspo_loss_with_options(x, ids, weights, None, LossOptions(), chunk_rows=chunk_rows), logits
    )
    assert_matches(loss, want_loss, F32)
    assert_matches(got, want, F32)


def test_linear_block_sizes_accept_numpy_integers():
    g = torch.Generator().manual_seed(2)
    hidden, W = (
        torch.randn(2, 3, 4, generator=g, dtype=torch.float64),
        torch.randn(7, 4, generator=g, dtype=torch.float64),
    )
    ids, weights = torch.randint(0, 7, (2, 3), generator=g), torch.randn(2, generator=g, dtype=torch.float64)
    want = rspo_loss_reference(hidden @ W.T, ids, weights)
    got = rk.rspo_linear_loss(hidden, W, ids, weights, chunk_rows=np.int64(2), vocab_block=np.int32(3))
    torch.testing.assert_close(got, want)
    crit = rk.RSPOLinearLoss("pass@k", k=1, chunk_rows=np.int64(2), vocab_block=np.int64(3))
    torch.testing.assert_close(
        crit(hidden, W, ids, weights.abs().sign(), group_size=2),
        rspo_loss_reference(hidden @ W.T, ids, weights.abs().sign(), loss_agg_mode="seq-mean-token-sum"),
    )  # the module's default aggregation (issue 26)
    with pytest.raises(ValueError, match="vocab_block must be >= 1"):
        rk.rspo_linear_loss(hidden, W, ids, weights, vocab_block=np.int64(0))


# 2: packed layout with as many sequences as tokens ------------------------------------------------
CU_EMPTY_FIRST = [0, 0, 0, 3, 4]  # S = N = 4: two empty sequences, then lengths 3 and 1


def _padded_from_packed(x: torch.Tensor, cu: list[int], fill=0) -> torch.Tensor:
    S, L = len(cu) - 1, max(b - a for a, b in itertools.pairwise(cu))
    out = torch.full((S, L, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    for s, (a, b) in enumerate(itertools.pairwise(cu)):
        out[s, : b - a] = x[a:b]
    return out


def _packed_case(seed: int = 3, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    N = CU_EMPTY_FIRST[-1]
    logits = torch.randn(N, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (N,), generator=g)
    per_seq = torch.tensor([5.0, -7.0, -1.0, 3.0], dtype=torch.float64)  # the empty ones must not matter
    return logits, ids, per_seq


def _padded_oracle(logits, ids, weights_per_response, cu, mode, per_token=None):
    """The specification in the padded layout: one row per sequence, weights unambiguous there."""
    mask = _padded_from_packed(torch.ones(cu[-1], dtype=torch.bool), cu, fill=False)
    w = weights_per_response if per_token is None else _padded_from_packed(per_token, cu)
    return rspo_loss_reference(
        _padded_from_packed(logits, cu),
        _padded_from_packed(ids, cu),
        w,
        mask,
        loss_agg_mode=mode,
        max_response_length=3,
    )


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_packed_weights_are_per_sequence_when_sequences_equal_tokens(backend, mode):
    logits, ids, per_seq = _packed_case()
    cu = torch.tensor(CU_EMPTY_FIRST, device=DEVICE)
    kw = dict(cu_seqlens=cu, loss_agg_mode=mode, max_response_length=3)
    # The padded oracle differentiated through the packing: its gradient lands on the packed tokens.
    want_loss, want = _grad_of(lambda x: _padded_oracle(x, ids, per_seq, CU_EMPTY_FIRST, mode), logits)
    x32, i, w = logits.float().to(DEVICE), ids.to(DEVICE), per_seq.float().to(DEVICE)
    loss, got = _grad_of(lambda x: rk.rspo_loss(x, i, w, **kw), x32)
    assert_matches(loss, want_loss, F32, f"loss {mode}")
    assert_matches(got, want, F32, f"grad {mode}")
    # The specification reads the packed call the same way, and weights_per pins either reading.
    assert_matches(
        rspo_loss_reference(logits, ids, per_seq, **dict(kw, cu_seqlens=torch.tensor(CU_EMPTY_FIRST))),
        want_loss,
        torch.float64,
    )
    assert_matches(rk.rspo_loss(x32, i, w, weights_per="sequence", **kw), want_loss, F32)
    per_token = torch.tensor([0.5, -2.0, 1.5, 4.0], dtype=torch.float64)
    want_tok = _padded_oracle(logits, ids, None, CU_EMPTY_FIRST, mode, per_token=per_token)
    assert_matches(rk.rspo_loss(x32, i, per_token.float().to(DEVICE), weights_per="token", **kw), want_tok, F32)
    assert_matches(
        rspo_loss_reference(
            logits, ids, per_token, weights_per="token", **dict(kw, cu_seqlens=torch.tensor(CU_EMPTY_FIRST))
        ),
        want_tok,
        torch.float64,
    )


@pytest.mark.parametrize("mode", ["token-sum", "seq-mean-token-mean"])
def test_modules_and_linear_loss_read_packed_weights_per_sequence(backend, mode):
    logits, ids, per_seq = _packed_case(seed=4)
    g = torch.Generator().manual_seed(5)
    hidden, W = (
        torch.randn(4, 6, generator=g, dtype=torch.float64),
        torch.randn(11, 6, generator=g, dtype=torch.float64),
    )
    cu = torch.tensor(CU_EMPTY_FIRST)
    rewards = torch.tensor([0.3, 0.9, 0.1, 0.7], dtype=torch.float64)
    crit = rk.RSPOLoss("max@k", k=2, loss_agg_mode=mode, max_response_length=3)
    w = crit.weights(rewards, group_size=4)
    want = _padded_oracle(logits, ids, w, CU_EMPTY_FIRST, mode)
    assert_matches(
        crit(logits.float().to(DEVICE), ids.to(DEVICE), rewards.to(DEVICE), group_size=4, cu_seqlens=cu.to(DEVICE)),
        want,
        F32,
    )
    want_lin = _padded_oracle(hidden @ W.T, ids, w, CU_EMPTY_FIRST, mode)
    lin = rk.RSPOLinearLoss("max@k", k=2, loss_agg_mode=mode, max_response_length=3)
    torch.testing.assert_close(lin(hidden, W, ids, rewards, group_size=4, cu_seqlens=cu), want_lin)
    kw = dict(cu_seqlens=cu, loss_agg_mode=mode, max_response_length=3)
    torch.testing.assert_close(rk.rspo_linear_loss(hidden, W, ids, w, **kw), want_lin)
    per_token = torch.tensor([0.5, -2.0, 1.5, 4.0], dtype=torch.float64)
    torch.testing.assert_close(
        rk.rspo_linear_loss(hidden, W, ids, per_token, weights_per="token", **kw),
        _padded_oracle(hidden @ W.T, ids, None, CU_EMPTY_FIRST, mode, per_token=per_token),
    )


def test_weights_per_is_validated():
    logits, ids, per_seq = _packed_case()
    with pytest.raises(ValueError, match="weights_per must be 'sequence', 'token' or None"):
        rk.rspo_loss(logits, ids, per_seq, cu_seqlens=torch.tensor(CU_EMPTY_FIRST), weights_per="response")
    with pytest.raises(ValueError, match="weights_per='sequence' .* needs cu_seqlens"):
        rk.rspo_loss(logits, ids, per_seq, weights_per="sequence")
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\) per response \(weights_per='sequence'\)"):
        rk.rspo_loss(
            torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), weights_per="sequence"
        )
    with pytest.raises(ValueError, match=r"weights must have shape \(4,\) per token \(weights_per='token'\)"):
        rk.rspo_loss(logits, ids, per_seq[:2], cu_seqlens=torch.tensor([0, 1, 4]), weights_per="token")


# 3: cu_seqlens dtypes -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16])
def test_cu_seqlens_of_other_integer_types_are_refused(backend, dtype):
    logits, ids, _ = _small_case(B=1, T=6)
    cu = torch.tensor([0, 4, 2, 6]).to(dtype).to(DEVICE)  # decreasing: an unsigned subtraction would wrap
    with pytest.raises(
        TypeError, match=rf"cu_seqlens must be a 1-D integer tensor \(int32 or int64\), got {dtype}.*\.long\(\)"
    ):
        rk.rspo_loss(logits[0], ids[0], torch.ones(3, device=DEVICE), cu_seqlens=cu)
    with pytest.raises(TypeError, match=r"cu_seqlens must be a 1-D integer tensor \(int32 or int64\)"):
        rk.token_logprobs(logits[0], ids[0], cu_seqlens=cu)
    with pytest.raises(TypeError, match=r"cu_seqlens must be a 1-D integer tensor \(int32 or int64\)"):
        rk.rspo_linear_loss(
            logits[0], torch.randn(7, 40, device=DEVICE), ids[0] % 7, torch.ones(3, device=DEVICE), cu_seqlens=cu
        )


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_decreasing_cu_seqlens_are_refused(dtype):
    logits, ids, _ = _small_case(B=1, T=6)
    for cu in ([0, 4, 2, 6], [0, 2**31 - 1, -(2**31), 6]):  # the second would overflow a subtraction
        with pytest.raises(ValueError, match="never decrease.*decrease after sequence 1"):
            rk.rspo_loss(logits[0].cpu(), ids[0].cpu(), torch.ones(3), cu_seqlens=torch.tensor(cu, dtype=dtype))
    loss = rk.rspo_loss(
        logits[0].cpu(), ids[0].cpu(), torch.ones(3), cu_seqlens=torch.tensor([0, 2, 2, 6], dtype=dtype)
    )
    assert torch.isfinite(loss)


# 4: inplace_backward on logits whose elements share memory ------------------------------------------
def test_inplace_backward_refuses_expanded_logits_up_front(backend):
    base = torch.randn(1, 1, 40, device=DEVICE, requires_grad=True)
    logits = (base * 1.0).expand(2, 5, 40)  # a layer's output, broadcast: stride 0
    ids = torch.randint(0, 40, (2, 5), device=DEVICE)
    with pytest.raises(
        ValueError, match=r"share memory .*strides \(0, 0, 1\).*\.contiguous\(\).*inplace_backward=False"
    ):
        rk.rspo_loss(logits, ids, torch.ones(2, device=DEVICE), inplace_backward=True)
    crit = rk.RSPOLoss("pass@k", k=1, inplace_backward=True)
    with pytest.raises(ValueError, match="share memory"):
        crit(logits, ids, torch.tensor([1.0, 0.0], device=DEVICE), group_size=2)
    # Without the flag (or with a contiguous copy) the gradient is the specification's.
    want_loss, want = _grad_of(
        lambda b: rspo_loss_reference((b * 1.0).expand(2, 5, 40), ids, torch.ones(2)), base.double()
    )
    _, got = _grad_of(lambda b: rk.rspo_loss((b * 1.0).expand(2, 5, 40), ids, torch.ones(2, device=DEVICE)), base)
    assert_matches(got, want, F32)
    _, got = _grad_of(
        lambda b: rk.rspo_loss(
            (b * 1.0).expand(2, 5, 40).contiguous(), ids, torch.ones(2, device=DEVICE), inplace_backward=True
        ),
        base,
    )
    assert_matches(got, want, F32)


def test_inplace_backward_still_takes_sliced_views(backend):
    """``layer_out[:, :-1]`` does not overlap: it keeps working with ``inplace_backward``."""
    logits, ids, weights = _small_case(seed=6, T=6)
    ids = ids[:, :-1]
    want_loss, want = _grad_of(lambda x: rspo_loss_reference((x * 2.0)[:, :-1], ids, weights), logits.double())
    loss, got = _grad_of(lambda x: rk.rspo_loss((x * 2.0)[:, :-1], ids, weights, inplace_backward=True), logits)
    assert_matches(loss, want_loss, F32)
    assert_matches(got, want, F32)


# 6 + 7: the fused-linear loss under torch.func and torch.compile ------------------------------------
def _linear_case(seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    W = torch.randn(9, 6, generator=g, dtype=torch.float64)
    bias = torch.randn(9, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 9, (2, 4), generator=g)
    weights = torch.tensor([1.5, -0.5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    return hidden, W, bias, ids, weights, mask


def _linear_reference(hidden, W, bias, ids, weights, mask):
    h = torch.where(mask.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype))  # masked rows may be NaN
    return rspo_loss_reference(torch.nn.functional.linear(h, W, bias), ids, weights, mask)


def test_torch_func_grad_of_the_linear_loss_reaches_the_head():
    hidden, W, bias, ids, weights, mask = _linear_case()

    def loss(h, w, b):
        return rk.rspo_linear_loss(h, w, ids, weights, mask, bias=b, chunk_rows=3, vocab_block=4)

    got = torch.func.grad(loss, argnums=(0, 1, 2))(hidden, W, bias)
    leaves = [t.clone().requires_grad_() for t in (hidden, W, bias)]
    want = torch.autograd.grad(_linear_reference(*leaves, ids, weights, mask), leaves)
    for name, a, b in zip(("hidden", "weight", "bias"), got, want, strict=True):
        torch.testing.assert_close(a, b, msg=name)
    # A float32 head (the weight's gradient accumulated in a float32 buffer of its own).
    got32 = torch.func.grad(lambda w: loss(hidden.float(), w, bias.float()))(W.float())
    assert_matches(got32, want[1], F32, ulps=8)


def _compile(fn):
    with warnings.catch_warnings():
        # Dynamo's tracing of autograd.Function instantiates it (a torch-internal deprecation).
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.compile(fn, fullgraph=True, backend="eager")


def test_torch_compile_fullgraph_of_the_linear_loss_with_a_mask():
    hidden, W, bias, ids, weights, mask = _linear_case(seed=8)
    hidden[~mask] = float("nan")  # masked rows are never read, compiled or not

    def step(h, w):
        return rk.rspo_linear_loss(h, w, ids, weights, mask, bias=bias, chunk_rows=3, vocab_block=4)

    leaves = [t.clone().requires_grad_() for t in (hidden, W)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loss = _compile(step)(*leaves)
        loss.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, W)]
    want = _linear_reference(*ref_leaves, bias, ids, weights, mask)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(leaves[0].grad, ref_leaves[0].grad)  # 0, not NaN, at masked rows
    torch.testing.assert_close(leaves[1].grad, ref_leaves[1].grad)

    def logprobs(h):
        return rk.token_logprobs_linear(h, W, ids, bias=bias, mask=mask, return_entropy=True, chunk_rows=3)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        lp, ent = _compile(logprobs)(hidden)
    logits = torch.nn.functional.linear(torch.nan_to_num(hidden), W, bias)
    want_lp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    want_ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    zero = torch.zeros(())
    torch.testing.assert_close(lp, torch.where(mask, want_lp, zero.double()))
    torch.testing.assert_close(ent, torch.where(mask, want_ent, zero.double()))


# 8: the scale of passk_training_std ---------------------------------------------------------------
PASS_POLICIES = [  # (binary rewards per action, logits of a categorical policy)
    (np.array([0.0, 1.0, 1.0]), np.array([0.4, -0.1, -0.6])),
    (np.array([1.0, 0.0, 0.0, 1.0, 0.0]), np.array([-0.5, 0.3, 0.1, -0.2, 0.6])),
    (np.array([0.0, 0.0, 1.0]), np.array([1.5, 0.2, -2.0])),  # a hard prompt, p = 0.04
]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


@pytest.fixture
def reference_weights(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "reference")


@pytest.mark.parametrize("policy", range(len(PASS_POLICIES)))
def test_passk_alpha_formula_matches_brute_force_enumeration(reference_weights, policy):
    """E[g] by enumerating all m**n sample sets equals alpha(n, k, p) grad Pass@k (benchmarks/passk_alpha.py)."""
    rewards, logits = PASS_POLICIES[policy]
    probs = _softmax(logits)
    p = float(probs[rewards == 1].sum())
    grad_p = probs * (rewards - p)  # d p / d logits for a softmax policy
    for n in (3, 4):
        for k in range(1, n + 1):
            true_grad = k * (1 - p) ** (k - 1) * grad_p
            for estimator, scale in (("passk_training_std", None), ("rspo", 1.0), ("pkpo", 1.0)):
                got = expected_gradient(
                    probs, rewards, n, lambda r, k=k, e=estimator: rk.pass_at_k_weights(r, k, estimator=e)
                )
                a = passk_alpha.alpha(n, k, p, estimator)
                np.testing.assert_allclose(got, a * true_grad, rtol=0, atol=1e-12, err_msg=f"{estimator} n={n} k={k}")
                if scale is not None:
                    assert a == pytest.approx(scale, abs=1e-12)


def test_passk_alpha_is_neither_below_one_nor_constant(reference_weights):
    """The old claim was ``alpha < 1``; exact values say otherwise, and they move with p."""
    assert passk_alpha.alpha(8, 1, 0.5) > 1.5
    assert passk_alpha.alpha(64, 1, 0.01) > 5
    assert passk_alpha.alpha(8, 4, 0.1) < 0.5
    assert abs(passk_alpha.alpha(16, 4, 0.1) - passk_alpha.alpha(16, 4, 0.9)) > 1
    assert passk_alpha.alpha(8, 8, 0.5) == 0.0  # k = n: every advantage is 0


def test_docs_table_of_alpha_is_the_generated_one(reference_weights):
    text = (_ROOT / "docs" / "math.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- passk-alpha-table:start -->\n(.*?)\n<!-- passk-alpha-table:end -->", text, re.S)
    assert table is not None, "docs/math.md lost the alpha table markers"
    assert table.group(1) == passk_alpha.alpha_table_markdown(), "regenerate with python -m benchmarks.passk_alpha"
    assert "alpha < 1" not in text


def test_demo_report_states_the_true_alpha(reference_weights):
    from rspo_kernels.demo.report import format_report

    rows = [{"method": "PassK-Training k=4", "pass@1": {"mean": 0.1, "std": 0.0}}]
    text = format_report(
        {
            "config": {"seeds": [0], "eval_prompts": 1, "eval_samples": 1},
            "tables": {"pass@k": {"columns": ["pass@1"], "rows": rows}},
            "claims": [],
        }
    )
    assert "alpha < 1" not in text and "neither bounded by 1 nor constant" in text
    quoted = re.search(r"\(([\d.]+) at n=8, k=1, p=0.5; ([\d.]+) at n=8, k=4, p=0.5", text)
    assert quoted is not None
    assert float(quoted.group(1)) == round(passk_alpha.alpha(8, 1, 0.5), 2)
    assert float(quoted.group(2)) == round(passk_alpha.alpha(8, 4, 0.5), 2)


# 9a: integer rewards keep their values ----------------------------------------------------------------
def _max_at_k_weights_exact(rewards: list[int], k: int) -> list[Fraction]:
    """``w_i = k * mean over (k-1)-subsets S of the others of max(R_i - max S, 0)``, in rationals."""
    out = []
    for i, r in enumerate(rewards):
        others = rewards[:i] + rewards[i + 1 :]
        subsets = list(itertools.combinations(others, k - 1))
        out.append(k * Fraction(sum(max(r - max(s, default=r), 0) for s in subsets), len(subsets)))
    return out


WEIGHT_BACKENDS = ["reference", "cpp", "triton"]


@pytest.fixture(params=WEIGHT_BACKENDS)
def weight_backend(request, monkeypatch):
    from conftest import EXTENSION_BUILT

    if request.param == "cpp" and not EXTENSION_BUILT:
        pytest.skip("the C++ extension is not built")
    if request.param == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv(BACKEND_ENV, request.param)
    return request.param


@pytest.mark.parametrize("base", [2**24, 2**40, -(2**52)])
def test_int64_rewards_are_not_rounded_to_float32(weight_backend, base):
    values = [base, base + 1, base + 2, base + 3]
    exact = [float(w) for w in _max_at_k_weights_exact(values, 2)]  # [0, 2/3, 2, 4]
    for rewards in (torch.tensor(values, dtype=torch.int64), np.array(values, dtype=np.int64)):
        w = rk.max_at_k_weights(rewards, 2, group_size=4)
        assert w.dtype in (torch.float32, np.float32)
        np.testing.assert_allclose(np.asarray(w, dtype=np.float64), exact, rtol=2**-23, atol=0)
    crit = rk.RSPOLoss("max@k", k=2)
    np.testing.assert_allclose(
        crit.weights(torch.tensor([values]), group_size=None).double().numpy(), exact, rtol=2**-23
    )
    metric = rk.max_at_k(torch.tensor(values), 2, group_size=4)
    exact_metric = sum(Fraction(max(s)) for s in itertools.combinations(values, 2)) / math.comb(4, 2)
    assert float(metric) == float(np.float32(float(exact_metric)))  # one rounding of the exact value


@pytest.mark.parametrize("value", [2**53 + 1, -(2**53) - 1, 2**63 - 1])
def test_int64_rewards_beyond_float64_are_refused_when_validating(value):
    values = [0, 1, 2, value]
    for rewards in (torch.tensor(values, dtype=torch.int64), np.array(values, dtype=np.int64)):
        for fn in (rk.max_at_k_weights, rk.max_at_k):
            with pytest.raises(ValueError, match=rf"integer beyond \+-2\*\*53 \({value} at flat position 3\)"):
                fn(rewards, 2, group_size=4)
        rk.max_at_k_weights(rewards, 2, group_size=4, validate=False)  # no host sync, no check
    assert rk.max_at_k_weights(np.array([0, 2**53], dtype=np.uint64), 2, group_size=2).tolist() == [0.0, 2.0**54]


def test_small_integer_and_bool_rewards_keep_float32(weight_backend):
    binary = np.array([[1, 0, 0, 1, 0, 0, 0, 0]], dtype=np.int64)
    want = rk.pass_at_k_weights(binary.astype(np.float64), 4)
    for rewards in (binary, binary.astype(np.int8), binary.astype(bool), torch.from_numpy(binary).int()):
        w = rk.pass_at_k_weights(rewards, 4)
        assert w.dtype in (np.float32, torch.float32)
        np.testing.assert_allclose(np.asarray(w, dtype=np.float64), want, rtol=2**-23)


# 9b: boolean flags ------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["inplace_backward", "return_stats"])
@pytest.mark.parametrize("value", ["no", "False", 1, None])
def test_non_bool_flags_are_refused(flag, value):
    with pytest.raises(TypeError, match=rf"{flag} must be True or False, got {re.escape(repr(value))}"):
        rk.RSPOLoss("pass@k", k=2, **{flag: value})
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(TypeError, match=rf"{flag} must be True or False"):
        rk.rspo_loss(logits, torch.zeros(1, 2, dtype=torch.long), torch.ones(1), **{flag: value})
    if flag == "return_stats":
        with pytest.raises(TypeError, match="return_stats must be True or False"):
            rk.RSPOLinearLoss("pass@k", k=2, return_stats=value)
        with pytest.raises(TypeError, match="return_stats must be True or False"):
            rk.rspo_linear_loss(
                logits, torch.zeros(3, 3), torch.zeros(1, 2, dtype=torch.long), torch.ones(1), return_stats=value
            )


def test_non_bool_return_entropy_is_refused():
    logits, ids = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(TypeError, match="return_entropy must be True or False, got 'no'"):
        rk.token_logprobs(logits, ids, return_entropy="no")
    with pytest.raises(TypeError, match="return_entropy must be True or False, got 'no'"):
        rk.token_logprobs_linear(logits, torch.zeros(4, 3), ids, return_entropy="no")


def test_numpy_bool_flags_are_accepted():
    crit = rk.RSPOLoss("pass@k", k=2, return_stats=np.bool_(True), inplace_backward=np.bool_(False))
    assert crit.return_stats is True and crit.inplace_backward is False


# 9c: a forced backend that is not installed warns -------------------------------------------------
_FORCED_SCRIPT = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import numpy as np, torch
    import rspo_kernels as rk
    rk.backend_info()
    w = rk.max_at_k_weights(np.array([[0.1, 0.5, 0.5, 0.9]]), 2).tolist()
    rk.pass_at_k_weights(np.array([[1.0, 0.0]]), 1)
    loss = float(rk.rspo_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.ones(1)))
print(json.dumps({"w": w, "loss": loss, "warnings": [f"{x.category.__name__}: {x.message}" for x in caught]}))
"""


def test_forcing_triton_without_triton_warns_once():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {
        "PYTHONPATH": os.pathsep.join([str(_ROOT / "tests" / "hide_modules"), str(_ROOT)]),
        "RSPO_TEST_HIDE_MODULES": "triton",
        BACKEND_ENV: "triton",
    }
    proc = subprocess.run([sys.executable, "-c", _FORCED_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    forced = [w for w in out["warnings"] if "RSPO_KERNELS_BACKEND=triton" in w]
    assert len(forced) == 1, out["warnings"]  # once, for three calls; backend_info stays quiet
    assert forced[0].startswith("UserWarning:") and "falling back to the 'reference' backend" in forced[0]
    assert "triton not installed" in forced[0]
    np.testing.assert_allclose(out["w"], [[0, 4 / 15, 4 / 15, 16 / 15]], rtol=1e-6)
    assert out["loss"] == pytest.approx(-1.0)


# 9d: adapter configuration values -----------------------------------------------------------------
@pytest.mark.parametrize("k", ["²", "٤", "4.0", "", None, True, 0, "-1"])
def test_adapter_k_must_be_ascii_digits_or_an_int(k):
    from rspo_kernels.integrations._common import RSPOSettings

    keys = {"objective": "cfg.objective", "k": "cfg.rspo_k", "estimator": "cfg.estimator", "n": "cfg.n"}
    with pytest.raises(ValueError, match=rf"cfg\.rspo_k={re.escape(repr(k))} must be a positive integer"):
        RSPOSettings.create("pass@k", k, "rspo", keys)
    assert RSPOSettings.create("pass@k", " 4 ", "rspo", keys).k == 4
    assert RSPOSettings.create("pass@k", np.int64(4), "rspo", keys).k == 4


def test_verl_config_values_are_checked_and_normalised():
    pytest.importorskip("verl")
    from omegaconf import OmegaConf

    import rspo_kernels.integrations.verl as rspo_verl

    with pytest.raises(ValueError, match="algorithm.rspo_k='²' must be a positive integer"):
        rspo_verl.RSPOAlgoConfig(rspo_k="²")
    with pytest.raises(ValueError, match="algorithm.rspo_estimator=passk_training_std has no max@k form"):
        rspo_verl.RSPOAlgoConfig(rspo_objective="max@k", rspo_estimator="passk_training_std")
    algo = rspo_verl.RSPOAlgoConfig(rspo_k="4", rspo_objective="Max_at_k")
    assert algo.rspo_k == 4 and isinstance(algo.rspo_k, int) and algo.rspo_objective == "max@k"
    config = OmegaConf.create(
        {
            "algorithm": {"adv_estimator": "rspo", "rspo_k": 2},
            "actor_rollout_ref": {"rollout": {"n": None}, "actor": {"loss_agg_mode": "seq-mean-token-sum-norm"}},
        }
    )
    with pytest.raises(ValueError, match="actor_rollout_ref.rollout.n=None must be a positive integer"):
        rspo_verl.check_trainer_config(config)


def test_trl_config_values_are_checked_and_normalised(tmp_path):
    pytest.importorskip("trl")
    from test_integration_trl import tiny_run

    from rspo_kernels.integrations.trl import RSPOConfig

    with pytest.raises(ValueError, match="rspo_k='²' must be a positive integer"):
        RSPOConfig(**tiny_run(tmp_path, 1), rspo_k="²")
    args = RSPOConfig(**tiny_run(tmp_path, 1), rspo_k="4", rspo_objective="Max@k")
    assert args.rspo_k == 4 and isinstance(args.rspo_k, int) and args.rspo_objective == "max@k"


def test_openrlhf_settings_name_the_variable():
    import rspo_kernels.integrations.openrlhf as rspo_openrlhf

    with pytest.raises(ValueError, match="RSPO_K='٤' must be a positive integer"):
        rspo_openrlhf.settings_from_env({"RSPO_K": "٤"})
    with pytest.raises(ValueError, match="RSPO_ESTIMATOR=passk_training_std has no max@k form"):
        rspo_openrlhf.settings_from_env({"RSPO_OBJECTIVE": "max@k", "RSPO_ESTIMATOR": "passk_training_std"})


# 9e: Triton backward precision at confident targets -------------------------------------------------
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_gradient_at_confident_targets_keeps_full_precision(monkeypatch):
    """``1 - p_target`` ~ 3e-5: from the saved log-sum-exp it lost 2 of float32's 7 digits."""
    monkeypatch.setenv(BACKEND_ENV, "triton")
    g = torch.Generator().manual_seed(9)
    B, T, V = 1, 8, 300
    logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    logits.scatter_(-1, ids[..., None], 14.0 + 4.0 * torch.rand(B, T, 1, generator=g))
    weights = torch.tensor([1.0])
    _, want = _grad_of(lambda x: rspo_loss_reference(x, ids, weights.double()), logits.double())
    _, got = _grad_of(lambda x: rk.rspo_loss(x.to(DEVICE), ids.to(DEVICE), weights.to(DEVICE)), logits)
    got_t, want_t = got.double().cpu().gather(-1, ids[..., None]), want.gather(-1, ids[..., None])
    eps = torch.finfo(torch.float32).eps
    rel = ((got_t - want_t).abs() / want_t.abs()).max().item()
    assert rel < 16 * eps, rel  # was 5.9e-2 here (1.5e-2 for the unfused float32 path)
    assert_matches(got.cpu(), want, F32, ulps=4)
    # The forward log-prob: (x_t - max) - log(sum), a few float32 roundoffs of the partition sum
    # (about 1 here), where x_t - lse carried lse's rounding (~1e-6 at lse ~ 16).
    lp = rk.token_logprobs(logits.to(DEVICE), ids.to(DEVICE)).double().cpu()
    lp64 = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None])[..., 0]
    assert (lp - lp64).abs().max() <= 4 * eps
