"""``RSPO_FUSED_LOGPROBS=1``: OpenRLHF's ``Actor.forward`` from the hidden states, against the unpatched actor.

OpenRLHF's packing helpers come from flash-attn, which needs CUDA: the test puts CPU versions of the
same functions (transformers' ``_unpad_input`` / ``_pad_input``, einops' ``rearrange``, row indexing)
and a differentiable all-gather in their place, for both actors alike. Ring attention itself
(ring_flash_attn) cannot run on a CPU: the ring test splits the packed stream at a sequence boundary,
where each rank's local attention is exact, and checks the slicing, the rolled labels and the
gathering around the head.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import warnings

import pytest
import torch

pytest.importorskip("openrlhf")
pytest.importorskip("einops")

import trainer_spawn  # noqa: E402

STUBS = os.path.join(os.path.dirname(__file__), "stubs")
V, H = 80, 16
TEMPERATURE = 0.8
ENTROPY_COEF = 0.05


def _import_actor():
    """``openrlhf.models.actor`` with the CUDA-only imports stubbed and CPU packing helpers."""
    missing = [name for name in ("vllm", "flash_attn") if importlib.util.find_spec(name) is None]
    sys.path.append(STUBS)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            import openrlhf.models.actor as actor_module
            import openrlhf.models.ring_attn_utils as ring
    finally:
        sys.path.remove(STUBS)
        for name in [m for m in sys.modules if m.split(".")[0] in missing or m == "_stub_missing"]:
            del sys.modules[name]
    from einops import rearrange
    from transformers import modeling_flash_attention_utils as fa

    def all_gather(tensor, group):
        return torch.cat(torch.distributed.nn.functional.all_gather(tensor, group=group), dim=0)

    ring.unpad_input, ring.pad_input = fa._unpad_input, fa._pad_input
    ring.index_first_axis = lambda tensor, indices: tensor[indices]  # flash-attn's: rows of a flat tensor
    ring.rearrange, ring.all_gather = rearrange, all_gather
    ring.update_ring_attn_params = lambda cu_seqlens: None  # ring_flash_attn's varlen bookkeeping
    # OpenRLHF's entropy is torch.compile'd: compiling on a CPU costs seconds, the function is the same.
    actor_module.compute_entropy = actor_module.compute_entropy.__wrapped__
    return actor_module


actor_module = _import_actor()

from rspo_kernels.integrations import openrlhf as rspo_openrlhf  # noqa: E402
from rspo_kernels.integrations import openrlhf_fused  # noqa: E402


def _actor(tied: bool, packing: bool, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
        use_cache=False,  # as OpenRLHF sets it; packed position_ids then give a block-diagonal mask
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    actor = actor_module.Actor(Qwen2ForCausalLM(config), temperature=TEMPERATURE)
    actor.packing_samples = packing  # set by Actor.__init__ only when it loads a checkpoint by name
    return actor


def _batch(lengths: list[int], prompt: int, seed: int):
    """Right-padded (B, S) sequences, ``action_mask`` over the last ``S - prompt`` columns."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    sequences = torch.randint(1, V, (len(lengths), S), generator=g)
    attention_mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
    sequences = sequences * attention_mask
    action_mask = attention_mask[:, prompt:].bool()
    return sequences, attention_mask, action_mask


def _step(actor, batch, seed: int, ring_group=None, backward=None):
    """One PPO-style forward + backward as OpenRLHF's actor runs it: log-probs of the actions and
    an entropy bonus over the action positions (``backward``: DeepSpeed's ``engine.backward``)."""
    sequences, attention_mask, action_mask = batch
    logp, output = actor(
        sequences,
        action_mask,
        attention_mask=attention_mask,
        return_output=True,
        ring_attn_group=ring_group,
        return_entropy=True,
    )
    g = torch.Generator().manual_seed(100 + seed)
    adv = torch.randn(action_mask.shape, generator=g)
    entropy = output.entropy[:, -action_mask.shape[1] :]
    loss = -(adv * logp * action_mask).sum() - ENTROPY_COEF * (entropy * action_mask).sum()
    (backward or torch.Tensor.backward)(loss)
    return logp.detach(), entropy.detach(), action_mask


