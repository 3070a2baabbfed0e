"""verl's ``use_fused_kernels=True`` + ``fused_kernel_options.impl_backend=rspo``, through verl's own code.

The model is patched by verl's ``apply_monkey_patch`` (which calls the ``patch_forward_with_backends``
that the plugin extends) and sharded by verl's ``apply_fsdp2``; the oracles are verl's own paths on
one process, unsharded: the logits path (``logprobs_from_logits`` / ``entropy_from_logits``) in
float64 and the ``torch`` fused backend (``FusedLinearForPPO``) in float32.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=UserWarning, module=r"verl\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
    pytest.importorskip("verl")
    pytest.importorskip("cachetools", reason="verl's trainer imports cachetools (rspo_kernels[verl] installs it)")
    from omegaconf import OmegaConf
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from verl.models.transformers import dense_common
    from verl.models.transformers import monkey_patch as verl_monkey_patch
    from verl.utils import torch_functional as verl_F

    from rspo_kernels.integrations import verl as rspo_verl  # noqa: F401  (the plugin: registers the backend)
    from rspo_kernels.integrations import verl_fused

import trainer_spawn

V, H = 96, 16
TEMPERATURE = 0.7
ENTROPY_COEFF = 0.05
# Tolerances from the issue: the fused head against verl's unsharded paths.
TOL = {torch.float64: {"atol": 1e-10, "rtol": 1e-10}, torch.float32: {"atol": 1e-6, "rtol": 1e-6}}


@pytest.fixture(autouse=True)
def _restore_transformers():
    """verl patches classes and modules (``Qwen2ForCausalLM.forward``, flash attention): undo it for
    the other test modules in this process."""
    from transformers.integrations import flash_attention

    saved = Qwen2ForCausalLM.forward, flash_attention._flash_attention_forward
    yield
    Qwen2ForCausalLM.forward, flash_attention._flash_attention_forward = saved


def _config(tied: bool) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
        use_cache=False,  # packed position_ids then give a block-diagonal mask on CPU
        attn_implementation="sdpa",
    )


def _model(tied: bool, dtype: torch.dtype, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(_config(tied)).to(dtype)


def _patched(model: Qwen2ForCausalLM, remove_padding: bool = True) -> Qwen2ForCausalLM:
    # verl's monkey patch imports TRL's value-head model when TRL is installed; TRL 1.16 moved it.
    verl_monkey_patch.is_trl_available = lambda: False
    verl_monkey_patch.apply_monkey_patch(
        model, use_remove_padding=remove_padding, use_fused_kernels=True, fused_kernels_backend="rspo"
    )
    return model


def _packed(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """verl's remove-padding inputs: one (1, nnz) stream, position_ids restarting per sequence, and the
    labels rolled over the whole stream (as ``prepare_model_inputs`` does before any SP slicing)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return {"input_ids": ids, "position_ids": pos, "shift_labels": torch.roll(ids, -1, dims=1)}


def _weights(n: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype)


def _loss(logp: torch.Tensor, entropy: torch.Tensor, seed: int) -> torch.Tensor:
    """A policy-gradient loss with an entropy bonus, as verl's actor forms it (per-token weights)."""
    adv, ent_w = _weights(logp.numel(), seed, logp.dtype)
    return -(adv * logp.reshape(-1)).sum() - ENTROPY_COEFF * (ent_w * entropy.reshape(-1)).sum()


def _oracle(model: Qwen2ForCausalLM, batch: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's unsharded paths: full logits in float64, its torch fused backend in float32."""
    hidden = model.model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch.get("attention_mask")
    ).last_hidden_state
    labels = batch["shift_labels"]
    if dtype == torch.float64:
        logits = model.lm_head(hidden) / TEMPERATURE
        return verl_F.logprobs_from_logits(logits, labels), verl_F.entropy_from_logits(logits)
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    fused = FusedLinearForPPO(impl_backend="torch")
    return fused(hidden, model.lm_head.weight, labels, TEMPERATURE)


def _call(model, batch: dict):
    return model(**batch, attention_mask=batch.get("attention_mask"), temperature=TEMPERATURE, return_dict=True)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[name.replace("_fsdp_wrapped_module.", "")] = g
    return out


