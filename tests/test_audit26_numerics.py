"""Issue 26, items 4-8: silent wrong results and NaN in the fused losses.

Every oracle is float64 autograd through the full, unfused logits (``torch.log_softmax`` of
``hidden @ W.T + b``), written here independently of the library's blocked code.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import rspo_kernels as rk
from rspo_kernels.loss.reference import rspo_loss_reference

F64 = torch.float64


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


# item 7: torch.compile with the entropy bonus -------------------------------------------------------
def _compile_case(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    B, T, H, V = 4, 5, 6, 11
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    W = torch.randn(V, H, generator=g, dtype=F64)
    bias = torch.randn(V, generator=g, dtype=F64)
    ids = torch.randint(0, V, (B, T), generator=g)
    # Two responses of weight 0 (an all-fail group): live tokens with zero policy gradient.
    weights = torch.tensor([1.5, 0.0, -0.5, 0.0], dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    logits = torch.nn.functional.linear(hidden, W, bias)
    true = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    old = true + 0.8 * torch.randn(B, T, generator=g, dtype=F64)  # many clipped tokens
    return hidden, W, bias, ids, weights, mask, old


def _compiled(fn, backend):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


@pytest.mark.parametrize("backend, form", [("aot_eager", "weight"), ("aot_eager", "module"), ("inductor", "weight")])
def test_compiled_linear_loss_entropy_gradient_at_zero_policy_gradient_tokens(backend, form):
    hidden, W, bias, ids, weights, mask, old = _compile_case()
    kw = dict(old_logprobs=old, epsilon_low=0.1, epsilon_high=0.1, entropy_coeff=0.37, chunk_rows=10, vocab_block=6)

    def head():
        if form == "weight":
            w, b = W.clone().requires_grad_(), bias.clone().requires_grad_()
            return (w, b), dict(lm_head=w, bias=b)
        lin = torch.nn.Linear(W.shape[1], W.shape[0], dtype=F64)
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(bias)
        return (lin.weight, lin.bias), dict(lm_head=lin)

    def step(h, lm_head, b):
        return rk.rspo_linear_loss(h, lm_head, ids, weights, mask, bias=b, **kw)

    # Oracle: float64 autograd through the full logits.
    h_ref = hidden.clone().requires_grad_()
    w_ref, b_ref = W.clone().requires_grad_(), bias.clone().requires_grad_()
    logits = torch.nn.functional.linear(h_ref, w_ref, b_ref)
    ent = _entropy(logits)
    m = mask.to(F64)
    pg = rspo_loss_reference(logits, ids, weights, mask, old_logprobs=old, epsilon_low=0.1, epsilon_high=0.1)
    want = pg - 0.37 * (ent * m).sum() / m.sum()
    want.backward()

    h = hidden.clone().requires_grad_()
    params, head_kw = head()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fn = _compiled(step, backend)
        loss = fn(h, head_kw["lm_head"], head_kw.get("bias"))
        loss.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(h.grad, h_ref.grad)
    torch.testing.assert_close(params[0].grad, w_ref.grad)
    torch.testing.assert_close(params[1].grad, b_ref.grad)


def test_compiled_token_logprobs_linear_entropy_gradient():
    hidden, W, bias, ids, weights, mask, old = _compile_case(seed=4)
    coef = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    coef[0] = 0.0  # zero log-prob gradient, nonzero entropy gradient

    def fn(h):
        lp, ent = rk.token_logprobs_linear(h, W, ids, bias=bias, mask=mask, return_entropy=True, vocab_block=4)
        return (coef * lp).sum() + ent.sum()

    h_ref = hidden.clone().requires_grad_()
    logits = torch.nn.functional.linear(h_ref, W, bias)
    lp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    ((coef * lp * mask).sum() + (_entropy(logits) * mask).sum()).backward()
    h = hidden.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _compiled(fn, "aot_eager")(h).backward()
    torch.testing.assert_close(h.grad, h_ref.grad)


# item 4: a constant logit offset costs no precision ------------------------------------------------
REL = 1e-4  # the bar: relative error in float32 at offsets up to 1e4
B4, T4, H4, V4, VB = 2, 3, 8, 40, 16  # several vocabulary blocks of VB


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the largest entry of the float64 oracle."""
    got, want = got.detach().double(), want.detach()
    return float((got - want).abs().max() / want.abs().max())


