"""The fused-linear loss (hidden states + lm_head, no logits) against a float64 unfused reference.

The reference computes ``logits = hidden @ W.T + b`` in float64 from the same (rounded) input
values and runs :func:`rspo_kernels.loss.reference.rspo_loss_reference`; autograd differentiates
it. Tolerances come from the dtypes: the loss and log-probs are accumulated in float32 whatever
the input dtype (so they match to float32 accuracy even for bfloat16 inputs), and each gradient
entry is rounded once to the input dtype (one unit roundoff of it, relative). The autograd
contract (issue "Loss v2", section 1 items 1-4, 8-10, 12, 13) is tested as torch users drive it.
"""

from __future__ import annotations

import pytest
import torch

import rspo_kernels as rk
from rspo_kernels.loss import linear_chunked, linear_fused
from rspo_kernels.loss.options import LOSS_AGG_MODES
from rspo_kernels.loss.reference import rspo_loss_reference, token_logprobs_reference

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Relative error of one rounding to the dtype (its unit roundoff), and of float32 accumulation.
UNIT = {torch.float64: 2.0**-50, torch.float32: 2.0**-22, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ACC = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
BLOCKS = dict(chunk_rows=4, vocab_block=7)  # several token chunks and vocabulary blocks, a ragged last one


def make_case(B=3, T=5, H=8, V=37, dtype=torch.float32, packed=False, seed=0):
    """Random inputs, rounded to ``dtype`` once; the float64 reference reads the same values."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.6).to(dtype)
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[1] = False  # a fully masked response
    mask[0, 0] = True
    weights = torch.randn(B, generator=g).abs()
    weights[0] = -weights[0]
    with torch.no_grad():
        true = token_logprobs_reference(hidden.double() @ weight.double().T + bias.double(), ids, temperature=0.7)
    # Ratios on both sides of the clip range, and some negative weights for the dual clip.
    old = (true + 0.9 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    old[0, 0] = float(true[0, 0]) - 2.0  # ratio e^2 > clip_ratio_c = 3 at a negative weight: dual-clipped
    ref = (true + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ids = ids.masked_fill(~mask, -100)  # padding ids as tokenizers leave them
    case = dict(hidden=hidden, weight=weight, bias=bias, ids=ids, mask=mask, weights=weights, old=old, ref=ref)
    if packed:  # the same responses, packed back to back with their padding dropped
        lengths = mask.sum(1)
        keep = mask.reshape(-1)
        case = dict(
            hidden=hidden.reshape(B * T, H)[keep],
            weight=weight,
            bias=bias,
            ids=ids.reshape(-1)[keep],
            mask=None,
            weights=weights,
            old=old.reshape(-1)[keep],
            ref=ref.reshape(-1)[keep],
            cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        )
    return case


def run_linear(case, **kw):
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    b = case["bias"].clone().requires_grad_()
    out = rk.rspo_linear_loss(
        h,
        w,
        case["ids"],
        case["weights"],
        case["mask"],
        bias=b,
        old_logprobs=case["old"],
        ref_logprobs=case["ref"],
        cu_seqlens=case.get("cu_seqlens"),
        **kw,
    )
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return out, (h.grad, w.grad, b.grad)


def run_reference(case, **kw):
    h = case["hidden"].double().requires_grad_()
    w = case["weight"].double().requires_grad_()
    b = case["bias"].double().requires_grad_()
    out = rspo_loss_reference(
        h @ w.T + b,
        case["ids"],
        case["weights"].double(),
        case["mask"],
        old_logprobs=case["old"].double(),
        ref_logprobs=case["ref"].double(),
        cu_seqlens=case.get("cu_seqlens"),
        **kw,
    )
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return out, (h.grad, w.grad, b.grad)


def assert_grad_close(got, want, dtype, what):
    """Each entry is the float32-accurate gradient rounded once to ``dtype``."""
    got, want = got.double(), want.double()
    scale = float(want.abs().max())
    tol = UNIT[dtype] * want.abs() + ACC[dtype] * scale + (2.0**-24 if dtype == torch.float16 else 0.0)
    err = (got - want).abs()
    assert bool((err <= tol).all()), f"{what}: max error {float(err.max()):.3e} (scale {scale:.3e}, {dtype})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_values_and_gradients_match_float64_reference(dtype, packed, mode):
    case = make_case(dtype=dtype, packed=packed)
    kw = dict(loss_agg_mode=mode, temperature=0.7, epsilon_high=0.28, clip_ratio_c=3.0, beta=0.05, return_stats=True)
    if packed and mode == "seq-mean-token-sum-norm":
        kw["max_response_length"] = 5
    (loss, stats), grads = run_linear(case, **BLOCKS, **kw)
    (loss_r, stats_r), grads_r = run_reference(case, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # float32 accumulation of the logits: bfloat16 / float16 inputs lose nothing beyond float32 here.
    tol = 1e-12 if dtype == torch.float64 else ACC[dtype]
    torch.testing.assert_close(loss.double(), loss_r, rtol=tol, atol=tol)
    assert set(stats) == set(stats_r)
    for k in stats_r:
        torch.testing.assert_close(stats[k].double(), stats_r[k].double(), rtol=tol, atol=tol, msg=k)
    assert 0 < stats_r["clip_fraction"] < 1 and stats_r["dual_clip_fraction"] > 0  # every branch is exercised
    for name, g, g_r in zip(("hidden", "weight", "bias"), grads, grads_r, strict=False):
        assert g.dtype == dtype
        assert_grad_close(g, g_r, dtype, f"d{name} {mode}")
    if not packed:  # the fully masked response: exactly zero gradient rows
        assert torch.all(grads[0][1] == 0)


@pytest.mark.parametrize("chunk_rows,vocab_block", [(1, 1), (2, 37), (100, 5), (None, None)])
def test_block_shape_does_not_change_the_result(chunk_rows, vocab_block):
    case = make_case(dtype=torch.float64)
    kw = dict(loss_agg_mode="seq-mean-token-mean", temperature=0.7, beta=0.05)
    loss, grads = run_linear(case, chunk_rows=chunk_rows, vocab_block=vocab_block, **kw)
    loss_r, grads_r = run_reference(case, **kw)
    torch.testing.assert_close(loss, loss_r, rtol=1e-12, atol=1e-12)
    for g, g_r in zip(grads, grads_r, strict=False):
        torch.testing.assert_close(g, g_r, rtol=1e-10, atol=1e-12)


def test_default_blocks_fit_the_memory_target():
    # 512 x 4096-style float32 blocks (8 MiB) on a CPU; the vocabulary is split into equal blocks.
    assert linear_chunked.default_blocks(4096, 32000, torch.device("cpu")) == (512, 4000)
    assert linear_chunked.default_blocks(4096, 4096, torch.device("cpu")) == (512, 4096)
    assert linear_chunked.default_blocks(10, 50, torch.device("cpu")) == (10, 50)


def test_tied_weight_gets_both_gradients():
    """lm_head tied to the input embedding: autograd adds the loss's dW to the embedding's gradient."""
    g = torch.Generator().manual_seed(1)
    V, H, B, T = 23, 6, 2, 4
    emb0 = torch.randn(V, H, generator=g, dtype=torch.float64)
    proj = torch.randn(H, H, generator=g, dtype=torch.float64) * 0.5
    inputs = torch.randint(0, V, (B, T), generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    weights = torch.randn(B, generator=g)

    def grads(fused: bool, dtype):
        emb = emb0.to(dtype, copy=True).requires_grad_()
        hidden = torch.tanh(emb[inputs] @ proj.to(dtype))
        if fused:
            loss = rk.rspo_linear_loss(hidden, emb, ids, weights, **BLOCKS)
        else:
            loss = rspo_loss_reference(hidden @ emb.T, ids, weights.to(dtype))
        loss.backward()
        return emb.grad

    torch.testing.assert_close(grads(True, torch.float64), grads(False, torch.float64), rtol=1e-10, atol=1e-12)
    assert_grad_close(grads(True, torch.float32), grads(False, torch.float64), torch.float32, "tied embedding")


def test_hidden_states_with_a_second_consumer_get_both_gradients():
    """The hidden states also feed a value head (the loss runs first, then the other term, and the
    other order): the fused loss's dh is added to the head's, as autograd does for any op."""
    case = make_case(dtype=torch.float64)
    head = torch.randn(case["hidden"].shape[-1], dtype=torch.float64)

    def grads(fused: bool, loss_first: bool):
        h = case["hidden"].clone().requires_grad_()
        other = lambda: (h @ head).pow(2).sum()  # noqa: E731  (saves h for its own backward)
        value = None if loss_first else other()
        if fused:
            loss = rk.rspo_linear_loss(
                h,
                case["weight"],
                case["ids"],
                case["weights"],
                case["mask"],
                bias=case["bias"],
                old_logprobs=case["old"],
                **BLOCKS,
            )
        else:
            loss = rspo_loss_reference(
                h @ case["weight"].T + case["bias"],
                case["ids"],
                case["weights"],
                case["mask"],
                old_logprobs=case["old"].double(),
            )
        (loss + (other() if loss_first else value)).backward()
        return h.grad

    expected = grads(False, True)
    for loss_first in (True, False):
        torch.testing.assert_close(grads(True, loss_first), expected, rtol=1e-10, atol=1e-12)


def test_token_logprobs_linear_matches_logits_version_and_is_differentiable():
    case = make_case(dtype=torch.float64)
    mask = case["mask"]
    h = case["hidden"].clone().requires_grad_()
    lp, ent = rk.token_logprobs_linear(
        h, case["weight"], case["ids"], bias=case["bias"], temperature=0.7, return_entropy=True, mask=mask, **BLOCKS
    )
    logits = case["hidden"] @ case["weight"].T + case["bias"]
    lp_r, ent_r = token_logprobs_reference(logits, case["ids"].clamp(min=0), temperature=0.7, return_entropy=True)
    torch.testing.assert_close(lp[mask], lp_r[mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent[mask], ent_r[mask], rtol=1e-12, atol=1e-12)
    assert torch.all(lp[~mask] == 0) and torch.all(ent[~mask] == 0)
    assert lp.requires_grad and ent.requires_grad
    # gradcheck in float64 over all three inputs, with a random grad_output per token.
    fn = lambda hh, ww, bb: rk.token_logprobs_linear(  # noqa: E731
        hh,
        ww,
        case["ids"],
        bias=bb,
        mask=mask,
        temperature=0.7,  # noqa: E731
        chunk_rows=3,
        vocab_block=5,
    )
    small = [t[:, :, :4] if t.dim() == 3 else t for t in (case["hidden"],)]
    w, b = case["weight"][:, :4].clone(), case["bias"].clone()
    assert torch.autograd.gradcheck(fn, (small[0].clone().requires_grad_(), w.requires_grad_(), b.requires_grad_()))


def test_gradcheck_of_the_loss():
    case = make_case(B=2, T=3, H=4, V=7, dtype=torch.float64, seed=3)
    h, w, b = (case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))

    def fn(hh, ww, bb):
        return rk.rspo_linear_loss(
            hh,
            ww,
            case["ids"],
            case["weights"].double(),
            case["mask"],
            bias=bb,
            old_logprobs=case["old"].double(),
            ref_logprobs=case["ref"].double(),
            beta=0.1,
            temperature=0.7,
            loss_agg_mode="seq-mean-token-mean",
            chunk_rows=2,
            vocab_block=3,
        )

    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_packed_equals_padded():
    padded, packed = make_case(), make_case(packed=True)
    kw = dict(loss_agg_mode="seq-mean-token-mean", temperature=0.7, beta=0.05)
    loss_a, (gh_a, gw_a, gb_a) = run_linear(padded, **kw)
    loss_b, (gh_b, gw_b, gb_b) = run_linear(packed, **kw)
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(gh_a[padded["mask"]], gh_b)
    torch.testing.assert_close(gw_a, gw_b)
    torch.testing.assert_close(gb_a, gb_b)


# --------------------------------------------------------------------------- autograd contract


def _grads(case, scale=None, **kw):
    h, w, b = (case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    loss = rk.rspo_linear_loss(
        h, w, case["ids"], case["weights"], case["mask"], bias=b, old_logprobs=case["old"], **BLOCKS, **kw
    )
    (loss if scale is None else loss * scale).backward()
    return h.grad, w.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_loss_scaling_scales_the_gradient_exactly(dtype):
    """Item 1 and 8: the scale reaches the gradient before its single rounding to ``dtype``."""
    case = make_case(dtype=dtype)
    case["weights"] = case["weights"] * 1e-3  # scaled gradients fit fp16's range (a GradScaler ensures that)
    plain = _grads(case)
    scaled = _grads(case, scale=65536.0)
    _, grads_r = run_reference(case)
    for name, g, s, r in zip(("hidden", "weight", "bias"), plain, scaled, grads_r, strict=False):
        assert torch.isfinite(s).all(), name
        if dtype == torch.float16:
            # fp16 subnormals: the unscaled gradient may round where the scaled one cannot; the
            # scaled one must keep every entry the float64 gradient times the scale keeps.
            assert_grad_close(s, r * 65536.0, dtype, f"scaled d{name}")
            kept = (r * 65536.0).abs() > 2.0**-24
            assert bool((s[kept] != 0).all()), f"scaled d{name} flushed entries to zero"
        else:
            assert torch.equal(s, g * 65536.0), name


def test_fp16_scaled_gradient_keeps_what_the_unfused_path_keeps():
    """Item 8: with a GradScaler-sized scale the fused fp16 gradient has no more zeros than unfused fp16."""
    case = make_case(B=4, T=16, H=16, V=512, dtype=torch.float16, seed=5)
    case["mask"] = torch.ones(4, 16, dtype=torch.bool)
    case["ids"] = case["ids"].clamp(min=0)
    scale = 32768.0
    fused = _grads(case, scale=scale)
    h, w, b = (case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    loss = rspo_loss_reference(
        torch.nn.functional.linear(h, w, b), case["ids"], case["weights"], case["mask"], old_logprobs=case["old"]
    )
    (loss * scale).backward()
    for name, g, u in zip(("hidden", "weight", "bias"), fused, (h.grad, w.grad, b.grad), strict=False):
        assert int((g == 0).sum()) <= int((u == 0).sum()), name


def test_retain_graph_and_grad_output():
    """Items 3 and 9: two backwards over a retained graph add up; grad_output scales in one pass."""
    case = make_case()
    h, w, b = (case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    loss = rk.rspo_linear_loss(
        h, w, case["ids"], case["weights"], case["mask"], bias=b, old_logprobs=case["old"], **BLOCKS
    )
    loss.backward(retain_graph=True)
    once = [t.grad.clone() for t in (h, w, b)]
    loss.backward(retain_graph=True)
    for t, g1 in zip((h, w, b), once, strict=False):
        assert torch.equal(t.grad, 2 * g1)
    loss.backward(torch.tensor(3.0))  # a second backward with grad_output != 1: 2x + 3x
    for t, g1 in zip((h, w, b), once, strict=False):
        torch.testing.assert_close(t.grad, 5 * g1)
    h2, w2, b2 = (case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    loss2 = rk.rspo_linear_loss(
        h2, w2, case["ids"], case["weights"], case["mask"], bias=b2, old_logprobs=case["old"], **BLOCKS
    )
    (3 * loss2).backward()
    for t, g1 in zip((h2, w2, b2), once, strict=False):
        torch.testing.assert_close(t.grad, 3 * g1)


def test_no_grad_does_no_gradient_work(monkeypatch):
    """Item 4: under no_grad only the forward's blocks are computed, and nothing is saved; with grad, no recompute."""
    calls = {"logits": 0, "grad": 0}
    real_logits, real_addmm = linear_chunked._block_logits, linear_chunked._addmm

    def count(key, fn):
        def wrapped(*a):
            calls[key] += 1
            return fn(*a)

        return wrapped

    monkeypatch.setattr(linear_chunked, "_block_logits", count("logits", real_logits))
    monkeypatch.setattr(linear_chunked, "_addmm", count("grad", real_addmm))
    case = make_case(B=2, T=4, V=14)
    h = case["hidden"].clone().requires_grad_()
    run = lambda: rk.rspo_linear_loss(  # noqa: E731
        h,
        case["weight"],
        case["ids"].clamp(min=0),
        case["weights"],  # noqa: E731
        chunk_rows=4,
        vocab_block=7,
    )
    with torch.no_grad():
        loss = run()
    assert not loss.requires_grad
    assert calls == {"logits": 2 * 2, "grad": 0}  # 2 token chunks x 2 vocabulary blocks, forward only
    # With gradients wanted the token-local loss takes the one-pass route (issue 28): each row block's
    # logits are computed once, in forward, with the gradients; backward computes no logits at all.
    # Counted where every schedule turns a block's logits into its gradient (the CPU schedule forms
    # the logits tile by tile, the GPU one in one matmul).
    calls.update(logits=0)
    monkeypatch.setattr(linear_fused._Block, "logits_to_grad_", count("fused", linear_fused._Block.logits_to_grad_))
    calls["fused"] = 0
    loss = run()
    assert calls == {"logits": 0, "grad": 0, "fused": 2}  # 2 row blocks of 4 tokens, whole vocabulary each
    loss.backward()
    assert calls == {"logits": 0, "grad": 0, "fused": 2}
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_create_graph_raises():
    """Item 10: the blocked backward is not differentiable; say so instead of dropping the term."""
    case = make_case(dtype=torch.float64)
    h = case["hidden"].clone().requires_grad_()
    loss = rk.rspo_linear_loss(h, case["weight"], case["ids"], case["weights"], case["mask"])
    with pytest.raises(RuntimeError, match="create_graph=True.*RSPO_KERNELS_BACKEND=reference"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_reference_backend_supports_double_backward(monkeypatch):
    monkeypatch.setenv("RSPO_KERNELS_BACKEND", "reference")
    case = make_case(dtype=torch.float64)
    h = case["hidden"].clone().requires_grad_()
    loss = rk.rspo_linear_loss(
        h, case["weight"], case["ids"], case["weights"], case["mask"], bias=case["bias"], temperature=0.7
    )
    (g,) = torch.autograd.grad(loss, h, create_graph=True)
    (g * g).sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    monkeypatch.delenv("RSPO_KERNELS_BACKEND")
    fused = rk.rspo_linear_loss(
        h.detach(), case["weight"], case["ids"], case["weights"], case["mask"], bias=case["bias"], temperature=0.7
    )
    torch.testing.assert_close(fused, loss.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_rows_with_nan_hidden_get_zero_gradient(dtype):
    """Item 12: masked rows are never read: NaN there changes nothing, its gradient rows are zero."""
    case = make_case(dtype=dtype)
    clean = _grads(case)
    dirty = dict(case, hidden=case["hidden"].masked_fill(~case["mask"].unsqueeze(-1), float("nan")))
    h, w, b = _grads(dirty)
    assert torch.all(h[~case["mask"]] == 0)
    for got, want in zip((h, w, b), clean, strict=False):
        assert torch.equal(got, want)


def test_zero_weight_token_with_minus_inf_old_logprob_stays_finite():
    """Item 12: the log-ratio clamp keeps 0 * exp(huge) out of the loss and the gradient."""
    case = make_case()
    case["weights"] = torch.tensor([0.0, 1.0, -1.0])
    case["old"] = case["old"].clone()
    case["old"][0, 0] = float("-inf")
    loss = rk.rspo_linear_loss(
        case["hidden"],
        case["weight"].requires_grad_(),
        case["ids"],
        case["weights"],
        case["mask"],
        old_logprobs=case["old"],
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(case["weight"].grad).all()


def test_strided_hidden_view_matches_the_contiguous_hidden():
    """``hidden[:, :-1]`` of a model output: read row by row; the extra position gets a zero gradient."""
    case = make_case()
    full = torch.cat([case["hidden"], torch.full((3, 1, 8), float("nan"))], dim=1)  # T + 1 positions
    h = full.clone().requires_grad_()
    loss = rk.rspo_linear_loss(h[:, :-1], case["weight"], case["ids"], case["weights"], case["mask"], **BLOCKS)
    loss.backward()
    h2 = case["hidden"].clone().requires_grad_()
    want = rk.rspo_linear_loss(h2, case["weight"], case["ids"], case["weights"], case["mask"], **BLOCKS)
    want.backward()
    assert torch.equal(loss, want)
    assert torch.equal(h.grad[:, :-1], h2.grad) and torch.all(h.grad[:, -1] == 0)


# --------------------------------------------------------------------------- API and validation


def test_rspo_linear_loss_module_matches_the_function():
    case = make_case()
    rewards = torch.tensor([1.0, 0.0, 1.0])
    crit = rk.RSPOLinearLoss("pass@k", k=2, loss_agg_mode="seq-mean-token-mean", return_stats=True, **BLOCKS)
    loss, stats = crit(
        case["hidden"],
        case["weight"],
        case["ids"],
        rewards,
        bias=case["bias"],
        group_size=3,
        mask=case["mask"],
        old_logprobs=case["old"],
    )
    w = rk.pass_at_k_weights(rewards[None], 2)[0]
    want, _ = rk.rspo_linear_loss(
        case["hidden"],
        case["weight"],
        case["ids"],
        w,
        case["mask"],
        bias=case["bias"],
        old_logprobs=case["old"],
        loss_agg_mode="seq-mean-token-mean",
        return_stats=True,
    )
    torch.testing.assert_close(loss, want)
    assert "clip_fraction" in stats


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"estimator": "bogus"}, ValueError, r"estimator='bogus' is not one of"),
        ({"inplace_backward": True}, TypeError, r"RSPOLinearLoss has no inplace_backward"),
        ({"temperature": "1"}, TypeError, r"temperature must be a real number"),
        ({"chunk_rows": 0}, ValueError, r"chunk_rows must be >= 1"),
        ({"vocab_block": 2.5}, TypeError, r"vocab_block must be an int"),
    ],
)
def test_module_rejects_bad_settings_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rk.RSPOLinearLoss("pass@k", k=2, **kwargs)