# ----------------------------------------------------------------------------------------------
# One process: the forward contract and the configuration-time refusals.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tied", [False, True])
def test_remove_padding_matches_verls_unsharded_paths(dtype, tied):
    batch = _packed([5, 7, 4], seed=0)
    ref = _model(tied, dtype)
    model = _patched(copy.deepcopy(ref))
    out = _call(model, batch)
    assert out.log_probs.shape == out.entropy.shape == batch["input_ids"].shape
    assert out.log_probs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    logp, ent = _oracle(ref, batch, dtype)
    torch.testing.assert_close(out.log_probs, logp.to(out.log_probs.dtype), **TOL[dtype])
    torch.testing.assert_close(out.entropy, ent.to(out.entropy.dtype), **TOL[dtype])
    _loss(out.log_probs, out.entropy, 0).backward()
    _loss(logp.to(dtype), ent.to(dtype), 0).backward()
    mine, theirs = _grads(model), _grads(ref)
    for name, g in theirs.items():
        torch.testing.assert_close(mine[name], g, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


def test_bfloat16_model_returns_float32_log_probs():
    batch = _packed([5, 7], seed=4)
    ref = _model(False, torch.bfloat16)
    out = _call(_patched(copy.deepcopy(ref)), batch)
    assert out.log_probs.dtype == torch.float32 and out.entropy.dtype == torch.float32
    with torch.no_grad():
        hidden = ref.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        logits = ref.lm_head(hidden).float() / TEMPERATURE  # verl's logits path: bf16 logits, float32 softmax
    bf16 = {"rtol": 1.6e-2, "atol": 1e-2}  # one bfloat16 rounding of the logits
    torch.testing.assert_close(out.log_probs, verl_F.logprobs_from_logits(logits, batch["shift_labels"]), **bf16)
    torch.testing.assert_close(out.entropy, verl_F.entropy_from_logits(logits), **bf16)


def test_padded_layout_rolls_input_ids_and_honours_the_attention_mask():
    ref = _model(False, torch.float64)
    model = _patched(copy.deepcopy(ref), remove_padding=False)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (3, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, temperature=TEMPERATURE, return_dict=True)
    logp, ent = _oracle(
        ref,
        {"input_ids": ids, "position_ids": pos, "attention_mask": mask, "shift_labels": torch.roll(ids, -1, dims=-1)},
        torch.float64,
    )
    assert out.log_probs.shape == ids.shape
    live = mask.bool()
    torch.testing.assert_close(out.log_probs[live], logp[live], **TOL[torch.float64])
    torch.testing.assert_close(out.entropy[live], ent[live], **TOL[torch.float64])


def test_uniform_temperature_tensor_is_accepted_and_per_sample_temperatures_are_refused():
    model = _patched(_model(False, torch.float64))
    batch = _packed([4, 4], seed=1)
    a = model(**batch, temperature=TEMPERATURE, return_dict=True).log_probs
    b = model(**batch, temperature=torch.full((2,), TEMPERATURE, dtype=torch.float64), return_dict=True).log_probs
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"per-sample temperatures.*actor_rollout_ref.rollout.temperature"):
        model(**batch, temperature=torch.tensor([0.7, 1.0]), return_dict=True)


def test_other_backends_stay_verls():
    model = _model(False, torch.float32)
    verl_monkey_patch.is_trl_available = lambda: False
    verl_monkey_patch.apply_monkey_patch(model, use_fused_kernels=True, fused_kernels_backend="torch")
    assert model._verl_fused_kernels_backend == "torch"
    assert type(model).forward is dense_common.forward_with_torch_backend


def _trainer_config(**model):
    options = {"impl_backend": "rspo"}
    return OmegaConf.create(
        {
            "algorithm": {"adv_estimator": "grpo"},
            "actor_rollout_ref": {
                "model": {"path": "~/models/unused", "use_fused_kernels": True, "fused_kernel_options": options}
                | model,
                "actor": {"strategy": "fsdp2", "calculate_sum_pi_squared": False},
                "rollout": {"n": 4},
            },
        }
    )


def test_config_checks_run_in_verls_validate_config():
    from verl.utils import config as verl_config

    config = _trainer_config()
    config.actor_rollout_ref.actor.calculate_sum_pi_squared = True
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.actor\.calculate_sum_pi_squared=False"):
        verl_config.validate_config(config, use_reference_policy=False, use_critic=False)


@pytest.mark.parametrize(
    ("actor", "match"),
    [
        ({"strategy": "megatron"}, r"not actor_rollout_ref\.actor\.strategy=megatron.*strategy=fsdp2"),
        ({"calculate_sum_pi_squared": True}, r"calculate_sum_pi_squared=True needs"),
    ],
)
def test_config_refusals_name_the_key(actor, match):
    config = _trainer_config()
    config.actor_rollout_ref.actor.update(actor)
    with pytest.raises(ValueError, match=match):
        verl_fused.check_fused_config(config)
    config.actor_rollout_ref.model.fused_kernel_options.impl_backend = "torch"
    verl_fused.check_fused_config(config)  # only the rspo backend is ours to check


def test_vision_language_model_is_refused_at_configuration_and_at_patch_time(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "vision_config": {"depth": 1}}))
    with pytest.raises(ValueError, match=r"vision-language model.*impl_backend=torch"):
        verl_fused.check_fused_config(_trainer_config(path=str(tmp_path)))
    model = _model(False, torch.float32)
    model.config.vision_config = {"depth": 1}
    with pytest.raises(ValueError, match=r"fused_kernel_options\.impl_backend=rspo supports text-only"):
        _patched(model)