def _head_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B4, T4, H4, generator=g)
    W = 0.5 * torch.randn(V4, H4, generator=g)
    b = torch.randn(V4, generator=g)
    ids = torch.randint(0, V4, (B4, T4), generator=g)
    coef = torch.randn(B4, T4, generator=g, dtype=F64)
    return hidden, W, b, ids, coef


def _oracle(logits64: torch.Tensor, ids: torch.Tensor, coef: torch.Tensor):
    """float64 log-probs, entropies and the objective ``sum(coef * logp + H)`` (its gradient covers both)."""
    logp_all = torch.log_softmax(logits64, -1)
    lp = logp_all.gather(-1, ids[..., None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return lp, ent, (coef * lp + ent).sum()


@pytest.fixture(params=["torch", "triton"])
def logits_backend(request, monkeypatch):
    from loss_backends import HAS_TRITON

    from rspo_kernels._dispatch import BACKEND_ENV

    if request.param == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv(BACKEND_ENV, request.param)
    return request.param


@pytest.mark.parametrize("offset", [1e3, 1e4])
@pytest.mark.parametrize("padded", [False, True], ids=["whole", "vocab_size"])
def test_logits_entropy_and_its_gradient_ignore_a_constant_offset(logits_backend, offset, padded):
    if padded and logits_backend == "triton":
        pytest.skip("a padded vocabulary runs the chunked torch path only (the Triton backend refuses it)")
    hidden, W, b, ids, coef = _head_case()
    logits64 = torch.nn.functional.linear(hidden.double(), W.double(), b.double()) + offset
    x32 = logits64.float()
    if padded:  # garbage padding rows past vocab_size: masked
        x32 = torch.cat([x32, torch.full((B4, T4, 3), offset + 5.0)], -1)
    x = x32.clone().requires_grad_()
    lp, ent = rk.token_logprobs(x, ids, return_entropy=True, vocab_size=V4 if padded else None)
    (coef * lp + ent).sum().backward()
    ref = x32[..., :V4].double().requires_grad_()
    lp_want, ent_want, obj = _oracle(ref, ids, coef)
    obj.backward()
    assert _rel(ent, ent_want) <= REL
    assert _rel(lp, lp_want) <= REL
    assert _rel(x.grad[..., :V4], ref.grad) <= REL
    if padded:
        assert not x.grad[..., V4:].any()


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_logits_loss_entropy_bonus_and_entropy_mean_ignore_a_constant_offset(logits_backend, offset):
    hidden, W, b, ids, _ = _head_case(seed=1)
    x32 = (torch.nn.functional.linear(hidden.double(), W.double(), b.double()) + offset).float()
    weights = torch.tensor([0.7, -1.3])
    x = x32.clone().requires_grad_()
    loss, stats = rk.rspo_loss(x, ids, weights, entropy_coeff=0.5, return_stats=True)
    loss.backward()
    ref = x32.double().requires_grad_()
    pg = rspo_loss_reference(ref, ids, weights.double())
    ent = _entropy(ref)
    want = pg - 0.5 * ent.mean()
    want.backward()
    assert abs(loss.item() - want.item()) <= REL * abs(want.item())
    assert _rel(stats["entropy_mean"].reshape(1), ent.mean().detach().reshape(1)) <= REL
    assert _rel(x.grad, ref.grad) <= REL


def _linear_inputs(offset: float, pad: int = 0):
    hidden, W, b, ids, coef = _head_case(seed=2)
    b = (b.double() + offset).float()  # the offset arrives through the bias, as in a real head
    if pad:  # garbage rows past vocab_size
        W = torch.cat([W, torch.full((pad, H4), 3.0)])
        b = torch.cat([b, torch.full((pad,), offset + 9.0)])
    return hidden, W, b, ids, coef


def _linear_oracle(hidden, W, b, ids, coef):
    leaves = [hidden.double().requires_grad_(), W[:V4].double().requires_grad_(), b[:V4].double().requires_grad_()]
    lp, ent, obj = _oracle(torch.nn.functional.linear(*leaves), ids, coef)
    obj.backward()
    return lp.detach(), ent.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("pad", [0, 5], ids=["whole", "vocab_size"])
def test_linear_entropy_and_its_gradients_ignore_a_constant_offset(offset, pad):
    hidden, W, b, ids, coef = _linear_inputs(offset, pad)
    leaves = [t.clone().requires_grad_() for t in (hidden, W, b)]
    lp, ent = rk.token_logprobs_linear(
        leaves[0], leaves[1], ids, bias=leaves[2], return_entropy=True, vocab_block=VB, chunk_rows=4,
        vocab_size=V4 if pad else None,
    )  # fmt: skip
    (coef * lp + ent).sum().backward()
    lp_want, ent_want, grads = _linear_oracle(hidden, W, b, ids, coef)
    assert _rel(ent, ent_want) <= REL
    assert _rel(lp, lp_want) <= REL
    for name, t, want in zip(("hidden", "weight", "bias"), leaves, grads, strict=True):
        assert _rel(t.grad[:V4] if name != "hidden" else t.grad, want) <= REL, name
        if pad and name != "hidden":
            assert not t.grad[V4:].any(), name


@pytest.mark.parametrize("offset", [1e4])
def test_linear_loss_entropy_bonus_and_entropy_mean_ignore_a_constant_offset(offset):
    hidden, W, b, ids, _ = _linear_inputs(offset)
    weights = torch.tensor([0.7, -1.3])
    leaves = [t.clone().requires_grad_() for t in (hidden, W, b)]
    loss, stats = rk.rspo_linear_loss(
        leaves[0], leaves[1], ids, weights, bias=leaves[2], entropy_coeff=0.5, return_stats=True, vocab_block=VB
    )
    loss.backward()
    ref = [t.double().requires_grad_() for t in (hidden, W, b)]
    logits = torch.nn.functional.linear(*ref)
    ent = _entropy(logits)
    want = rspo_loss_reference(logits, ids, weights.double()) - 0.5 * ent.mean()
    want.backward()
    assert abs(loss.item() - want.item()) <= REL * abs(want.item())
    assert _rel(stats["entropy_mean"].reshape(1), ent.mean().detach().reshape(1)) <= REL
    for name, t, r in zip(("hidden", "weight", "bias"), leaves, ref, strict=True):
        assert _rel(t.grad, r.grad) <= REL, name


# item 5: a whole vocabulary block of -inf ------------------------------------------------------------
KEEP = torch.cat([torch.arange(VB), torch.arange(2 * VB, V4)])  # the columns that are not masked


def _masked_block_inputs():
    hidden, W, b, ids, coef = _head_case(seed=5)
    b = b.clone()
    b[VB : 2 * VB] = float("-inf")  # the second vocabulary block entirely: padded rows masked by the bias
    ids = ids % VB  # targets outside the masked block
    return hidden, W, b, ids, coef


def _unmasked_oracle(hidden, W, b, ids):
    """float64 leaves and logits over the finite columns only: masked ones have p = 0 exactly."""
    ref = [t.double().requires_grad_() for t in (hidden, W[KEEP], b[KEEP])]
    return ref, torch.nn.functional.linear(*ref)


def _scatter_cols(grad_kept: torch.Tensor) -> torch.Tensor:
    """The oracle's gradient rows for the kept columns, zeros at the masked ones."""
    out = torch.zeros((V4,) + tuple(grad_kept.shape[1:]), dtype=grad_kept.dtype)
    out[KEEP] = grad_kept
    return out


def test_linear_loss_with_a_whole_minus_inf_vocab_block_is_finite_and_exact():
    hidden, W, b, ids, coef = _masked_block_inputs()
    hidden, W, b = hidden.double(), W.double(), b.double()
    weights = torch.tensor([0.7, -1.3], dtype=F64)
    leaves = [t.clone().requires_grad_() for t in (hidden, W, b)]
    loss, stats = rk.rspo_linear_loss(
        leaves[0], leaves[1], ids, weights, bias=leaves[2], entropy_coeff=0.5, return_stats=True,
        vocab_block=VB, chunk_rows=4,
    )  # fmt: skip
    loss.backward()
    ref, logits = _unmasked_oracle(hidden, W, b, ids)
    ent = _entropy(logits)
    # ids index the kept columns unchanged: they are all < VB.
    want = rspo_loss_reference(logits, ids, weights) - 0.5 * ent.mean()
    want.backward()
    assert torch.isfinite(loss) and torch.isfinite(stats["entropy_mean"])
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(stats["entropy_mean"], ent.mean().detach())
    torch.testing.assert_close(leaves[0].grad, ref[0].grad)
    torch.testing.assert_close(leaves[1].grad, _scatter_cols(ref[1].grad))
    torch.testing.assert_close(leaves[2].grad, _scatter_cols(ref[2].grad))


def test_token_logprobs_linear_entropy_with_a_whole_minus_inf_vocab_block():
    hidden, W, b, ids, coef = _masked_block_inputs()
    leaves = [t.clone().requires_grad_() for t in (hidden, W, b)]
    lp, ent = rk.token_logprobs_linear(*leaves[:2], ids, bias=leaves[2], return_entropy=True, vocab_block=VB)
    (coef * lp + ent).sum().backward()
    ref, logits = _unmasked_oracle(hidden, W, b, ids)
    lp_want, ent_want, obj = _oracle(logits, ids, coef)
    obj.backward()
    torch.testing.assert_close(ent.double(), ent_want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.double(), lp_want.detach(), rtol=1e-5, atol=1e-6)
    wants = (ref[0].grad, _scatter_cols(ref[1].grad), _scatter_cols(ref[2].grad))
    for t, want in zip(leaves, wants, strict=True):
        assert torch.isfinite(t.grad).all()
        torch.testing.assert_close(t.grad.double(), want, rtol=1e-4, atol=1e-5)


def test_logits_paths_with_a_whole_minus_inf_vocab_block(logits_backend):
    hidden, W, b, ids, coef = _masked_block_inputs()
    x32 = torch.nn.functional.linear(hidden, W, b)
    for vocab_size in (None, V4 - 2):  # the padded path too (a chunked torch path of its own)
        if vocab_size is not None and logits_backend == "triton":
            continue
        n = V4 if vocab_size is None else vocab_size
        keep = KEEP[KEEP < n]
        x = x32.clone().requires_grad_()
        lp, ent = rk.token_logprobs(x, ids, return_entropy=True, vocab_size=vocab_size)
        (coef * lp + ent).sum().backward()
        ref = x32[..., keep].double().requires_grad_()
        lp_want, ent_want, obj = _oracle(ref, ids, coef)
        obj.backward()
        torch.testing.assert_close(ent.double(), ent_want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lp.double(), lp_want.detach(), rtol=1e-5, atol=1e-6)
        want = torch.zeros(x.shape, dtype=F64)
        want[..., keep] = ref.grad
        assert torch.isfinite(x.grad).all()
        torch.testing.assert_close(x.grad.double(), want, rtol=1e-4, atol=1e-5)


# item 4 under tensor parallelism: 2 gloo processes, each holding half of a padded vocabulary ---------
def _tp_offset_worker(rank: int, world: int, offset: float) -> None:
    import torch.distributed as dist

    group = dist.group.WORLD
    hidden, W, b, ids, coef = _linear_inputs(offset, pad=0)
    v_local = -(-V4 // world) + 1  # one padded row more than needed: the last rank holds garbage too
    W_pad = torch.cat([W, torch.full((v_local * world - V4, H4), 3.0)])
    b_pad = torch.cat([b, torch.full((v_local * world - V4,), offset + 9.0)])
    lo, hi = rank * v_local, (rank + 1) * v_local
    lp_want, ent_want, grads = _linear_oracle(hidden, W, b, ids, coef)
    tp = dict(tp_group=group, vocab_start=lo, vocab_size=V4)
    errors = []
    # The fused-linear path.
    leaves = [t.clone().requires_grad_() for t in (hidden, W_pad[lo:hi], b_pad[lo:hi])]
    lp, ent = rk.token_logprobs_linear(
        leaves[0], leaves[1], ids, bias=leaves[2], return_entropy=True, vocab_block=VB, chunk_rows=4, **tp
    )
    (coef * lp + ent).sum().backward()
    n_real = max(0, min(hi, V4) - lo)
    checks = [
        ("linear entropy", ent, ent_want),
        ("linear logp", lp, lp_want),
        ("linear d hidden", leaves[0].grad, grads[0]),
        ("linear d W", leaves[1].grad[:n_real], grads[1][lo : lo + n_real]),
        ("linear d b", leaves[2].grad[:n_real], grads[2][lo : lo + n_real]),
    ]
    # The logits path: this rank's slice of float32 logits with the offset in them.
    x32 = torch.nn.functional.linear(hidden.double(), W_pad.double(), b_pad.double()).float()
    x = x32[..., lo:hi].clone().requires_grad_()
    lp, ent = rk.token_logprobs(x, ids, return_entropy=True, **tp)
    (coef * lp + ent).sum().backward()
    ref = x32[..., :V4].double().requires_grad_()
    lp_w, ent_w, obj = _oracle(ref, ids, coef)
    obj.backward()
    checks += [
        ("logits entropy", ent, ent_w),
        ("logits logp", lp, lp_w),
        ("logits d logits", x.grad[..., :n_real], ref.grad[..., lo : lo + n_real]),
    ]
    for name, got, want in checks:
        if want.numel() and not _rel(got, want) <= REL:
            errors.append(f"rank {rank} {name}: relative error {_rel(got, want):.2e}")
    if not (x.grad[..., n_real:] == 0).all():
        errors.append(f"rank {rank}: padded columns got a gradient")
    assert not errors, errors


@pytest.mark.parametrize("offset", [1e4])
def test_tensor_parallel_entropy_ignores_a_constant_offset(offset):
    pytest.importorskip("torch.distributed")
    from dist_workers import spawn

    spawn(_tp_offset_worker, 2, offset, timeout=240.0)


# item 8: vocab_size larger than V without a tp_group -------------------------------------------------
def _vocab_size_calls():
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(2, 3, 4, generator=g)
    W = torch.randn(6, 4, generator=g)
    logits = hidden @ W.T
    ids = torch.tensor([[0, 7, 1], [2, 3, 4]])  # 7 is in [V, vocab_size) = [6, 9)
    w = torch.tensor([1.0, -1.0])
    return {
        "token_logprobs": lambda **kw: rk.token_logprobs(logits, ids, **kw),
        "rspo_loss": lambda **kw: rk.rspo_loss(logits, ids, w, **kw),
        "token_logprobs_linear": lambda **kw: rk.token_logprobs_linear(hidden, W, ids, **kw),
        "rspo_linear_loss": lambda **kw: rk.rspo_linear_loss(hidden, W, ids, w, **kw),
    }


@pytest.mark.parametrize("fn", ["token_logprobs", "rspo_loss", "token_logprobs_linear", "rspo_linear_loss"])
def test_vocab_size_above_the_rows_without_tp_group_is_refused(fn):
    call = _vocab_size_calls()[fn]
    with pytest.raises(ValueError, match=r"vocab_size=9 .*V=6.*tp_group"):
        call(vocab_size=9)
    # vocab_size == V is the whole vocabulary: id 7 is out of range there, an error too (not a NaN).
    with pytest.raises(ValueError, match="7"):
        call(vocab_size=6)


# item 6: a head module's own forward --------------------------------------------------------------
class _ScaledReadout(torch.nn.Linear):
    """A logit-scaling readout (as mup's ``MuReadout``): its forward is not ``nn.Linear.forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.25


def _head_module_calls(head):
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 3, 4, generator=g)
    ids = torch.randint(0, 5, (2, 3), generator=g)
    w = torch.tensor([1.0, -1.0])
    return [
        lambda: rk.token_logprobs_linear(hidden, head, ids),
        lambda: rk.rspo_linear_loss(hidden, head, ids, w, entropy_coeff=0.1),
        lambda: rk.RSPOLinearLoss("pass@k", k=2)(hidden, head, ids, torch.tensor([1.0, 0.0]), group_size=2),
    ]


def test_head_module_with_its_own_forward_is_refused():
    for call in _head_module_calls(_ScaledReadout(4, 5)):
        with pytest.raises(ValueError, match=r"_ScaledReadout has its own forward _ScaledReadout.forward"):
            call()
    head = torch.nn.Linear(4, 5)
    head.forward = lambda x: torch.nn.Linear.forward(head, x) * 2.0  # an instance override
    with pytest.raises(ValueError, match=r"lm_head module Linear has an instance forward"):
        _head_module_calls(head)[0]()


@pytest.mark.parametrize("kind", ["post", "pre"])
def test_head_module_with_a_forward_hook_is_refused(kind):
    head = torch.nn.Linear(4, 5)
    if kind == "post":
        head.register_forward_hook(lambda m, args, out: out * 3.0)
    else:
        head.register_forward_pre_hook(lambda m, args: (args[0] * 3.0,))
    for call in _head_module_calls(head):
        what = "forward pre-hook" if kind == "pre" else "forward hook"
        with pytest.raises(ValueError, match=rf"lm_head module Linear carries {what} .*<lambda>"):
            call()


def test_plain_linear_head_module_is_still_accepted():
    head = torch.nn.Linear(4, 5)
    for call in _head_module_calls(head):
        call()


def test_compiled_backward_stays_finite_at_a_zero_gradient_row_with_very_low_logits():
    """Compiled, rows without a gradient are computed from zeroed hidden states: exp() must not overflow there."""
    hidden, W, bias, ids, weights, mask, old = _compile_case(seed=9)
    W = torch.cat([W, torch.ones(W.shape[0], 1, dtype=F64)], -1)
    hidden = torch.cat([hidden, torch.zeros(hidden.shape[:-1] + (1,), dtype=F64)], -1)
    hidden[1, :, -1] = -1000.0  # response 1 (weight 0): every logit near -1000, far below the bias

    def step(h, w):
        return rk.rspo_linear_loss(h, w, ids, weights, mask, bias=bias, old_logprobs=old, chunk_rows=10, vocab_block=6)

    h_ref, w_ref = hidden.clone().requires_grad_(), W.clone().requires_grad_()
    logits = torch.nn.functional.linear(h_ref, w_ref, bias)
    rspo_loss_reference(logits, ids, weights, mask, old_logprobs=old).backward()
    h, w = hidden.clone().requires_grad_(), W.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _compiled(step, "aot_eager")(h, w).backward()
    torch.testing.assert_close(h.grad, h_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_compiled_backward_with_softcap_stays_finite_at_a_zero_gradient_row():
    """Compiled with a soft-cap, a row without a gradient has logits ``cap(bias) / T`` (up to ``c / T``).

    With ``c / T = 120`` exp() overflows float32 unless such rows are taken relative to that bound.
    """
    hidden, W, bias, ids, weights, mask, old = _compile_case(seed=9)
    bias = bias + 50.0  # the capped bias nears c = 30: logits near 30 / 0.25 = 120 at zeroed rows
    kw = dict(old_logprobs=old, temperature=0.25, logit_softcap=30.0)

    def step(h, w):
        return rk.rspo_linear_loss(h, w, ids, weights, mask, bias=bias.float(), chunk_rows=10, vocab_block=6, **kw)

    h_ref, w_ref = hidden.clone().requires_grad_(), W.clone().requires_grad_()
    logits = torch.nn.functional.linear(h_ref, w_ref, bias)
    rspo_loss_reference(logits, ids, weights, mask, **kw).backward()
    h, w = hidden.float().requires_grad_(), W.float().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _compiled(step, "aot_eager")(h, w).backward()
    torch.testing.assert_close(h.grad, h_ref.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, w_ref.grad.float(), rtol=1e-4, atol=1e-5)


# item 4 on the statistics path (issue 27 item 5): sum pi^2, top-k and multi-target log-probs ------
K_IDS, K_TOP = 3, 4


def _stats_oracle(logits64: torch.Tensor, ids_k: torch.Tensor, coef_k: torch.Tensor):
    """float64 multi-target log-probs, entropy, ``sum pi^2``, top-k and the objective ``sum(coef lp) + sum(H)``."""
    logp_all = torch.log_softmax(logits64, -1)
    p = logp_all.exp()
    lp = logp_all.gather(-1, ids_k)
    ent = -(p * torch.where(p > 0, logp_all, torch.zeros((), dtype=F64))).sum(-1)
    top_v, top_i = torch.topk(logp_all, K_TOP, dim=-1)
    return lp, ent, (p * p).sum(-1), top_v, top_i, (coef_k * lp).sum() + ent.sum()


def _stats_ids(seed: int, banned: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids_k = torch.randint(banned, V4, (B4, T4, K_IDS), generator=g)
    coef_k = torch.randn(B4, T4, K_IDS, generator=g, dtype=F64)
    return ids_k, coef_k


def _check_stats(st, want, leaves_grads):
    lp, ent, spi2, top_v, top_i, _ = want
    assert _rel(st.logprobs, lp) <= REL
    assert _rel(st.entropy, ent) <= REL
    assert _rel(st.sum_pi_squared, spi2) <= REL
    assert _rel(st.topk_logprobs, top_v) <= REL
    assert torch.equal(st.topk_ids, top_i)
    for name, got, grad in leaves_grads:
        assert torch.isfinite(got).all(), name
        assert _rel(got, grad) <= REL, name


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
def test_logits_stats_ignore_a_constant_offset(offset):
    hidden, W, b, _, _ = _head_case(seed=3)
    ids_k, coef_k = _stats_ids(3)
    x32 = (torch.nn.functional.linear(hidden.double(), W.double(), b.double()) + offset).float()
    x = x32.clone().requires_grad_()
    st = rk.token_logprobs(x, ids_k, return_entropy=True, return_sum_pi_squared=True, topk=K_TOP)
    ((coef_k * st.logprobs).sum() + st.entropy.sum()).backward()
    ref = x32.double().requires_grad_()
    want = _stats_oracle(ref, ids_k, coef_k)
    want[-1].backward()
    _check_stats(st, want, [("logits", x.grad, ref.grad)])


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
def test_linear_stats_ignore_a_constant_offset(offset):
    hidden, W, b, _, _ = _linear_inputs(offset)  # the offset arrives through the bias
    ids_k, coef_k = _stats_ids(4)
    leaves = [t.clone().requires_grad_() for t in (hidden, W, b)]
    st = rk.token_logprobs_linear(
        leaves[0], leaves[1], ids_k, bias=leaves[2], return_entropy=True, return_sum_pi_squared=True, topk=K_TOP,
        vocab_block=VB, chunk_rows=4,
    )  # fmt: skip
    ((coef_k * st.logprobs).sum() + st.entropy.sum()).backward()
    refs = [t.double().requires_grad_() for t in (hidden, W, b)]
    want = _stats_oracle(torch.nn.functional.linear(*refs), ids_k, coef_k)
    want[-1].backward()
    names = ("hidden", "weight", "bias")
    _check_stats(st, want, [(n, t.grad, r.grad) for n, t, r in zip(names, leaves, refs, strict=True)])


def test_linear_stats_with_a_whole_minus_inf_vocab_block_are_finite_and_exact():
    """The first vocabulary block is masked by a ``-inf`` bias: it adds 0, never NaN (ids avoid it)."""
    hidden, W, b, _, _ = _head_case(seed=5)
    b = b.clone()
    b[:VB] = float("-inf")
    ids_k, coef_k = _stats_ids(5, banned=VB)
    leaves = [t.double().requires_grad_() for t in (hidden, W, b)]
    st = rk.token_logprobs_linear(
        leaves[0], leaves[1], ids_k, bias=leaves[2], return_entropy=True, return_sum_pi_squared=True, topk=K_TOP,
        vocab_block=VB, chunk_rows=4,
    )  # fmt: skip
    ((coef_k * st.logprobs).sum() + st.entropy.sum()).backward()
    refs = [t.double().requires_grad_() for t in (hidden, W, b)]
    want = _stats_oracle(torch.nn.functional.linear(*refs), ids_k, coef_k)
    want[-1].backward()
    grads = [(n, t.grad, r.grad) for n, t, r in zip(("hidden", "weight"), leaves[:2], refs[:2], strict=True)]
    # The masked bias entries: gradient 0 (p = 0), the oracle's too.
    grads.append(("bias", leaves[2].grad, torch.nan_to_num(refs[2].grad)))
    _check_stats(st, want, grads)


def test_logits_stats_with_a_whole_minus_inf_block_are_finite_and_exact():
    hidden, W, b, _, _ = _head_case(seed=6)
    x64 = torch.nn.functional.linear(hidden.double(), W.double(), b.double())
    x64[..., :VB] = float("-inf")
    ids_k, coef_k = _stats_ids(6, banned=VB)
    x = x64.clone().requires_grad_()
    st = rk.token_logprobs(x, ids_k, return_entropy=True, return_sum_pi_squared=True, topk=K_TOP)
    ((coef_k * st.logprobs).sum() + st.entropy.sum()).backward()
    ref = x64.clone().requires_grad_()
    want = _stats_oracle(ref, ids_k, coef_k)
    want[-1].backward()
    _check_stats(st, want, [("logits", x.grad, torch.nan_to_num(ref.grad))])