def test_module_accepts_numpy_integers():
    np = pytest.importorskip("numpy")
    crit = rk.RSPOLinearLoss("max@k", k=np.int64(2), max_response_length=np.int32(8))
    assert crit.k == 2 and crit.options.max_response_length == 8


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (
            lambda c: dict(c, weight=c["weight"].T.contiguous()),
            ValueError,
            r"lm_head must be \(V, H\) = \(vocab, 8\).*not its transpose",
        ),
        (
            lambda c: dict(c, weight=c["weight"].double()),
            TypeError,
            r"lm_head is torch.float64 but hidden is torch.float32",
        ),
        (lambda c: dict(c, bias=c["bias"][:-1]), ValueError, r"bias must be \(V,\) = \(37,\)"),
        (lambda c: dict(c, bias=c["bias"].half()), TypeError, r"bias is torch.float16 but hidden is torch.float32"),
        (lambda c: dict(c, weight=c["weight"].to("meta")), ValueError, r"lm_head is on meta"),
        (lambda c: dict(c, weight=[[0.0]]), TypeError, r"lm_head must be a torch.Tensor"),
        (lambda c: dict(c, hidden=c["hidden"].long()), TypeError, r"hidden must be float16, bfloat16"),
        (lambda c: dict(c, ids=c["ids"].masked_fill(c["mask"], 40)), ValueError, r"target_ids must lie in \[0, V=37\)"),
        (lambda c: dict(c, weights=torch.ones(4)), ValueError, r"weights must have shape"),
    ],
)
def test_validation_names_the_argument(change, exc, match):
    c = change(make_case())
    with pytest.raises(exc, match=match):
        rk.rspo_linear_loss(c["hidden"], c["weight"], c["ids"], c["weights"], c["mask"], bias=c["bias"])


def test_packed_seq_modes_need_cu_seqlens_and_horizon():
    c = make_case(packed=True)
    with pytest.raises(ValueError, match=r"packed \(N, D\) inputs need cu_seqlens"):
        rk.rspo_linear_loss(c["hidden"], c["weight"], c["ids"], c["old"] * 0 + 1, loss_agg_mode="seq-mean-token-sum")
    with pytest.raises(ValueError, match="pass max_response_length"):
        rk.rspo_linear_loss(
            c["hidden"],
            c["weight"],
            c["ids"],
            c["weights"],
            cu_seqlens=c["cu_seqlens"],
            loss_agg_mode="seq-mean-token-sum-norm",
        )


def test_docstring_examples():
    import doctest

    from rspo_kernels.loss import linear

    result = doctest.testmod(linear, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
