"""Every registered policy loss, KL estimator, rollout IS weights and global-batch normalisation, against verl.

The oracle is verl 0.9.1's own code in float64: ``get_policy_loss_fn(name)(old_log_prob, log_prob,
advantages, response_mask, loss_agg_mode, config, rollout_is_weights)`` with verl's ``ActorConfig``
(built as verl's actor builds it), applied to the log-probs of the full logits, plus verl's actor
terms (``kl_penalty`` + ``agg_loss``, the entropy bonus). Values, gradients with respect to the
logits (the chunked backend; Triton under its interpreter) and to the hidden states, head weight
and bias (the fused-linear path). verl divides by ``count + 1e-8`` in some means, so agreement is
to ``1e-7`` relative, not to the last bit.

clip_cov draws tokens with ``torch.randperm``: verl from torch's global generator, ours from
``generator=`` (or the global generator when None). A generator seeded like the global one draws
the same permutation, so the parity is exact with the same seed on both sides.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from loss_backends import DEVICE, HAS_TRITON
from test_loss_reference import make_case

import rspo_kernels as rk
from rspo_kernels._dispatch import BACKEND_ENV
from rspo_kernels.loss.layout import token_batch
from rspo_kernels.loss.options import KL_PENALTIES, LOSS_AGG_MODES, POLICY_LOSSES, VERL_POLICY_LOSSES, LossOptions
from rspo_kernels.loss.policy import policy_loss
from rspo_kernels.loss.reference import rspo_loss_reference, token_logprobs_reference

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_config = pytest.importorskip("verl.workers.config")

EPS_LOW, EPS_HIGH, CLIP_C = 0.2, 0.28, 3.0
B, T, V = 4, 6, 23
# Settings that make each loss's special branch fire on this small batch (verl's defaults select
# one token in 2e-4 of them; clip_cov's bounds are widened so several tokens qualify).
LOSS_OPTIONS: dict[str, dict[str, float]] = {
    "sapo": {"tau_pos": 1.3, "tau_neg": 2.1},
    "clip_cov": {"clip_cov_ratio": 0.2, "clip_cov_lb": 0.05, "clip_cov_ub": 6.0},
    "kl_cov": {"kl_cov_ratio": 0.2, "ppo_kl_coef": 0.7},
    "dro": {"dro_beta": 0.3},
    "two_sided_clip": {"delta": 1.6},
}


def verl_actor_config(name: str, mode: str, global_batch_info: dict | None = None):
    """verl's ``ActorConfig`` for ``policy_loss.loss_mode = name`` (what its actor passes the loss)."""
    opts = LOSS_OPTIONS.get(name, {})
    top = {k: v for k, v in opts.items() if k in ("tau_pos", "tau_neg")}
    pl = verl_config.PolicyLossConfig(loss_mode=name, **{k: v for k, v in opts.items() if k not in top})
    cfg = verl_config.ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=EPS_LOW,
        clip_ratio_low=EPS_LOW,
        clip_ratio_high=EPS_HIGH,
        clip_ratio_c=CLIP_C,
        loss_agg_mode=mode,
        policy_loss=pl,
        **top,
    )
    cfg.global_batch_info.update(global_batch_info or {})
    return cfg


def case64(seed: int = 3, is_weights: bool = True) -> dict:
    c = make_case(B=B, T=T, V=V, dtype=torch.float64, per_token=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    # Log-ratios spread past the clip ranges and DPPO's trust regions, both signs of advantage.
    c["old_logprobs"] = c["old_logprobs"] + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    # A few ratios beyond e^1.5 > clip_ratio_c = 3: dual-clip and DPPO's truncation fire.
    c["old_logprobs"] = c["old_logprobs"] - torch.where(torch.rand(B, T, generator=g) < 0.25, 1.5, 0.0)
    # A few likely tokens whose probability moved by more than DPPO's thresholds (0.2 / 0.28).
    pick = (torch.arange(B)[:, None] + torch.arange(T)[None, :]) % 3 == 0
    top = c["logits"].argmax(-1)
    c["target_ids"] = torch.where(pick & (c["target_ids"] >= 0), top, c["target_ids"])
    true = torch.log_softmax(c["logits"] / c["temperature"], -1).gather(-1, c["target_ids"].clamp(min=0)[..., None])[
        ..., 0
    ]
    c["old_logprobs"] = torch.where(
        pick, true - 1.6 * torch.rand(B, T, generator=g, dtype=torch.float64), c["old_logprobs"]
    )
    c["ref_logprobs"] = torch.where(pick, true + 0.2, c["ref_logprobs"])
    c["rollout_is_weights"] = (0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)) if is_weights else None
    return c


