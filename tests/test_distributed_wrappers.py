"""The fused-linear loss under DDP, FSDP2 and DeepSpeed ZeRO-3, and the head given as a module.

Multi-process checks run on gloo in float64 on fresh spawned processes (one spawn per family of
scenarios, see tests/dist_workers.py) against the single-process gradient of the same global
batch. Single-process checks of the head-module path and of forward_redirect come first.
"""

from __future__ import annotations

import dist_workers as dw
import pytest
import torch

import rspo_kernels as rk
import rspo_kernels.distributed
from rspo_kernels.distributed import forward_redirect, inner_module

needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


# ---- the head given as a module, single process -----------------------------------------------


def _head_case(bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(6, 11, bias=bias).double()
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    hidden = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.rand(2, 5, generator=g) < 0.7
    mask[:, 0] = True
    weights = torch.tensor([0.7, -1.3], dtype=torch.float64)
    old = torch.randn(2, 5, generator=g, dtype=torch.float64) - 2.0
    return head, hidden, ids, mask, weights, old


def _grads(loss: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, xs))


@pytest.mark.parametrize("bias", [True, False])
def test_head_module_equals_the_logits_path(bias):
    """Module in, the same loss, log-probs, entropies and gradients as the logits of ``head(hidden)``."""
    head, hidden, ids, mask, weights, old = _head_case(bias)
    hidden.requires_grad_(True)
    params = list(head.parameters())
    kw = dict(old_logprobs=old, temperature=0.8, chunk_rows=3, vocab_block=4)
    got = rk.rspo_linear_loss(hidden, head, ids, weights, mask, **kw)
    want = rk.rspo_loss(head(hidden), ids, weights, mask, **{k: kw[k] for k in ("old_logprobs", "temperature")})
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, w in zip(_grads(got, hidden, *params), _grads(want, hidden, *params), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)

    logp, ent = rk.token_logprobs_linear(hidden, head, ids, mask=mask, return_entropy=True, temperature=0.8)
    want_logp, want_ent = rk.token_logprobs(head(hidden), ids, temperature=0.8, return_entropy=True)
    torch.testing.assert_close(logp, want_logp.masked_fill(~mask, 0.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(ent[mask], want_ent[mask], rtol=0, atol=1e-12)

    crit = rk.RSPOLinearLoss("pass@k", k=2, temperature=0.8)
    rewards = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(
        crit(hidden, head, ids, rewards, group_size=2, mask=mask),
        crit(hidden, head.weight, ids, rewards, group_size=2, mask=mask, bias=head.bias),
        rtol=0,
        atol=0,
    )


def test_head_module_runs_as_its_forward_and_is_restored():
    """Hooks see the hidden states go in and the log-probs come out; the module's forward is left as it was.

    Global module hooks observe the call: hooks registered on the head itself are refused unless
    they are FSDP2's or ZeRO-3's own (they could change the output the fused op skips; issue 26).
    """
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    head, hidden, ids, mask, weights, _ = _head_case()
    seen: list[tuple[str, object]] = []
    pre = register_module_forward_pre_hook(lambda m, args: seen.append(("pre", args[0])) if m is head else None)
    post = register_module_forward_hook(lambda m, args, out: seen.append(("post", out)) if m is head else None)
    logp = rk.token_logprobs_linear(hidden, head, ids, mask=mask)
    pre.remove()
    post.remove()
    assert [k for k, _ in seen] == ["pre", "post"]
    assert seen[0][1] is hidden
    out = seen[1][1]
    assert isinstance(out, tuple) and out[1] is None
    torch.testing.assert_close(out[0].view(2, 5), logp, rtol=0, atol=0)
    assert "forward" not in head.__dict__
    torch.testing.assert_close(head(hidden), hidden @ head.weight.T + head.bias)


def test_head_module_errors_name_the_fix():
    head, hidden, ids, mask, weights, _ = _head_case()
    with pytest.raises(ValueError, match=r"bias= must not be given with an lm_head module \(Linear\)"):
        rk.rspo_linear_loss(hidden, head, ids, weights, bias=head.bias)
    with pytest.raises(TypeError, match=r"Sequential has parameters \['0.weight', '0.bias'\]"):
        rk.token_logprobs_linear(hidden, torch.nn.Sequential(head), ids)
    with pytest.raises(ValueError, match=r"lm_head.weight must be \(V, H\) = \(vocab, 6\).*got shape \(11, 4\)"):
        rk.token_logprobs_linear(hidden, torch.nn.Linear(4, 11).double(), ids)
    with pytest.raises(TypeError, match="lm_head is torch.float32 but hidden is torch.float64"):
        rk.rspo_linear_loss(hidden, torch.nn.Linear(6, 11), ids, weights)
    with pytest.raises(TypeError, match="lm_head must be a torch.Tensor .* or the torch.nn.Module owning it"):
        rk.token_logprobs_linear(hidden, "lm_head", ids)
    assert "forward" not in head.__dict__  # an error inside the redirected forward restores it too


def test_zero3_placeholder_stand_in_is_rejected_as_a_bare_weight():
    """A tensor carrying DeepSpeed's partition attributes (the real one is checked in the ZeRO-3 spawn)."""
    head, hidden, ids, mask, weights, _ = _head_case()
    placeholder = torch.nn.Parameter(torch.empty(0, dtype=torch.float64))
    placeholder.ds_id, placeholder.ds_shape = 3, torch.Size([11, 6])
    placeholder.ds_status = type("ZeroParamStatus", (), {"name": "NOT_AVAILABLE"})()
    with pytest.raises(
        ValueError, match=r"ZeRO-3 partitioned parameter \(shape \(11, 6\), 0 elements.*pass the module"
    ):
        rk.rspo_linear_loss(hidden, placeholder, ids, weights)
    with pytest.raises(ValueError, match=r"bias is a DeepSpeed ZeRO-3 partitioned parameter"):
        rk.token_logprobs_linear(hidden, head.weight, ids, bias=placeholder)


# ---- forward_redirect, single process ---------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x)


class _Wrapper(torch.nn.Module):
    """Stands in for DDP: ``forward`` prepares something, then calls ``self.module``."""

    def __init__(self, module, call_inner=True):
        super().__init__()
        self.module, self.call_inner, self.prepared = module, call_inner, 0

    def forward(self, *args, **kwargs):
        self.prepared += 1
        return self.module(*args, **kwargs) if self.call_inner else None


def test_forward_redirect_runs_fn_inside_the_forward_and_restores_it():
    net = _Net()
    calls = []
    net.register_forward_hook(lambda m, a, out: calls.append(("hook", out)))

    def fn(x, *, scale):
        calls.append(("fn", x))
        return net.lin(x) * scale, net(x)  # fn may call the model's real forward itself

    x = torch.ones(1, 2)
    out = forward_redirect(net, fn, x, scale=2.0)
    assert [k for k, _ in calls] == ["fn", "hook", "hook"]  # the real forward's hook, then the redirected one
    assert calls[-1][1] is out
    torch.testing.assert_close(out[0], 2 * net(x))
    assert "forward" not in net.__dict__
    patched = lambda x: "patched"  # noqa: E731  (accelerate and others patch an instance forward)
    net.forward = patched
    assert forward_redirect(net, lambda: "fn") == "fn"
    assert net.__dict__["forward"] is patched and net(x) == "patched"


def test_forward_redirect_through_a_wrapper(monkeypatch):
    net = _Net()
    assert inner_module(_Wrapper(net)) is not net  # an unknown class is not trusted to call .module
    monkeypatch.setattr(rspo_kernels.distributed, "_wrapper_types", lambda: (_Wrapper,))
    wrapper = _Wrapper(net)
    assert inner_module(wrapper) is net
    assert forward_redirect(wrapper, lambda x: x + 1, 1) == 2 and wrapper.prepared == 1
    assert "forward" not in net.__dict__
    with pytest.raises(RuntimeError, match=r"_Wrapper.forward did not call its inner module _Net"):
        forward_redirect(_Wrapper(net, call_inner=False), lambda: 1)
    assert "forward" not in net.__dict__


def test_forward_redirect_errors():
    net = _Net()
    with pytest.raises(RuntimeError, match="boom"):
        forward_redirect(net, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert "forward" not in net.__dict__
    with pytest.raises(TypeError, match="wrapper must be a torch.nn.Module"):
        forward_redirect(lambda: 0, lambda: 1)
    with pytest.raises(TypeError, match="fn must be callable"):
        forward_redirect(net, 3)


# ---- several processes ------------------------------------------------------------------------


@needs_dist
def test_ddp_gradients_and_replicas_match_single_process():
    dw.spawn(dw.ddp_worker, 2, timeout=120)


@needs_dist
def test_fsdp2_gradients_match_single_process():
    dw.spawn(dw.fsdp2_worker, 2, timeout=120)


@needs_dist
@pytest.mark.slow  # DeepSpeed takes ~10 s of CPU to import in each process
def test_zero3_gathers_in_forward_and_backward_and_reduces():
    pytest.importorskip("deepspeed")
    dw.spawn(dw.zero3_worker, 2, timeout=240, init=False)
