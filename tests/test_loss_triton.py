"""The Triton kernels against the unfused reference.

Without CUDA the kernels run under Triton's CPU interpreter at small shapes (V <= 512, <= 64
tokens). Triton reads ``TRITON_INTERPRET`` when it is imported, when a kernel is decorated and at
the first launch, so this module sets it around its own imports and, through an autouse fixture,
around each of its tests only, restoring the previous value every time: nothing leaks into other
tests' environment. With CUDA the same tests run compiled on the GPU, plus real-shape tests
marked ``gpu``.
"""

from __future__ import annotations

import importlib
import os
from contextlib import contextmanager

import pytest
import torch
from test_loss_reference import assert_matches, loss_kwargs, make_case

from rspo_kernels.loss_reference import LOSS_AGG_MODES, rspo_loss_reference, token_logprobs_reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
_INTERPRET = not HAS_CUDA
_OP_MODULES = ("rspo_kernels.ops._softmax_helpers", "rspo_kernels.ops.token_logprobs", "rspo_kernels.ops.rspo_loss")


@contextmanager
def _interpreter_env():
    if not _INTERPRET:
        yield
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


with _interpreter_env():
    triton = pytest.importorskip("triton")
    if _INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(triton.language.standard.max, InterpretedFunction):
            pytest.skip(
                "triton was imported before TRITON_INTERPRET=1 was set and there is no GPU; "
                "run this module alone or export TRITON_INTERPRET=1",
                allow_module_level=True,
            )
    # (Re)import in dependency order so that every @triton.jit is decorated in this mode.
    _MODS = [importlib.reload(importlib.import_module(m)) for m in _OP_MODULES]


# Triton's interpreter casts float32 to bfloat16 by truncation (one ulp = two unit roundoffs);
# compiled kernels round to nearest like torch.
BF16_ULPS = 2.0 if _INTERPRET else 1.0


@pytest.fixture(autouse=True)
def _interpret_during_test():
    with _interpreter_env():
        yield


@pytest.fixture(scope="module")
def ops():
    return _MODS[1].token_logprobs_triton, _MODS[2].rspo_loss_triton


def test_interpreter_flag_is_scoped_to_this_module():
    outside = os.environ.get("TRITON_INTERPRET")
    with _interpreter_env():
        pass
    assert os.environ.get("TRITON_INTERPRET") == outside


