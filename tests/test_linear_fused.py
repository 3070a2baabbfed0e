"""The one-pass fused-linear loss (issue 28): gradients formed in forward, three matmuls instead of four.

Every expected value comes from the float64 unfused computation (``logits = hidden @ W.T + b`` and
:func:`rspo_kernels.loss.reference.rspo_loss_reference`, differentiated by autograd) on the same
rounded inputs. A counter on :class:`~rspo_kernels.loss.linear_fused.LinearFusedLoss` checks which
route served each call.
"""

from __future__ import annotations

import pytest
import torch
from test_loss_linear import BLOCKS, UNIT, assert_grad_close, make_case, run_linear, run_reference

import rspo_kernels as rk
from rspo_kernels.loss import linear_fused
from rspo_kernels.loss.options import LOSS_AGG_MODES
from rspo_kernels.loss.reference import rspo_loss_reference
from rspo_kernels.ops._grid import MAX_GRID_X, MAX_GRID_YZ, row_grid

F64 = torch.float64


@pytest.fixture
def routes(monkeypatch):
    """Counts the calls served by the one-pass Function."""
    calls = {"one_pass": 0}
    real = linear_fused.LinearFusedLoss.forward

    def counted(*a, **k):
        calls["one_pass"] += 1
        return real(*a, **k)

    monkeypatch.setattr(linear_fused.LinearFusedLoss, "forward", staticmethod(counted))
    return calls


def _kw(mode, packed, **extra):
    kw = dict(
        loss_agg_mode=mode,
        temperature=0.7,
        epsilon_high=0.28,
        clip_ratio_c=3.0,
        beta=0.05,
        entropy_coeff=0.03,
        return_stats=True,
    )
    if packed and mode == "seq-mean-token-sum-norm":
        kw["max_response_length"] = 5
    kw.update(extra)
    return kw


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_one_pass_equals_float64_reference_in_every_mode(routes, mode, packed):
    case = make_case(dtype=F64, packed=packed)
    case["weights"] = torch.tensor([0.0, 1.0, -0.7], dtype=F64)  # a zero-weight response: g = 0, g_H != 0
    kw = _kw(mode, packed)
    (loss, stats), grads = run_linear(case, **BLOCKS, **kw)
    (loss_r, stats_r), grads_r = run_reference(case, **kw)
    assert routes["one_pass"] == 1
    torch.testing.assert_close(loss, loss_r, rtol=1e-12, atol=1e-12)
    assert set(stats) == set(stats_r)
    for k in stats_r:
        torch.testing.assert_close(stats[k].double(), stats_r[k].double(), rtol=1e-12, atol=1e-12, msg=k)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, grads_r, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-13, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("entropy_coeff", [0.0, 0.05])
