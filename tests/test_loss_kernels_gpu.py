"""The Triton log-prob kernels as the compiler sees them: an ahead-of-time sm_90 build, and real shapes on a GPU.

The interpreter (what the other loss tests use without CUDA) neither type-checks like the compiler
nor shows what the loads compile to. The ahead-of-time build runs on any machine with Triton's
NVIDIA backend, for each dtype and flag, and checks the PTX for 16-byte vector loads and stores
(the strides are specialised and 16-divisible, as the JIT specialises them at run time).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from loss_backends import HAS_CUDA, on_device
from test_loss_reference import assert_matches, make_case

import rspo_kernels as rk
from rspo_kernels.loss.reference import rspo_loss_reference, token_logprobs_reference

AOT_SCRIPT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import rspo_kernels.ops.token_logprobs as K

def compile_(fn, sig, consts, aligned):
    names = fn.arg_names
    signature = {n: ("constexpr" if n in consts else sig[n]) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    consts = {(names.index(k),): v for k, v in consts.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    asm = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm
    assert "cubin" in asm
    return asm["ptx"]

# Strides marked do_not_specialize would never get the divisibility that vector loads need.
for kernel in (K._token_logprobs_fwd_kernel, K._token_logprobs_bwd_kernel):
    assert [p.name for p in kernel.params if p.do_not_specialize] == ["T"], kernel.fn.__name__

V = 151936
# Each flag combination without the soft-cap, and the soft-capped one with the entropy (its extra work).
FLAGS = ((False, False), (True, False), (True, True))
for dt in ("fp32", "bf16", "fp16"):
    for entropy, softcap in FLAGS:
        sig = dict(p_logits="*" + dt, p_ids="*i64", p_live="*u8", p_logp="*fp32", p_lse="*fp32", p_lse_lo="*fp32",
                   p_entropy="*fp32", T="i32", stride_lb="i64", stride_lt="i64", inv_temperature="fp32",
                   softcap="fp32")
        ptx = compile_(K._token_logprobs_fwd_kernel, sig,
                       dict(V=V, WITH_ENTROPY=entropy, SOFTCAP=softcap, BLOCK_V=4096),
                       ["p_logits", "stride_lb", "stride_lt"])
        assert re.search(r"ld\.global(\.\w+)*\.v4", ptx), f"forward {dt}: no 16-byte loads"
    sig = dict(p_logits="*" + dt, p_ids="*i64", p_lse="*fp32", p_lse_lo="*fp32", p_glogp="*fp32", p_gentropy="*fp32",
               p_mean_x="*fp32", p_dlogits="*" + dt, T="i32", stride_lb="i64", stride_lt="i64", stride_gb="i64",
               stride_gt="i64", inv_temperature="fp32", softcap="fp32")
    for entropy_grad, softcap in FLAGS:
        ptx = compile_(K._token_logprobs_bwd_kernel, sig,
                       dict(V=V, WITH_ENTROPY_GRAD=entropy_grad, SOFTCAP=softcap, BLOCK_V=4096),
                       ["p_logits", "p_dlogits", "stride_lb", "stride_lt", "stride_gb", "stride_gt"])
        assert re.search(r"ld\.global(\.\w+)*\.v4", ptx), f"backward {dt}: no 16-byte loads"
        assert re.search(r"st\.global(\.\w+)*\.v4", ptx), f"backward {dt}: no 16-byte stores"
        scalar = [op for op in re.findall(r"st\.global[.\w]*", ptx) if ".v" not in op]
        assert len(scalar) <= 1, f"backward {dt}: {len(scalar)} scalar stores (only the target entry's may be)"
print("compiled", triton.__version__)
"""


def test_kernels_compile_for_h100_with_vector_loads(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_real_shape_bf16_on_gpu():
    B, T, V = 4, 512, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(B, T, V, device="cuda", generator=g).mul_(3).bfloat16()
    ids = torch.randint(0, V, (B, T), device="cuda", generator=g)
    weights = torch.randn(B, device="cuda", generator=g)
    mask = torch.rand(B, T, device="cuda", generator=g) > 0.1
    lr = token_logprobs_reference(logits, ids)
    assert_matches(rk.token_logprobs(logits, ids), lr, torch.float32)
    old = lr + 0.3 * torch.randn(B, T, device="cuda", generator=g)
    x = logits.clone().requires_grad_()
    loss = rk.rspo_loss(x, ids, weights, mask, old_logprobs=old, clip_ratio_c=3.0)
    (1024.0 * loss).backward()
    y = logits.float().requires_grad_()
    loss_r = rspo_loss_reference(y, ids, weights, mask, old_logprobs=old, clip_ratio_c=3.0)
    (1024.0 * loss_r).backward()
    assert_matches(loss, loss_r, torch.float32)
    assert_matches(x.grad, y.grad, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_public_api_on_gpu_runs_triton_without_host_sync():
    from rspo_kernels._dispatch import implementation

    assert implementation("token_logprobs", "cuda", torch.bfloat16)[0] == "triton"
    case = on_device(make_case(B=8, T=16, V=1000, seed=6))
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1], device="cuda")
    x = case["logits"].clone().requires_grad_()
    crit = rk.RSPOLoss("pass@k", k=2, temperature=case["temperature"], return_stats=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync raises
    try:
        loss, _ = crit(
            x, case["target_ids"], rewards, group_size=4, mask=case["mask"], old_logprobs=case["old_logprobs"]
        )
        loss.backward()
        rk.token_logprobs(case["logits"], case["target_ids"].clamp(min=0))
    finally:
        torch.cuda.set_sync_debug_mode(0)