def _on_device(case):
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def _grads(fn, case, mode, logits=None, **kw):
    x = (case["logits"] if logits is None else logits).clone().requires_grad_()
    loss, stats = fn(x, case["target_ids"], case["weights"], case["mask"], loss_agg_mode=mode, return_stats=True, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss, g, stats


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_kernel(ops, temperature):
    token_logprobs_triton, _ = ops
    case = _on_device(make_case(B=2, T=9, V=300, masked=False))  # V not a power of two: tail block
    lr, er = token_logprobs_reference(case["logits"], case["target_ids"], temperature=temperature, return_entropy=True)
    lt, et = token_logprobs_triton(case["logits"], case["target_ids"], temperature=temperature, return_entropy=True)
    assert lt.dtype == torch.float32
    assert_matches(lt, lr, torch.float32)
    assert_matches(et, er, torch.float32)
    assert_matches(
        token_logprobs_triton(case["logits"], case["target_ids"], temperature=temperature), lr, torch.float32
    )


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize(
    "with_old,with_ref,per_token", [(False, False, False), (True, True, False), (True, False, True)]
)
def test_rspo_loss_kernel_matches_reference(ops, mode, with_old, with_ref, per_token):
    _, rspo_loss_triton = ops
    case = _on_device(make_case(B=3, T=5, V=200, per_token=per_token, with_old=with_old, with_ref=with_ref, seed=1))
    kw = loss_kwargs(case)
    x = case["logits"].clone().requires_grad_()
    loss_r, st_r = rspo_loss_reference(
        x, case["target_ids"], case["weights"], case["mask"], loss_agg_mode=mode, return_stats=True, **kw
    )
    (g_r,) = torch.autograd.grad(loss_r, x)
    loss_t, g_t, st_t = _grads(rspo_loss_triton, case, mode, **kw)
    assert_matches(loss_t, loss_r, torch.float32, f"loss {mode}")
    assert_matches(g_t, g_r, torch.float32, f"grad {mode}")
    for k in st_r:
        assert_matches(st_t[k], st_r[k], torch.float32, k)
    assert torch.all(g_t[1] == 0) and torch.isfinite(g_t).all()  # the all-masked row


def test_strided_bf16_inplace_and_grad_scaling(ops):
    _, rspo_loss_triton = ops
    case = _on_device(make_case(B=4, T=16, V=512, dtype=torch.bfloat16, seed=2))  # 64 tokens, V = 512
    kw = loss_kwargs(case)
    ref_case = dict(case, logits=case["logits"].float())
    x = ref_case["logits"].clone().requires_grad_()
    loss_r = rspo_loss_reference(x, case["target_ids"], case["weights"], case["mask"], **kw)
    (g_r,) = torch.autograd.grad(loss_r, x)

    padded = torch.cat([case["logits"], case["logits"][:, :1]], dim=1).requires_grad_()  # slice below is strided
    loss = rspo_loss_triton(padded[:, :-1], case["target_ids"], case["weights"], case["mask"], **kw)
    (2.5 * loss).backward()
    assert loss.dtype == torch.float32 and padded.grad.dtype == torch.bfloat16
    assert_matches(loss, loss_r, torch.float32)
    assert_matches(padded.grad[:, :-1], 2.5 * g_r, torch.bfloat16, ulps=BF16_ULPS)
    assert torch.all(padded.grad[:, -1] == 0)

    leaf = case["logits"].clone().requires_grad_()
    z = leaf * 1.0
    rspo_loss_triton(z, case["target_ids"], case["weights"], case["mask"], inplace_backward=True, **kw).backward()
    assert_matches(leaf.grad, g_r, torch.bfloat16, ulps=BF16_ULPS)
    assert_matches(z.detach(), g_r, torch.bfloat16, ulps=BF16_ULPS)  # the gradient was written over the logits


def test_all_masked_and_no_grad(ops):
    _, rspo_loss_triton = ops
    case = _on_device(make_case(B=2, T=3, V=64, seed=3))
    x = case["logits"].clone().requires_grad_()
    loss, stats = rspo_loss_triton(
        x, case["target_ids"], case["weights"], torch.zeros(2, 3, device=DEVICE), return_stats=True, **loss_kwargs(case)
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    assert all(torch.isfinite(v) for v in stats.values())
    # Without requires_grad no gradient buffer is written; the loss is unchanged.
    loss_r = rspo_loss_reference(case["logits"], case["target_ids"], case["weights"], case["mask"], **loss_kwargs(case))
    assert_matches(
        rspo_loss_triton(case["logits"], case["target_ids"], case["weights"], case["mask"], **loss_kwargs(case)),
        loss_r,
        torch.float32,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_real_shape_bf16_on_gpu(ops):
    token_logprobs_triton, rspo_loss_triton = ops
    B, T, V = 4, 512, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(B, T, V, device="cuda", generator=g).mul_(3).bfloat16()
    ids = torch.randint(0, V, (B, T), device="cuda", generator=g)
    weights = torch.randn(B, device="cuda", generator=g)
    mask = torch.rand(B, T, device="cuda", generator=g) > 0.1
    lr = token_logprobs_reference(logits, ids)
    assert_matches(token_logprobs_triton(logits, ids), lr, torch.float32)
    old = lr + 0.3 * torch.randn(B, T, device="cuda", generator=g)
    x = logits.clone().requires_grad_()
    loss = rspo_loss_triton(x, ids, weights, mask, old_logprobs=old)
    loss.backward()
    y = logits.float().requires_grad_()
    loss_r = rspo_loss_reference(y, ids, weights, mask, old_logprobs=old)
    loss_r.backward()
    assert_matches(loss, loss_r, torch.float32)
    assert_matches(x.grad, y.grad, torch.bfloat16)


def test_ref_logprobs_without_beta_only_logged(ops):
    _, rspo_loss_triton = ops
    case = _on_device(make_case(B=2, T=4, V=96, seed=4))
    kw = loss_kwargs(case, beta=0.0)
    x = case["logits"].clone().requires_grad_()
    loss_r, st_r = rspo_loss_reference(x, case["target_ids"], case["weights"], case["mask"], return_stats=True, **kw)
    (g_r,) = torch.autograd.grad(loss_r, x)
    loss_t, g_t, st_t = _grads(rspo_loss_triton, case, "token-mean", **kw)
    assert_matches(loss_t, loss_r, torch.float32)
    assert_matches(g_t, g_r, torch.float32)
    assert_matches(st_t["ref_kl"], st_r["ref_kl"], torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_public_api_on_gpu_dispatches_to_triton_without_host_sync():
    import rspo_kernels.loss as L
    from rspo_kernels._dispatch import implementation

    assert implementation("rspo_loss", "cuda")[0] == "triton"
    case = _on_device(make_case(B=8, T=16, V=1000, seed=6))
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1], device="cuda")
    x = case["logits"].clone().requires_grad_()
    crit = L.RSPOLoss("pass@k", k=2, temperature=case["temperature"], return_stats=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync raises
    try:
        loss, _ = crit(
            x, case["target_ids"], rewards, group_size=4, mask=case["mask"], old_logprobs=case["old_logprobs"]
        )
        loss.backward()
        L.token_logprobs(case["logits"], case["target_ids"].clamp(min=0))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert "RSPOLossFunction" in type(loss.grad_fn).__name__


_AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import rspo_kernels.ops.rspo_loss as R
import rspo_kernels.ops.token_logprobs as TL

def compile_(fn, sig, consts):
    names = fn.arg_names
    signature = {n: ("constexpr" if n in consts else sig[n]) for n in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm

ints = {"T": "i32", "V": "i32", "stride_lb": "i64", "stride_lt": "i64", "stride_gb": "i64", "stride_gt": "i64"}
floats = {"inv_temperature": "fp32", "eps_low": "fp32", "eps_high": "fp32", "beta": "fp32"}
for dt in ("bf16", "fp16", "fp32"):
    for on in (True, False):
        flags = dict(HAS_OLD=on, HAS_REF=on, USE_KL=on, WITH_ENTROPY=on, WITH_GRAD=on, BLOCK_V=4096)
        ptrs = {n: "*fp32" for n in ("p_adv", "p_coef", "p_old", "p_ref", "p_loss", "p_logp", "p_entropy", "p_kl")}
        sig = dict(ints, **floats, **ptrs, p_logits="*" + dt, p_dlogits="*" + dt, p_target="*i64", p_clipped="*i8")
        compile_(R._rspo_loss_fwd_kernel, sig, flags)
        sig = dict(ints, inv_temperature="fp32", p_logits="*" + dt, p_target="*i64", p_logp="*fp32", p_entropy="*fp32")
        compile_(TL._token_logprobs_kernel, sig, dict(WITH_ENTROPY=on, BLOCK_V=4096))
    sig = {"p_x": "*" + dt, "p_scale": "*fp32", "T": "i32", "V": "i32", "stride_b": "i64", "stride_t": "i64"}
    compile_(R._scale_rows_kernel, sig, {"BLOCK_V": 4096})
print("compiled")
"""


def test_kernels_compile_for_h100_without_a_gpu(tmp_path):
    """The interpreter does not type-check like the compiler: build every kernel variant for sm_90."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