def test_logit_softcapping_head_is_refused():
    model = _model(False, torch.float32)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0"):
        _patched(model)


# ----------------------------------------------------------------------------------------------
# Two gloo processes: verl's apply_fsdp2, data parallel and a sequence split.

# Each rank's micro-batch (sequence lengths, seed): different lengths on the two ranks.
DP_BATCHES = [([5, 7, 4], 10), ([6, 3], 11)]
SCENARIOS = [
    # (dtype, tied, reshard_after_forward)
    (torch.float64, False, True),
    (torch.float64, False, False),
    (torch.float64, True, True),
    (torch.float64, True, False),
    (torch.float32, False, True),
    (torch.float32, True, False),
]


def _fsdp2(model: torch.nn.Module, world: int, reshard: bool) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from verl.utils.fsdp_utils import apply_fsdp2

    mesh = init_device_mesh("cpu", (world,))
    apply_fsdp2(model, {"mesh": mesh, "reshard_after_forward": reshard}, {})
    return model


def _check_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), **TOL[dtype], msg=lambda m: f"{name}: {m}")


def _data_parallel(rank: int, world: int, dtype: torch.dtype, tied: bool, reshard: bool) -> None:
    ref = _model(tied, dtype)
    model = _fsdp2(_patched(copy.deepcopy(ref)), world, reshard)
    if not tied:
        assert type(model.lm_head.weight).__name__ == "DTensor"  # the head is its own FSDP unit
    lengths, seed = DP_BATCHES[rank]
    out = _call(model, _packed(lengths, seed))
    _loss(out.log_probs, out.entropy, seed).backward()  # FSDP2 averages the gradients over the 2 ranks
    # Oracle on one process: the mean of both ranks' losses on the unsharded model.
    total = 0.0
    for r, (lens, s) in enumerate(DP_BATCHES):
        logp, ent = _oracle(ref, _packed(lens, s), dtype)
        if r == rank:
            _check_close(f"log_probs {dtype} tied={tied}", out.log_probs, logp, dtype)
            _check_close(f"entropy {dtype} tied={tied}", out.entropy, ent, dtype)
        total = total + _loss(logp.to(dtype), ent.to(dtype), s) / world
    total.backward()
    mine, theirs = _grads(model), _grads(ref)
    for name, g in theirs.items():
        _check_close(f"grad {name} ({dtype}, tied={tied}, reshard={reshard})", mine[name], g, dtype)


def _sequence_split(rank: int, world: int, tied: bool) -> None:
    """Ulysses-style: one packed stream split across the ranks at a sequence boundary (so that local
    attention is exact on CPU), labels rolled over the global stream before slicing, outputs
    gathered with verl's ``gather_outputs_and_unpad``; equals the unsplit run on one process."""
    from verl.utils import ulysses

    dtype = torch.float64
    ulysses.set_ulysses_sequence_parallel_group(torch.distributed.group.WORLD)
    try:
        batch = _packed([6, 6], seed=20)
        ref = _model(tied, dtype)
        model = _fsdp2(_patched(copy.deepcopy(ref)), world, reshard=True)
        ids, pos, pad = ulysses.ulysses_pad_and_slice_inputs(batch["input_ids"], batch["position_ids"], sp_size=world)
        rolled, _, _ = ulysses.ulysses_pad_and_slice_inputs(batch["shift_labels"], None, sp_size=world)
        out = _call(model, {"input_ids": ids, "position_ids": pos, "shift_labels": rolled})
        logp = ulysses.gather_outputs_and_unpad(out.log_probs.squeeze(0), gather_dim=0, unpad_dim=0, padding_size=pad)
        ent = ulysses.gather_outputs_and_unpad(out.entropy.squeeze(0), gather_dim=0, unpad_dim=0, padding_size=pad)
        _loss(logp, ent, 20).backward()
        ref_logp, ref_ent = _oracle(ref, batch, dtype)
        _check_close("split log_probs", logp, ref_logp.squeeze(0), dtype)
        _check_close("split entropy", ent, ref_ent.squeeze(0), dtype)
        _loss(ref_logp, ref_ent, 20).backward()
        mine, theirs = _grads(model), _grads(ref)
        for name, g in theirs.items():
            _check_close(f"split grad {name} (tied={tied})", mine[name], g, dtype)
    finally:
        ulysses.set_ulysses_sequence_parallel_group(None)


def _all_scenarios(rank: int, world: int) -> None:
    warnings.filterwarnings("ignore")
    for dtype, tied, reshard in SCENARIOS:
        _data_parallel(rank, world, dtype, tied, reshard)
    for tied in (False, True):
        _sequence_split(rank, world, tied)


def test_fsdp2_data_parallel_and_sequence_split_match_one_process():
    trainer_spawn.run(_all_scenarios, 2, timeout=150)