def verl_total(c: dict, name: str, mode: str, logits: torch.Tensor, *, beta=0.0, kl="low_var_kl", coeff=0.0, gbi=None):
    """verl's actor loss (``losses.ppo_loss``): pg loss + kl_loss_coef * kl - entropy_coeff * entropy."""
    cfg = verl_actor_config(name, mode, gbi)
    logp = token_logprobs_reference(logits, c["target_ids"].clamp(min=0), temperature=c["temperature"])
    mask = c["mask"]
    pg, metrics = core_algos.get_policy_loss_fn(name)(
        old_log_prob=c["old_logprobs"],
        log_prob=logp,
        advantages=c["weights"],
        response_mask=mask,
        loss_agg_mode=mode,
        config=cfg,
        rollout_is_weights=c["rollout_is_weights"],
    )
    total = pg
    if beta:
        kld = core_algos.kl_penalty(logprob=logp, ref_logprob=c["ref_logprobs"], kl_penalty=kl)
        total = total + beta * core_algos.agg_loss(
            loss_mat=kld, loss_mask=mask, loss_agg_mode=mode, **cfg.global_batch_info
        )
    if coeff:
        from verl.utils.torch_functional import entropy_from_logits

        ent = entropy_from_logits(logits / c["temperature"])
        total = total - coeff * core_algos.agg_loss(
            loss_mat=ent, loss_mask=mask, loss_agg_mode=mode, **cfg.global_batch_info
        )
    return total, metrics


def ours_kwargs(c: dict, name: str, mode: str, **kw) -> dict:
    return dict(
        old_logprobs=c["old_logprobs"],
        ref_logprobs=c["ref_logprobs"],
        temperature=c["temperature"],
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        clip_ratio_c=CLIP_C,
        loss_agg_mode=mode,
        policy_loss=name,
        policy_loss_options=LOSS_OPTIONS.get(name),
        rollout_is_weights=c["rollout_is_weights"],
        **kw,
    )


def close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    expected = expected.detach().double()
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-12)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=1e-7, atol=1e-7 * scale, msg=msg or None)


def seeded(name: str) -> tuple[torch.Generator | None, int]:
    seed = 1234
    torch.manual_seed(seed)  # verl's clip_cov draws from the global generator
    return torch.Generator().manual_seed(seed), seed


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("name", VERL_POLICY_LOSSES)
def test_logits_value_gradient_and_stats_equal_verl(name, mode):
    c = case64()
    x = c["logits"].clone().requires_grad_()
    gen, seed = seeded(name)
    loss_v, metrics = verl_total(c, name, mode, x)
    (g_v,) = torch.autograd.grad(loss_v, x)
    y = c["logits"].clone().requires_grad_()
    loss, stats = rk.rspo_loss(
        y, c["target_ids"], c["weights"], c["mask"], **ours_kwargs(c, name, mode), generator=gen, return_stats=True
    )
    (g,) = torch.autograd.grad(loss, y)
    assert bool(g.abs().sum() > 0)
    close(loss, loss_v, f"{name}/{mode} value")
    close(g, g_v, f"{name}/{mode} gradient")
    for ours_key, verl_key in (
        ("clip_fraction", "actor/pg_clipfrac"),
        ("approx_kl", "actor/ppo_kl"),
        ("dual_clip_fraction", "actor/pg_clipfrac_lower"),
    ):
        if verl_key in metrics and ours_key in stats:
            close(stats[ours_key], torch.tensor(float(metrics[verl_key])), f"{name}/{mode} {ours_key}")
    # The unfused specification agrees too (it shares the registry but not the aggregation).
    torch.manual_seed(seed)
    ref = rspo_loss_reference(
        c["logits"], c["target_ids"], c["weights"], c["mask"], **ours_kwargs(c, name, mode), generator=None
    )
    close(ref, loss_v, f"{name}/{mode} reference")


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov", "vanilla", "gspo", "dppo_tv", "dppo_kl", "geo_mean", "cispo"])
def test_special_branches_fire(name):
    """The parity cases exercise what makes each loss itself (else the test above could not fail)."""
    c = case64()
    _, stats = rk.rspo_loss(
        c["logits"], c["target_ids"], c["weights"], c["mask"], **ours_kwargs(c, name, "token-mean"), return_stats=True
    )
    assert float(stats["clip_fraction"]) > 0
    if name in ("vanilla", "dppo_tv", "dppo_kl", "geo_mean"):
        assert float(stats["dual_clip_fraction"]) > 0


