"""Triton weight kernels against the torch specification (interpreter on CPU, compiled on GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton")

from rspo_kernels.ops import weights as triton_weights  # noqa: E402
from rspo_kernels.weights import estimators  # noqa: E402
from rspo_kernels.weights._layout import to_groups  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=2e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _groups(values: torch.Tensor, group_ids=None, group_size=None):
    return to_groups(values, shape=values.shape, container="torch", group_size=group_size, group_ids=group_ids)[0]


def _compare(groups, k, objective, estimator="rspo"):
    got = triton_weights.grouped_weights(groups, k, objective, estimator)
    want = estimators.grouped_weights(groups, k, objective, estimator)
    assert got.dtype == want.dtype and got.device == want.device
    scale = max(1.0, float(groups.values.abs().max())) * k
    tol = TOL[groups.values.dtype]
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("objective", ["pass@k", "max@k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(data=st.data())
def test_dense_groups(objective, dtype, data):
    b = data.draw(st.integers(1, 5))
    n = data.draw(st.integers(1, 40))
    k = data.draw(st.integers(1, n))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    if objective == "pass@k":
        r = rng.integers(0, 2, size=(b, n))
    else:
        r = np.round(rng.normal(size=(b, n)), 1)  # rounding creates ties
    _compare(_groups(torch.tensor(r, dtype=dtype, device=DEVICE)), k, objective)


@pytest.mark.parametrize("objective", ["pass@k", "max@k"])
@given(data=st.data())
def test_ragged_groups_span_several_chunks(objective, data):
    """Groups longer than one block (256 slots under the interpreter) exercise the carries."""
    sizes = data.draw(st.lists(st.sampled_from([3, 17, 300, 600]), min_size=1, max_size=4))
    k = data.draw(st.integers(1, 3))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    ids = np.repeat(np.arange(len(sizes)), sizes)
    ids = ids[rng.permutation(ids.shape[0])]
    if objective == "pass@k":
        r = rng.integers(0, 2, size=ids.shape[0])
    else:
        r = rng.integers(-3, 4, size=ids.shape[0]) * 0.5
    _compare(_groups(torch.tensor(r, dtype=torch.float64, device=DEVICE), group_ids=ids), k, objective)


@pytest.mark.parametrize("objective", ["pass@k", "max@k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(data=st.data())
def test_ordergrad_kernels_dense_and_ragged(objective, dtype, data):
    """OrderGrad's kernels (sorted gap form; binary closed form) against the specification, k < n."""
    sizes = data.draw(st.lists(st.sampled_from([2, 3, 9, 40, 300]), min_size=1, max_size=3))
    k = data.draw(st.integers(1, min(sizes) - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    ids = np.repeat(np.arange(len(sizes)), sizes)
    ids = ids[rng.permutation(ids.shape[0])]
    if objective == "pass@k":
        r = rng.integers(0, 2, size=ids.shape[0])
    else:
        r = rng.integers(-3, 4, size=ids.shape[0]) * 0.5 + data.draw(st.sampled_from([0.0, 100.0]))
    values = torch.tensor(r, dtype=dtype, device=DEVICE)
    _compare(_groups(values, group_ids=ids), k, objective, "ordergrad")
    if len(set(sizes)) == 1:
        _compare(_groups(values.reshape(len(sizes), -1)), k, objective, "ordergrad")


def test_other_estimators_fall_back_to_the_specification():
    g = _groups(torch.tensor([[0.1, 0.5, 0.5, 0.9]], device=DEVICE))
    for estimator in ("plugin", "pkpo"):
        torch.testing.assert_close(
            triton_weights.grouped_weights(g, 2, "max@k", estimator),
            estimators.grouped_weights(g, 2, "max@k", estimator),
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_shapes_on_gpu():
    for b, n, k in [(4096, 16, 4), (1024, 64, 8), (1, 2**20, 64)]:
        r = torch.randn(b, n, device="cuda")
        _compare(_groups(r), k, "max@k")
        _compare(_groups((r > 1).float()), k, "pass@k")


_AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import rspo_kernels.ops.weights as W

def compile_(fn, sig, consts):
    names = fn.arg_names
    signature = {n: ("constexpr" if n in consts else sig[n]) for n in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm

for dt in ("fp32", "fp64"):
    for is_pass in (True, False):
        consts = dict(IS_PASS=is_pass, BLOCK=1024)
        base = dict(p_v="*" + dt, p_offsets="*i64", p_chunks="*i64", p_lf="*fp64", k="i32")
        compile_(W._rspo_chunk_sums_kernel, dict(base, p_sums="*fp64"), consts)
        sig = dict(base, p_order="*i64", p_out="*" + dt, p_carry="*fp64", p_total="*fp64")
        compile_(W._rspo_weights_kernel, sig, consts)
    consts = dict(BLOCK=1024)
    base = dict(p_v="*" + dt, p_offsets="*i64", p_chunks="*i64", p_lf="*fp64", k="i32")
    compile_(W._ordergrad_chunk_sums_kernel, dict(base, p_up="*fp64", p_down="*fp64"), consts)
    sig = dict(base, p_order="*i64", p_out="*" + dt, p_carry_up="*fp64", p_carry_down="*fp64", p_total_down="*fp64")
    compile_(W._ordergrad_weights_kernel, sig, consts)
    compile_(W._ordergrad_pass_kernel, dict(base, p_out="*" + dt, p_total="*fp64"), consts)
print("compiled")
"""


def test_weight_kernels_compile_for_h100_without_a_gpu(tmp_path):
    """The interpreter does not type-check like the compiler: build every variant for sm_90."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def test_chunk_carry_is_scanned_per_group():
    """Issue 14 §3.1: group 1 spans two chunks; group 0's 3e15 must not round its carry."""
    rng = np.random.default_rng(0)
    small = np.round(rng.random(300), 2)
    r = torch.tensor(np.concatenate([[0.0, 3e15, 1.0], small]), dtype=torch.float64, device=DEVICE)
    groups = _groups(r, group_ids=np.repeat([0, 1], [3, 300]))
    got = triton_weights.grouped_weights(groups, 2, "max@k", "rspo")[3:]
    alone = _groups(torch.tensor(small, dtype=torch.float64, device=DEVICE)[None])
    want = estimators.grouped_weights(alone, 2, "max@k", "rspo")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