def test_one_pass_half_and_single_precision(routes, dtype, entropy_coeff):
    """float32 accumulation whatever the input dtype; each gradient entry rounded once."""
    case = make_case(dtype=dtype)
    kw = _kw("token-mean", False, entropy_coeff=entropy_coeff, return_stats=False)
    loss, grads = run_linear(case, **BLOCKS, **kw)
    loss_r, grads_r = run_reference(case, **kw)
    assert routes["one_pass"] == 1 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), loss_r, rtol=2e-5, atol=2e-5)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, grads_r, strict=True):
        assert g.dtype == dtype
        assert_grad_close(g, r, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_scaling_rounds_once_after_the_scale(routes, dtype):
    """fp16 / bf16: the scaled gradient keeps every entry the float64 gradient times the scale keeps."""
    case = make_case(dtype=dtype)
    case["weights"] = case["weights"] * 1e-3
    h, w, b = (case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    kw = dict(bias=b, old_logprobs=case["old"], ref_logprobs=case["ref"], beta=0.05, entropy_coeff=0.02)
    loss = rk.rspo_linear_loss(h, w, case["ids"], case["weights"], case["mask"], **kw, **BLOCKS)
    (loss * 65536.0).backward()
    _, grads_r = run_reference(case, beta=0.05, entropy_coeff=0.02)
    for name, g, r in zip(("hidden", "weight", "bias"), (h.grad, w.grad, b.grad), grads_r, strict=True):
        assert_grad_close(g, r * 65536.0, dtype, f"scaled d{name}")
        kept = (r * 65536.0).abs() > 2.0**-24
        assert bool((g[kept] != 0).all()), f"scaled d{name} flushed entries to zero"
    assert routes["one_pass"] == 1


def _leaves(case):
    return [case[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]


def _loss(case, h, w, b, **kw):
    return rk.rspo_linear_loss(
        h,
        w,
        case["ids"],
        case["weights"],
        case["mask"],
        bias=b,
        old_logprobs=case["old"],
        entropy_coeff=0.05,
        temperature=0.7,
        **BLOCKS,
        **kw,
    )


def test_grad_output_and_retain_graph_twice(routes):
    case = make_case(dtype=F64)
    h, w, b = _leaves(case)
    loss = _loss(case, h, w, b)
    loss.backward(retain_graph=True)
    once = [t.grad.clone() for t in (h, w, b)]
    loss.backward(torch.tensor(-2.5, dtype=F64), retain_graph=True)  # the saved gradients, scaled
    for t, g1 in zip((h, w, b), once, strict=True):
        torch.testing.assert_close(t.grad, -1.5 * g1, rtol=1e-14, atol=1e-16)
    loss.backward(torch.tensor(4.0, dtype=F64))  # the last backward may scale in place
    for t, g1 in zip((h, w, b), once, strict=True):
        torch.testing.assert_close(t.grad, 2.5 * g1, rtol=1e-14, atol=1e-16)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    _, grads_r = run_reference(case, entropy_coeff=0.05, temperature=0.7)
    for g1, r in zip(once, grads_r, strict=True):
        torch.testing.assert_close(g1, r, rtol=1e-11, atol=1e-13)
    h2, w2, b2 = _leaves(case)
    (0.25 * _loss(case, h2, w2, b2)).backward()  # grad_output != 1 reaching the Function directly
    for t, g1 in zip((h2, w2, b2), once, strict=True):
        torch.testing.assert_close(t.grad, 0.25 * g1, rtol=1e-14, atol=1e-16)
    assert routes["one_pass"] == 2


def test_loss_feeding_more_graph_and_a_non_leaf_hidden(routes):
    """The loss need not be the last node: what comes after scales its gradients; hidden may be computed."""
    case = make_case(dtype=F64)
    base, w, b = _leaves(case)
    h = base * 2.0
    loss = _loss(case, h, w, b)
    (loss**2 + loss).backward()
    ref_h, ref_w, ref_b = _leaves(case)
    ref = rspo_loss_reference(
        torch.nn.functional.linear(ref_h * 2.0, ref_w, ref_b),
        case["ids"],
        case["weights"],
        case["mask"],
        old_logprobs=case["old"].double(),
        entropy_coeff=0.05,
        temperature=0.7,
    )
    (ref**2 + ref).backward()
    for got, want in zip((base, w, b), (ref_h, ref_w, ref_b), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-11, atol=1e-13)


def test_no_grad_and_no_input_requiring_grad_take_the_forward_only_route(routes):
    case = make_case(dtype=F64)
    with torch.no_grad():
        a = _loss(case, case["hidden"], case["weight"], case["bias"])
    b = _loss(case, case["hidden"], case["weight"], case["bias"])  # nothing requires grad
    assert routes["one_pass"] == 0 and not a.requires_grad and not b.requires_grad
    want, _ = run_reference(case, entropy_coeff=0.05, temperature=0.7)
    torch.testing.assert_close(a, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", ["hidden", "weight", "bias"])
def test_only_the_gradients_asked_for(routes, which):
    case = make_case(dtype=F64)
    leaves = {k: case[k].clone().requires_grad_(k == which) for k in ("hidden", "weight", "bias")}
    _loss(case, leaves["hidden"], leaves["weight"], leaves["bias"]).backward()
    _, grads_r = run_reference(case, entropy_coeff=0.05, temperature=0.7)
    for k, r in zip(("hidden", "weight", "bias"), grads_r, strict=True):
        if k == which:
            torch.testing.assert_close(leaves[k].grad, r, rtol=1e-11, atol=1e-13)
        else:
            assert leaves[k].grad is None
    assert routes["one_pass"] == 1


def test_create_graph_refuses_clearly(routes):
    case = make_case(dtype=F64)
    h, w, b = _leaves(case)
    with pytest.raises(RuntimeError, match="create_graph=True.*RSPO_KERNELS_BACKEND=reference"):
        torch.autograd.grad(_loss(case, h, w, b), h, create_graph=True)


def test_module_head_runs_the_one_pass_route_as_its_forward(routes, monkeypatch):
    import rspo_kernels.loss.linear as rk_linear

    case = make_case(dtype=F64)
    head = torch.nn.Linear(8, 37, dtype=F64)
    with torch.no_grad():
        head.weight.copy_(case["weight"])
        head.bias.copy_(case["bias"])
    seen = []
    real = rk_linear.forward_redirect

    def redirect(module, fn, *args):
        out = real(module, fn, *args)
        seen.append(type(out).__name__)
        return out

    monkeypatch.setattr(rk_linear, "forward_redirect", redirect)
    h = case["hidden"].clone().requires_grad_()
    loss, stats = rk.rspo_linear_loss(
        h, head, case["ids"], case["weights"], case["mask"], old_logprobs=case["old"], return_stats=True, **BLOCKS
    )
    loss.backward()
    assert routes["one_pass"] == 1 and seen == ["tuple"]
    (loss_r, stats_r), (gh, gw, gb) = run_reference(case, return_stats=True)
    # run_reference passes ref log-probs without beta: no effect on the loss.
    torch.testing.assert_close(loss, loss_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats["clip_fraction"], stats_r["clip_fraction"])
    for got, want in ((h.grad, gh), (head.weight.grad, gw), (head.bias.grad, gb)):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


def test_a_loss_that_is_not_token_local_takes_the_two_pass_route(routes, monkeypatch):
    case = make_case(dtype=F64)
    kw = _kw("seq-mean-token-mean", False)
    (loss1, _), grads1 = run_linear(case, **BLOCKS, **kw)
    monkeypatch.setattr(linear_fused, "is_token_local", lambda options: False)
    (loss2, _), grads2 = run_linear(case, **BLOCKS, **kw)
    assert routes["one_pass"] == 1  # the first call only
    torch.testing.assert_close(loss1, loss2, rtol=1e-13, atol=1e-14)
    for a, b in zip(grads1, grads2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_torch_func_takes_the_two_pass_route(routes):
    case = make_case(dtype=F64)
    g = torch.func.grad(lambda h: _loss(case, h, case["weight"], case["bias"]))(case["hidden"])
    assert routes["one_pass"] == 0
    _, grads_r = run_reference(case, entropy_coeff=0.05, temperature=0.7)
    torch.testing.assert_close(g, grads_r[0], rtol=1e-11, atol=1e-13)


# ------------------------------------------------------------------------------- numerics
def test_constant_logit_offset_costs_no_precision(routes):
    """Entropy and its gradient are accumulated relative to the row maximum (float32, offset 1e4)."""
    case = make_case(dtype=torch.float32)
    shifted = dict(case, bias=case["bias"] + 1e4)  # softmax unchanged; absolute logits near 1e4
    kw = dict(entropy_coeff=0.05, return_stats=True)
    (loss, stats), grads = run_linear(shifted, **BLOCKS, **kw)
    (loss_r, stats_r), grads_r = run_reference(case, **kw)
    assert routes["one_pass"] == 1
    ent, ent_r = float(stats["entropy_mean"]), float(stats_r["entropy_mean"])
    assert abs(ent - ent_r) <= 1e-4 * abs(ent_r)
    # The float32 logits themselves carry |x| * 2^-24 ~ 6e-4 of rounding at 1e4: the loss and the
    # gradients can be no closer than that, whatever the accumulation (the entropy can).
    torch.testing.assert_close(loss.double(), loss_r, rtol=2e-3, atol=2e-3)
    for name, g, r in zip(("hidden", "weight"), grads[:2], grads_r[:2], strict=False):
        torch.testing.assert_close(g.double(), r, rtol=0, atol=5e-3 * float(r.abs().max()), msg=name)


def test_minus_inf_bias_on_padded_vocabulary_rows(routes):
    """A -inf bias masks vocabulary rows: probability 0, no NaN, the rest as if they were absent."""
    case = make_case(dtype=F64)
    V = case["weight"].shape[0]
    real = 30  # rows 30..36 are padding, a whole vocab_block of 7 among them
    case["ids"] = torch.where(case["mask"], case["ids"] % real, case["ids"])
    bias = case["bias"].clone()
    bias[real:] = float("-inf")
    padded = dict(case, bias=bias)
    kw = dict(entropy_coeff=0.05, return_stats=True)
    (loss, stats), (gh, gw, gb) = run_linear(padded, **BLOCKS, **kw)
    trimmed = dict(case, weight=case["weight"][:real], bias=case["bias"][:real])
    (loss_r, stats_r), (rh, rw, rb) = run_reference(trimmed, **kw)
    assert routes["one_pass"] == 1 and V > real
    torch.testing.assert_close(loss, loss_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats["entropy_mean"], stats_r["entropy_mean"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rh, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(gw[:real], rw, rtol=1e-11, atol=1e-13)
    assert torch.all(gw[real:] == 0) and torch.all(gb[real:] == 0)
    torch.testing.assert_close(gb[:real], rb, rtol=1e-11, atol=1e-13)


def test_65536_tokens_in_one_call(routes):
    """Long context: 65,536 response tokens, a fifth padding, entropy bonus; value and gradients vs float64."""
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 4, 16384, 16, 64
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    lengths = torch.tensor([T, T - T // 5 * 2, T - T // 5, T - T // 5])  # a fifth of the tokens padded
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ids = torch.randint(0, V, (B, T), generator=g)
    weights = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) * 0.2 - 4.0
    assert B * T == 65536 and abs(float(1 - mask.float().mean()) - 0.2) < 0.01
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = rk.rspo_linear_loss(h, w, ids, weights, mask, old_logprobs=old, entropy_coeff=0.01)
    loss.backward()
    assert routes["one_pass"] == 1
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss_r = rspo_loss_reference(
        h64 @ w64.T, ids, weights.double(), mask, old_logprobs=old.double(), entropy_coeff=0.01
    )
    loss_r.backward()
    torch.testing.assert_close(loss.double(), loss_r.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5 * float(h64.grad.abs().max()))
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5 * float(w64.grad.abs().max()))
    assert torch.all(h.grad[~mask] == 0)


def test_default_row_blocks_fit_the_budget():
    cpu = torch.device("cpu")
    assert linear_fused.fused_rows(32000, cpu) == 256  # 256 x 32000 float32 = 31.25 MiB <= 32 MiB
    assert linear_fused.fused_rows(8192, cpu) == 1024
    assert linear_fused.fused_rows(10**8, cpu) == 1
    assert linear_fused.fused_rows(1, cpu) % 16 == 0
    assert linear_fused.fused_rows(32000, torch.device("cuda")) * 32000 * 4 <= 256 << 20
    assert UNIT  # the tolerances shared with test_loss_linear


# ------------------------------------------------------------------------------- Triton grids
@pytest.mark.parametrize("n", [1, 2**16 - 1, 2**16, 2**20, 2**20 + 1, 2**24, 2**31 - 1])
def test_row_grid_stays_within_cuda_limits(n):
    grid = row_grid(n)
    assert 1 <= len(grid) <= 3
    assert grid[0] <= MAX_GRID_X and all(d <= MAX_GRID_YZ for d in grid[1:])
    programs = 1
    for d in grid:
        programs *= d
    assert programs == n  # one program per row, none lost, none extra


def test_row_grid_refuses_what_no_launch_can_hold():
    with pytest.raises(ValueError, match="exceed CUDA's grid limit of 2147483647.*split the call"):
        row_grid(2**31)
    with pytest.raises(ValueError, match="at least one token rows, got 0"):
        row_grid(0)


def test_the_triton_launchers_use_row_grid():
    """Every per-row launch goes through row_grid (read from the source: no GPU needed)."""
    import inspect

    pytest.importorskip("triton")
    from rspo_kernels.ops import token_logprobs, weights

    for mod in (token_logprobs, weights):
        src = inspect.getsource(mod)
        launches = [line for line in src.splitlines() if "_kernel[" in line]
        assert launches and all("row_grid(" in line for line in launches), mod.__name__


# ------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule", ["cpu_pipeline", "one_block_at_a_time"])
@pytest.mark.parametrize("tile", [16, 37])
@pytest.mark.parametrize("chunk_rows", [3, 4, 16])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_both_schedules_over_head_tiles_and_ragged_blocks(routes, monkeypatch, schedule, tile, chunk_rows, layout):
    """The CPU schedule (a tile of the head serves block i's gradients and block i+1's logits) and the
    GPU one (a block at a time), on CPU, against float64: tiles of 16 over V = 37 (16, 16, 5) or one
    tile; blocks of 3 or 4 live tokens with a ragged last one, or a single block; padding; entropy."""
    H = 8
    monkeypatch.setattr(linear_fused, "_TILE_BYTES", tile * 4 * H)
    if schedule == "one_block_at_a_time":
        monkeypatch.setitem(linear_fused._SCHEDULES, "cpu", linear_fused._one_block_at_a_time)
    assert linear_fused.vocab_tile(H, True) == tile
    case = make_case(B=3, T=6 if layout == "strided" else 5, H=H, dtype=F64)
    if layout == "strided":  # hidden[:, :-1]: rows gathered, not viewed
        for k in ("ids", "mask", "old", "ref"):
            case[k] = case[k][:, :-1]
        full = case["hidden"]
        case["hidden"] = full[:, :-1]
    kw = _kw("token-mean", False, return_stats=False)
    loss, grads = run_linear(case, chunk_rows=chunk_rows, **kw)
    loss_r, grads_r = run_reference(case, **kw)
    assert routes["one_pass"] == 1
    torch.testing.assert_close(loss, loss_r, rtol=1e-12, atol=1e-12)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, grads_r, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-13, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_schedule_up_casts_a_half_head_tile_by_tile(routes, monkeypatch, dtype):
    monkeypatch.setattr(linear_fused, "_TILE_BYTES", 4 * 16 * 4 * 8)  # a half head: a quarter, 16 rows
    assert linear_fused.vocab_tile(8, False) == 16
    case = make_case(dtype=dtype)
    kw = _kw("token-mean", False, return_stats=False)
    loss, grads = run_linear(case, chunk_rows=4, **kw)
    loss_r, grads_r = run_reference(case, **kw)
    assert routes["one_pass"] == 1
    torch.testing.assert_close(loss.double(), loss_r, rtol=2e-5, atol=2e-5)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, grads_r, strict=True):
        assert g.dtype == dtype
        assert_grad_close(g, r, dtype, name)