def test_clip_cov_draw_follows_the_generator():
    c = case64()
    kw = ours_kwargs(c, "clip_cov", "token-mean")
    kw["policy_loss_options"] = {**LOSS_OPTIONS["clip_cov"], "clip_cov_ratio": 0.01}  # one token of several
    a = rk.rspo_loss(
        c["logits"], c["target_ids"], c["weights"], c["mask"], **kw, generator=torch.Generator().manual_seed(1)
    )
    b = rk.rspo_loss(
        c["logits"], c["target_ids"], c["weights"], c["mask"], **kw, generator=torch.Generator().manual_seed(1)
    )
    others = {
        float(
            rk.rspo_loss(
                c["logits"], c["target_ids"], c["weights"], c["mask"], **kw, generator=torch.Generator().manual_seed(s)
            )
        )
        for s in range(2, 8)
    }
    assert float(a) == float(b)
    assert len(others | {float(a)}) > 1  # the draw is random: other seeds cut other tokens


@pytest.mark.parametrize("name", VERL_POLICY_LOSSES)
def test_fused_linear_gradients_equal_verl(name):
    mode = "seq-mean-token-mean" if name in ("gspo", "geo_mean") else "token-mean"
    c = case64(seed=7)
    g = torch.Generator().manual_seed(2)
    H = 9
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = 0.6 * torch.randn(V, H, generator=g, dtype=torch.float64)
    bias = 0.3 * torch.randn(V, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    gen, _ = seeded(name)
    loss_v, _ = verl_total(c, name, mode, leaves[0] @ leaves[1].T + leaves[2], beta=0.05, coeff=0.01)
    grads_v = torch.autograd.grad(loss_v, leaves)
    mine = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = rk.rspo_linear_loss(
        mine[0],
        mine[1],
        c["target_ids"],
        c["weights"],
        c["mask"],
        bias=mine[2],
        **ours_kwargs(c, name, mode, beta=0.05, kl_penalty="low_var_kl", entropy_coeff=0.01),
        generator=gen,
    )
    grads = torch.autograd.grad(loss, mine)
    close(loss, loss_v, f"{name} value")
    for what, got, want in zip(("hidden", "weight", "bias"), grads, grads_v, strict=True):
        close(got, want, f"{name} d/d{what}")


@pytest.mark.parametrize("kl", KL_PENALTIES)
def test_kl_estimators_equal_verl(kl):
    """``beta * agg_loss(kl_penalty(logp, ref, kl_loss_type))`` as verl's actor adds it (k3_unclamped: no clamp)."""
    c = case64(is_weights=False)
    # Push some reference log-probs far: k3 > 10 there, where verl's low_var_kl clamps.
    c["ref_logprobs"] = c["ref_logprobs"] + torch.where(torch.arange(B * T).view(B, T) % 5 == 0, 4.0, 0.0)
    mode, beta = "seq-mean-token-mean", 0.3
    x = c["logits"].clone().requires_grad_()
    verl_kl = kl.replace("k3_unclamped", "k3")
    loss_v, _ = verl_total(c, "vanilla", mode, x, beta=beta, kl=verl_kl)
    if kl.startswith("k3_unclamped"):
        # verl has no unclamped k3: add back what its clamp removed (k3 - clamp(k3, -10, 10)), by hand.
        logp = token_logprobs_reference(x, c["target_ids"].clamp(min=0), temperature=c["temperature"])
        d = torch.clamp(c["ref_logprobs"] - logp, -20, 20)
        k3 = torch.exp(d) - d - 1
        excess = k3 - torch.clamp(k3, -10, 10)
        if kl.endswith("+"):
            excess = excess.detach()
        assert float((excess.detach() * c["mask"]).abs().sum()) > 0
        loss_v = loss_v + beta * core_algos.agg_loss(loss_mat=excess, loss_mask=c["mask"], loss_agg_mode=mode)
    (g_v,) = torch.autograd.grad(loss_v, x)
    y = c["logits"].clone().requires_grad_()
    loss = rk.rspo_loss(
        y, c["target_ids"], c["weights"], c["mask"], **ours_kwargs(c, "vanilla", mode, beta=beta, kl_penalty=kl)
    )
    (g,) = torch.autograd.grad(loss, y)
    close(loss, loss_v, kl)
    close(g, g_v, kl)


def test_default_kl_is_the_unclamped_k3():
    assert LossOptions().kl_penalty == "k3_unclamped"


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("name", ["vanilla", "sapo", "gspo", "cispo", "geo_mean"])
def test_global_batch_split_over_ranks_and_micro_batches(name, mode):
    """dp_size = 2 ranks, each in 2 micro-batches: the ranks' mean of summed gradients is the single-process one.

    Each piece's loss equals verl's own ``policy_loss_fn`` + ``agg_loss`` with the same
    ``global_batch_info`` (geo_mean: verl ignores it and takes each piece's local mean, so only the
    piece-wise parity is asserted for it).
    """
    c = case64(seed=11)
    c["mask"][1] = True  # no empty row: verl's global_batch_size counts every sequence
    c["target_ids"][1] = 5
    n_tokens = int(c["mask"].sum())
    gbi = {"dp_size": 2, "batch_num_tokens": n_tokens, "global_batch_size": B}
    kw = dict(beta=0.05, entropy_coeff=0.02, kl_penalty="k3")
    y = c["logits"].clone().requires_grad_()
    whole = rk.rspo_loss(y, c["target_ids"], c["weights"], c["mask"], **ours_kwargs(c, name, mode, **kw))
    (g_whole,) = torch.autograd.grad(whole, y)
    g_ranks = torch.zeros_like(y)
    for rows in ([0], [1], [2], [3]):  # rank 0: rows 0, 1; rank 1: rows 2, 3; one row per micro-batch
        part = {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v) for k, v in c.items()}
        xp = c["logits"][rows].clone().requires_grad_()
        loss_v, _ = verl_total(part, name, mode, xp, beta=0.05, kl="k3", coeff=0.02, gbi=gbi)
        yp = c["logits"][rows].clone().requires_grad_()
        loss = rk.rspo_loss(
            yp,
            part["target_ids"],
            part["weights"],
            part["mask"],
            **ours_kwargs(part, name, mode, **kw),
            dp_size=2,
            batch_num_tokens=n_tokens,
            global_batch_size=B,
        )
        close(loss, loss_v, f"{name}/{mode} piece {rows}")
        (gp,) = torch.autograd.grad(loss, yp)
        g_ranks[rows] += gp / 2  # DDP averages the two ranks' gradients
    if name != "geo_mean":
        close(g_ranks, g_whole, f"{name}/{mode} split gradient")