def _grads(module):
    return {n.removeprefix("module."): p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _compare(name, mine, theirs, mask=None):
    if mask is not None:
        mine, theirs = mine[mask], theirs[mask]
    torch.testing.assert_close(mine, theirs, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv(openrlhf_fused.ENV_VAR, "1")
    rspo_openrlhf.install()
    yield
    rspo_openrlhf.uninstall()


# ----------------------------------------------------------------------------------------------
# One process.


def test_env_var_is_checked_and_off_by_default(monkeypatch):
    monkeypatch.delenv(openrlhf_fused.ENV_VAR, raising=False)
    assert not openrlhf_fused.enabled()
    rspo_openrlhf.install()
    try:
        assert getattr(actor_module.Actor.forward, "_rspo_original", None) is None
    finally:
        rspo_openrlhf.uninstall()
    monkeypatch.setenv(openrlhf_fused.ENV_VAR, "yes")
    with pytest.raises(ValueError, match=r"RSPO_FUSED_LOGPROBS='yes'.*RSPO_FUSED_LOGPROBS=1"):
        rspo_openrlhf.runtime_env_hook({})
    monkeypatch.setenv(openrlhf_fused.ENV_VAR, "1")
    env = rspo_openrlhf.runtime_env_hook({})
    assert env["env_vars"][openrlhf_fused.ENV_VAR] == "1"  # reaches every worker


@pytest.mark.parametrize("packing", [False, True])
def test_single_process_values_and_gradients_match_the_unpatched_actor(packing, fused):
    batch = _batch([9, 6, 8], prompt=3, seed=1)
    patched = _actor(tied=False, packing=packing)
    plain = copy.deepcopy(patched)
    logp, ent, mask = _step(patched, batch, 1)
    ref_logp, ref_ent, _ = _step_unpatched(plain, batch, 1)
    _compare("log-probs", logp, ref_logp)
    _compare("entropy", ent, ref_ent, mask)
    for name, g in _grads(plain).items():
        _compare(name, _grads(patched)[name], g)


def _step_unpatched(actor, batch, seed, ring_group=None):
    forward = actor_module.Actor.forward
    original = getattr(forward, "_rspo_original", forward)
    actor_module.Actor.forward = original
    try:
        return _step(actor, batch, seed, ring_group)
    finally:
        actor_module.Actor.forward = forward


def test_logits_requests_fall_back_to_openrlhf(fused):
    actor = _actor(tied=True, packing=False)
    sequences, attention_mask, _ = _batch([7, 5], prompt=2, seed=2)
    output = actor(sequences, attention_mask=attention_mask, return_output=True)
    assert output["logits"].shape == (2, 7, V)  # the caller asked for the logits: OpenRLHF's path
    logp = actor(sequences, attention_mask=attention_mask, return_logprobs=True)
    original = actor_module.Actor.forward._rspo_original
    plain = original(actor, sequences, attention_mask=attention_mask, return_logprobs=True)
    live = attention_mask[:, 1:].bool()
    _compare("return_logprobs", logp, plain, live)


def test_logit_scaling_head_is_refused_when_the_actor_is_built(fused):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0; unset RSPO_FUSED_LOGPROBS"):
        actor_module.Actor(Qwen2ForCausalLM(config))


# ----------------------------------------------------------------------------------------------
# Two gloo processes: DDP (padded, packed, packed with ring-attention slices) and DeepSpeed ZeRO-3.

SCENARIOS = [
    # (packing, ring, tied)
    (False, False, False),
    (True, False, True),
    (True, True, False),
]


def _ddp_scenarios(rank: int, world: int) -> None:
    warnings.filterwarnings("ignore")
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ[openrlhf_fused.ENV_VAR] = "1"
    for packing, ring, tied in SCENARIOS:
        # Ring attention: both ranks hold the same samples (one ring); the packed stream, 12 tokens,
        # is split at the boundary between the two sequences. Otherwise each rank has its own batch.
        batch = _batch([6, 6], prompt=2, seed=7) if ring else _batch([9, 6, 8], prompt=3, seed=rank)
        group = torch.distributed.group.WORLD if ring else None
        results = []
        for patched in (False, True):
            if patched:
                rspo_openrlhf.install()
            try:
                actor = _actor(tied=tied, packing=packing)
                ddp = DDP(actor)
                logp, ent, mask = _step(ddp, batch, rank, group)
                results.append((logp, ent, mask, _grads(ddp)))
            finally:
                rspo_openrlhf.uninstall()
        (logp, ent, mask, grads), (flogp, fent, _, fgrads) = results
        where = f"packing={packing} ring={ring} tied={tied}"
        _compare(f"log-probs {where}", flogp, logp)
        _compare(f"entropy {where}", fent, ent, mask)
        assert grads.keys() == fgrads.keys()
        for name, g in grads.items():
            _compare(f"grad {name} {where}", fgrads[name], g)


def _zero3_scenario(rank: int) -> None:
    """OpenRLHF trains under DeepSpeed: with ZeRO-3 the head is partitioned, and the fused path must
    gather it (forward and the recomputing backward) as the logits path does."""
    import deepspeed
    import deepspeed.comm.torch

    # DeepSpeed's CPU accelerator may JIT-compile a shared-memory all-reduce (minutes of C++); gloo suffices.
    deepspeed.comm.torch.build_shm_op = lambda: None
    config = {
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition everything
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }
    batch = _batch([9, 6, 8], prompt=3, seed=rank)
    results = []
    for patched in (False, True):
        if patched:
            rspo_openrlhf.install()
        try:
            actor = _actor(tied=False, packing=True)
            engine, *_ = deepspeed.initialize(
                model=actor, optimizer=torch.optim.SGD(actor.parameters(), lr=0.1), config=config
            )
            assert engine.module.model.lm_head.weight.numel() == 0  # partitioned outside its forward
            logp, ent, mask = _step(engine, batch, rank, backward=engine.backward)
            grads = {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
            results.append((logp, ent, mask, grads))
            engine.destroy()
        finally:
            rspo_openrlhf.uninstall()
    (logp, ent, mask, grads), (flogp, fent, _, fgrads) = results
    _compare("ZeRO-3 log-probs", flogp, logp)
    _compare("ZeRO-3 entropy", fent, ent, mask)
    for name, g in grads.items():
        _compare(f"ZeRO-3 grad {name}", fgrads[name], g)


def _all_scenarios(rank: int, world: int) -> None:
    _ddp_scenarios(rank, world)
    _zero3_scenario(rank)


def test_ddp_and_zero3_on_two_processes_match_the_unpatched_actor():
    trainer_spawn.run(_all_scenarios, 2, timeout=180)