def test_global_batch_needs_its_count():
    c = case64()
    with pytest.raises(ValueError, match="batch_num_tokens"):
        rk.rspo_loss(c["logits"], c["target_ids"], c["weights"], c["mask"], dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        rk.rspo_loss(
            c["logits"], c["target_ids"], c["weights"], c["mask"], dp_size=2, loss_agg_mode="seq-mean-token-sum"
        )
    with pytest.raises(ValueError, match="global_batch_size"):  # sapo's own seq-mean-token-mean
        rk.rspo_loss(
            c["logits"], c["target_ids"], c["weights"], c["mask"], dp_size=2, batch_num_tokens=10, policy_loss="sapo"
        )
    with pytest.raises(ValueError, match="dp_size"):
        rk.rspo_loss(c["logits"], c["target_ids"], c["weights"], c["mask"], dp_size=0)


def _pack(c: dict) -> tuple[dict, torch.Tensor]:
    m = c["mask"]
    lengths = [int(m[b].nonzero().max()) + 1 if bool(m[b].any()) else 0 for b in range(B)]
    lengths[1] = 0  # the all-masked row becomes an empty sequence
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int64)
    out = {}
    for k, v in c.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            out[k] = torch.cat([v[b, : lengths[b]] for b in range(B)])
        else:
            out[k] = v
    return out, cu


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_packed_equals_padded(name, mode):
    c = case64(seed=4)
    p, cu = _pack(c)
    kw = ours_kwargs(c, name, mode, beta=0.1, entropy_coeff=0.01, max_response_length=T)
    y = c["logits"].clone().requires_grad_()
    loss = rk.rspo_loss(y, c["target_ids"], c["weights"], c["mask"], **kw, generator=torch.Generator().manual_seed(5))
    (g,) = torch.autograd.grad(loss, y)
    yp = p["logits"].clone().requires_grad_()
    kwp = ours_kwargs(p, name, mode, beta=0.1, entropy_coeff=0.01, max_response_length=T)
    loss_p = rk.rspo_loss(
        yp,
        p["target_ids"],
        p["weights"],
        p["mask"],
        cu_seqlens=cu,
        weights_per="token",
        **kwp,
        generator=torch.Generator().manual_seed(5),
    )
    (gp,) = torch.autograd.grad(loss_p, yp)
    if name == "geo_mean":
        # verl's torch.mean over the padded rows counts the trailing padding rows a packed batch
        # does not have; here both have B rows (one empty), so they agree.
        pass
    close(loss_p, loss, f"{name}/{mode}")
    close(gp, torch.cat([g[b, : int(cu[b + 1] - cu[b])] for b in range(B)]), f"{name}/{mode} grad")


def test_packed_sequence_losses_need_cu_seqlens():
    c = case64()
    p, _ = _pack(c)
    for name in ("gspo", "sapo", "geo_mean", "vespo", "luspo"):
        with pytest.raises(ValueError, match="cu_seqlens"):
            rk.rspo_loss(p["logits"], p["target_ids"], p["weights"], p["mask"], policy_loss=name)


def test_options_are_validated_and_hashable():
    o = LossOptions(policy_loss="clip_cov", policy_loss_options={"clip_cov_ub": 4, "clip_cov_ratio": 0.1})
    assert o.policy_loss_options == (("clip_cov_ratio", 0.1), ("clip_cov_ub", 4.0))
    assert hash(o) == hash(LossOptions(policy_loss="clip_cov", policy_loss_options=dict(o.policy_loss_options)))
    assert o.loss_option("clip_cov_lb") == 1.0
    with pytest.raises(ValueError, match="policy_loss='nope'.*vanilla"):
        LossOptions(policy_loss="nope")
    with pytest.raises(ValueError, match="'dro_beta' is not read by policy_loss='vanilla'"):
        LossOptions(policy_loss_options={"dro_beta": 0.1})
    with pytest.raises(ValueError, match="valid keys: \\['tau_pos', 'tau_neg'\\]"):
        LossOptions(policy_loss="sapo", policy_loss_options={"tau": 1.0})
    with pytest.raises(ValueError, match="dro_beta"):
        LossOptions(policy_loss="dro")
    with pytest.raises(ValueError, match="kl_penalty='full'.*low_var_kl"):
        LossOptions(kl_penalty="full")
    with pytest.raises(TypeError, match="tau_pos"):
        LossOptions(policy_loss="sapo", policy_loss_options={"tau_pos": "1"})
    with pytest.raises(ValueError, match="kl_cov_ratio"):
        LossOptions(policy_loss="kl_cov", policy_loss_options={"kl_cov_ratio": 0.0})


def test_module_takes_the_new_options():
    c = case64(seed=2)
    crit = rk.RSPOLoss(
        "pass@k", k=2, policy_loss="cispo", kl_penalty="k2", beta=0.1, epsilon_high=0.28, loss_agg_mode="token-mean"
    )
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    w = crit.weights(rewards, group_size=4)
    got = crit(
        c["logits"],
        c["target_ids"],
        rewards,
        group_size=4,
        mask=c["mask"],
        old_logprobs=c["old_logprobs"],
        ref_logprobs=c["ref_logprobs"],
        rollout_is_weights=c["rollout_is_weights"],
        dp_size=2,
        batch_num_tokens=40,
    )
    want = rk.rspo_loss(
        c["logits"],
        c["target_ids"],
        w,
        c["mask"],
        old_logprobs=c["old_logprobs"],
        ref_logprobs=c["ref_logprobs"],
        policy_loss="cispo",
        kl_penalty="k2",
        beta=0.1,
        epsilon_high=0.28,
        rollout_is_weights=c["rollout_is_weights"],
        dp_size=2,
        batch_num_tokens=40,
    )
    close(got, want)


@pytest.mark.parametrize("name", ["sapo", "gspo", "kl_cov"])
def test_torch_compile_aot_eager(name):
    c = case64(seed=6)
    kw = ours_kwargs(c, name, "token-mean", beta=0.1)

    def f(x):
        return rk.rspo_loss(x, c["target_ids"], c["weights"], c["mask"], **kw)

    y = c["logits"].clone().requires_grad_()
    (g,) = torch.autograd.grad(f(y), y)
    torch._dynamo.reset()
    y2 = c["logits"].clone().requires_grad_()
    # kl_cov picks its tokens with a host-side count (as verl): a graph break, not one graph.
    compiled = torch.compile(f, backend="aot_eager", fullgraph=name != "kl_cov")
    with warnings.catch_warnings():
        # Dynamo's own tracing of autograd.Function instantiates it (a torch-internal deprecation).
        warnings.simplefilter("ignore", DeprecationWarning)
        # and, resuming after kl_cov's graph break, inspects .grad of non-leaf tensors (torch-internal).
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
        loss = compiled(y2)
    (g2,) = torch.autograd.grad(loss, y2)
    close(loss, f(c["logits"]))
    close(g2, g)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", ["sapo", "geo_mean"])
def test_triton_backend_equals_verl(name, monkeypatch):
    """Triton kernels (on CUDA, or interpreted on CPU) in float32 at a small shape: float32 agreement."""
    monkeypatch.setenv(BACKEND_ENV, "triton")
    c = case64(seed=9)
    mode = "seq-mean-token-mean"
    x = c["logits"].clone().requires_grad_()
    loss_v, _ = verl_total(c, name, mode, x)
    (g_v,) = torch.autograd.grad(loss_v, x)
    y = c["logits"].float().to(DEVICE).requires_grad_()
    kw = ours_kwargs(c, name, mode)
    kw = {k: (v.float().to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss = rk.rspo_loss(y, c["target_ids"].to(DEVICE), c["weights"].float().to(DEVICE), c["mask"].to(DEVICE), **kw)
    (g,) = torch.autograd.grad(loss, y)
    loss_v = loss_v.detach()
    torch.testing.assert_close(loss.double().cpu(), loss_v, rtol=2e-5, atol=2e-5 * float(loss_v.abs()))
    torch.testing.assert_close(g.double().cpu(), g_v, rtol=2e-5, atol=2e-5 * float(g_v.abs().max()))


# --- TRL 1.16 / Liger-Kernel 0.8.5's variants -------------------------------------------------------

# Our name -> (Liger's loss_type, its keyword arguments, our loss_agg_mode, our options).
PEER_VARIANTS = {
    "cispo_trl": ("cispo", {"epsilon_high": 5.0}, "token-mean", {"epsilon_high": 5.0}),
    "two_sided_clip": (
        "bnpo",
        {"epsilon_high": EPS_HIGH, "delta": 1.6},
        "token-mean",
        {"epsilon_high": EPS_HIGH, "policy_loss_options": {"delta": 1.6}},
    ),
    "vespo": (
        "vespo",
        {"vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 2.5, "vespo_lambda_neg": 1.5},
        "token-mean",
        {
            "policy_loss_options": {
                "vespo_k_pos": 1.5,
                "vespo_lambda_pos": 2.5,
                "vespo_k_neg": 2.5,
                "vespo_lambda_neg": 1.5,
            }
        },
    ),
    "luspo": (
        "luspo",
        {"epsilon_high": EPS_HIGH, "importance_sampling_level": "sequence"},
        "token-mean",
        {"epsilon_high": EPS_HIGH},
    ),
}


def peer_case(seed: int = 21) -> dict:
    c = case64(seed=seed)
    c["weights"] = torch.randn(
        B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )  # one per sequence
    # Shift whole sequences' ratios so the sequence-level weights (vespo's w, luspo's s) spread widely.
    c["old_logprobs"] = c["old_logprobs"] + torch.tensor([0.3, -0.2, 0.15, -0.35], dtype=torch.float64)[:, None]
    # Liger (like TRL) folds vespo's rollout ratio over every position: 1 at padding keeps it a no-op there.
    c["rollout_is_weights"] = torch.where(c["mask"], c["rollout_is_weights"], torch.ones_like(c["rollout_is_weights"]))
    return c


@pytest.mark.parametrize("name", sorted(PEER_VARIANTS))
def test_trl_liger_variants_equal_liger(name):
    liger = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    loss_type, liger_kw, mode, ours = PEER_VARIANTS[name]
    c = peer_case()
    if name == "luspo":
        # Liger broadcasts luspo's (B, 1) loss to (B, T) with the rollout ratio and then averages over all
        # T positions, masked or not; TRL sums the masked tokens of each sequence, as we do: compare
        # without rollout weights, where the two peers agree.
        c["rollout_is_weights"] = None
    mask = c["mask"].double()
    beta = 0.0 if name == "luspo" else 0.04  # Liger adds beta * k3 per token before its aggregation
    x = c["logits"].clone().requires_grad_()
    logp = token_logprobs_reference(x, c["target_ids"].clamp(min=0), temperature=c["temperature"])
    loss_v, _ = liger.LigerFusedLinearGRPOFunction.ppo_loss_fn(
        logp,
        mask,
        c["weights"],
        mask,
        ref_per_token_logps=c["ref_logprobs"],
        old_per_token_logps=c["old_logprobs"],
        epsilon_low=EPS_LOW,
        beta=beta,
        loss_type=loss_type,
        vllm_is_ratio=c["rollout_is_weights"],
        **{"epsilon_high": EPS_HIGH, **liger_kw},
    )
    (g_v,) = torch.autograd.grad(loss_v, x)
    y = c["logits"].clone().requires_grad_()
    kw = dict(
        old_logprobs=c["old_logprobs"],
        ref_logprobs=c["ref_logprobs"],
        temperature=c["temperature"],
        epsilon_low=EPS_LOW,
        beta=beta,
        kl_penalty="k3_unclamped",  # Liger's k3 has no [-10, 10] clamp
        loss_agg_mode=mode,
        policy_loss=name,
        rollout_is_weights=c["rollout_is_weights"],
        **ours,
    )
    loss = rk.rspo_loss(y, c["target_ids"], c["weights"], c["mask"], **kw)
    (g,) = torch.autograd.grad(loss, y)
    close(loss, loss_v, name)
    close(g, g_v, name)
    # And the fused-linear path, and packed = padded.
    p, cu = _pack(c)
    loss_p = rk.rspo_loss(
        p["logits"], p["target_ids"], c["weights"], p["mask"], cu_seqlens=cu, **{**kw, **_packed(kw, p)}
    )
    close(loss_p, loss_v, f"{name} packed")


def _packed(kw: dict, p: dict) -> dict:
    return {k: p[k] for k in ("old_logprobs", "ref_logprobs", "rollout_is_weights")}


def test_luspo_rollout_weights_as_trl():
    """TRL's luspo: ``((per_token_loss * is_ratio) * mask).sum(-1).mean()`` with the (B, 1) sequence loss."""
    c = peer_case(seed=8)
    x = c["logits"].clone().requires_grad_()
    logp = token_logprobs_reference(x, c["target_ids"].clamp(min=0), temperature=c["temperature"])
    mask = c["mask"].double()
    # TRL 1.16 grpo_trainer._compute_loss, importance_sampling_level="sequence", loss_type="luspo":
    log_w = ((logp - c["old_logprobs"]) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    coef_1 = torch.exp(log_w)[:, None]
    coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
    adv = c["weights"][:, None]
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv) * c["rollout_is_weights"]
    loss_v = (per_token_loss * mask).sum(-1).mean()
    (g_v,) = torch.autograd.grad(loss_v, x)
    y = c["logits"].clone().requires_grad_()
    loss = rk.rspo_loss(
        y,
        c["target_ids"],
        c["weights"],
        c["mask"],
        old_logprobs=c["old_logprobs"],
        temperature=c["temperature"],
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        policy_loss="luspo",
        rollout_is_weights=c["rollout_is_weights"],
    )
    (g,) = torch.autograd.grad(loss, y)
    close(loss, loss_v)
    close(g, g_v)


def test_vespo_weights_equal_trl_get_gamma_weights():
    """VESPO's phi(w) is TRL's own ``GRPOTrainer.get_gamma_weights``: the per-token gradient is ``-phi A``."""
    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    c = peer_case(seed=5)
    c["old_logprobs"] = c["old_logprobs"] + 0.5  # ratios below 1 and above, across the gamma's peak
    mask = c["mask"].double()
    logp = token_logprobs_reference(c["logits"], c["target_ids"].clamp(min=0), temperature=c["temperature"])
    phi = grpo.GRPOTrainer.get_gamma_weights(
        advantages=c["weights"][:, None],
        log_ratio_per_token=logp - c["old_logprobs"],
        mask=mask,
        importance_sampling_ratio=c["rollout_is_weights"],
    )  # (B, 1), TRL's defaults k, lambda = 2, 3 / 3, 2
    lp = logp.reshape(-1).clone().requires_grad_()
    opts = LossOptions(policy_loss="vespo", loss_agg_mode="token-sum")
    batch = token_batch(
        c["logits"],
        c["target_ids"],
        c["weights"],
        c["mask"],
        c["old_logprobs"],
        None,
        None,
        opts,
        rollout_is_weights=c["rollout_is_weights"],
    )
    loss = policy_loss(batch, torch.where(batch.live, lp, torch.zeros_like(lp)), None, opts, False)
    (g,) = torch.autograd.grad(loss, lp)
    want = (-phi * c["weights"][:, None] * mask).reshape(-1)
    assert bool((phi[[0, 2, 3]] != 1).all()) and bool(phi.std() > 0.05)  # row 1 is empty: w = 1
    close(g, want)


def test_cispo_trl_needs_its_cap():
    with pytest.raises(ValueError, match="epsilon_high"):
        LossOptions(policy_loss="cispo_trl")
    with pytest.raises(ValueError, match="delta"):
        LossOptions(policy_loss="two_sided_clip")
