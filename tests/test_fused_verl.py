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
from types import SimpleNamespace

import pytest
import torch

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=UserWarning, module=r"verl\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
    pytest.importorskip("verl")
    pytest.importorskip("cachetools", reason="verl's trainer imports cachetools (rspo_kernels[verl] installs it)")
    from omegaconf import OmegaConf
    from tensordict import TensorDict
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from verl.models.transformers import dense_common
    from verl.models.transformers import monkey_patch as verl_monkey_patch
    from verl.utils import tensordict_utils as tu
    from verl.utils import torch_functional as verl_F
    from verl.utils.dataset.dataset_utils import DatasetPadMode
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from rspo_kernels.integrations import verl as rspo_verl  # noqa: F401  (the plugin: registers the backend)
    from rspo_kernels.integrations import verl_fused

import trainer_spawn

V, H = 96, 16
_HF_FORWARD = Qwen2ForCausalLM.forward  # before verl's class-level patch: the oracle's logits path
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


def _distillation(loss_mode: str) -> dict:
    return {"distillation": {"enabled": True, "distillation_loss": {"loss_mode": loss_mode}}}


def test_config_checks_run_in_verls_validate_config():
    from verl.utils import config as verl_config

    config = OmegaConf.merge(_trainer_config(use_remove_padding=False), _distillation("forward_kl_topk"))
    with pytest.raises(ValueError, match=r"loss_mode=forward_kl_topk runs with .*use_remove_padding=False"):
        verl_config.validate_config(config, use_reference_policy=False, use_critic=False)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"actor": {"strategy": "megatron"}}, r"not actor_rollout_ref\.actor\.strategy=megatron.*strategy=fsdp2"),
        (
            _distillation("forward_kl_topk") | {"actor_rollout_ref": {"model": {"use_remove_padding": False}}},
            r"top-k distillation outputs \(fused_linear_aux\) on packed sequences.*use_remove_padding=True",
        ),
    ],
)
def test_config_refusals_name_the_key(extra, match):
    config = _trainer_config()
    if "actor" in extra:
        config.actor_rollout_ref.actor.update(extra["actor"])
    else:
        config = OmegaConf.merge(config, extra)
    with pytest.raises(ValueError, match=match):
        verl_fused.check_fused_config(config)
    config.actor_rollout_ref.model.fused_kernel_options.impl_backend = "torch"
    verl_fused.check_fused_config(config)  # only the rspo backend is ours to check


def test_sum_pi_squared_and_distillation_are_accepted():
    config = _trainer_config()
    config.actor_rollout_ref.actor.calculate_sum_pi_squared = True
    config.algorithm.adv_estimator = "optimal_token_baseline"
    verl_fused.check_fused_config(config)
    for loss_mode in ("k3", "forward_kl_topk"):
        verl_fused.check_fused_config(OmegaConf.merge(config, _distillation(loss_mode)))


def test_optimal_token_baseline_with_fused_rspo_passes_main_ppos_validation(capsys):
    """The whole ``main_ppo`` configuration (verl's hydra defaults) with Σπ² on the rspo backend."""
    from hydra import compose, initialize_config_module
    from verl.trainer import main_ppo

    overrides = [
        "algorithm.adv_estimator=optimal_token_baseline",
        "actor_rollout_ref.actor.calculate_sum_pi_squared=True",
        "actor_rollout_ref.model.use_fused_kernels=True",
        "actor_rollout_ref.model.fused_kernel_options.impl_backend=rspo",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
        "trainer.n_gpus_per_node=1",
    ]
    with initialize_config_module("verl.trainer.config", version_base=None):
        config = compose("ppo_trainer", overrides=overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"verl\.")
        main_ppo.validate_config(config=config, use_reference_policy=False, use_critic=False)
    assert "All configuration checks passed" in capsys.readouterr().out


def test_vision_language_model_is_refused_at_configuration_and_at_patch_time(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "vision_config": {"depth": 1}}))
    with pytest.raises(ValueError, match=r"vision-language model.*impl_backend=torch"):
        verl_fused.check_fused_config(_trainer_config(path=str(tmp_path)))
    model = _model(False, torch.float32)
    model.config.vision_config = {"depth": 1}
    with pytest.raises(ValueError, match=r"fused_kernel_options\.impl_backend=rspo supports text-only"):
        _patched(model)


def test_model_path_config_accepts_a_softcap_and_refuses_a_multiplier(tmp_path):
    config = {"model_type": "gemma2", "final_logit_softcapping": 30.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    verl_fused.check_fused_config(_trainer_config(path=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps(config | {"lm_head_multiplier": 0.5}))
    with pytest.raises(
        ValueError, match=r"sets lm_head_multiplier=0\.5; set actor_rollout_ref\.model\.use_fused_kernels"
    ):
        verl_fused.check_fused_config(_trainer_config(path=str(tmp_path)))


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"lm_head_multiplier": 2.0}, r"sets lm_head_multiplier=2\.0; set .*use_fused_kernels=False"),
        ({"output_multiplier": 0.5}, r"sets output_multiplier=0\.5"),
        ({"final_logit_softcapping": 0.0}, r"final_logit_softcapping=0\.0; set final_logit_softcapping to a positive"),
        ({"logit_scale": -1.0}, r"logit_scale=-1\.0; set logit_scale to a positive number or null"),
        ({"logits_scaling": float("inf")}, r"logits_scaling=inf"),
        ({"logit_scale": 0.5, "final_logit_softcapping": 30.0}, r"serves one of logit_scale, final_logit_softcapping"),
    ],
)
def test_heads_it_cannot_serve_are_refused(settings, match):
    model = _model(False, torch.float32)
    for name, value in settings.items():
        setattr(model.config, name, value)
    with pytest.raises(ValueError, match=match):
        _patched(model)


# ----------------------------------------------------------------------------------------------
# Σπ² (calculate_sum_pi_squared) through verl's FSDP engine: its prepare_model_inputs, the model's
# forward and its prepare_model_outputs, as FSDPEngineWithLMHead.forward_step chains them; the oracle
# is the same engine code with use_fused_kernels=False (Σπ² from the full logits).


# verl's unfused path divides by the temperature as a float32 tensor, the fused one by the float:
# a temperature exact in float32 keeps the float64 comparison at 1e-10.
ENGINE_TEMPERATURE = 0.75


def _unfused(model: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    """The model with HuggingFace's forward (logits), whatever verl's patch made of its class."""
    model.forward = _HF_FORWARD.__get__(model)
    return model


def _engine(module: torch.nn.Module, sp_size: int = 1):
    """An ``FSDPEngineWithLMHead`` holding ``module``, with the attributes its two methods read (its
    ``__init__`` builds a whole worker: configs, device mesh, optimizer)."""
    engine = object.__new__(FSDPEngineWithLMHead)
    engine.module = module
    engine.use_ulysses_sp = sp_size > 1
    engine.ulysses_sequence_parallel_size = sp_size
    engine.pad_to_length = None
    engine.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits
    return engine


def _micro_batch(lengths: list[int], seed: int, fused: bool, remove_padding: bool = True, **flags):
    """verl's micro-batch: nested (jagged) input_ids / position_ids and the engine's non-tensor flags."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    nested = {
        "input_ids": torch.nested.nested_tensor(ids, layout=torch.jagged),
        "position_ids": torch.nested.nested_tensor([torch.arange(n) for n in lengths], layout=torch.jagged),
    }
    batch = TensorDict(nested, batch_size=[len(lengths)])
    settings = {"calculate_entropy": True, "calculate_sum_pi_squared": True} | flags
    tu.assign_non_tensor(
        batch,
        temperature=ENGINE_TEMPERATURE,
        use_remove_padding=remove_padding,
        pad_mode=DatasetPadMode.NO_PADDING,
        use_fused_kernels=fused,
        **settings,
    )
    return batch


def _engine_outputs(engine, batch) -> dict:
    """``forward_step``'s three calls (it also moves the batch to the accelerator and autocasts)."""
    model_inputs, output_args = engine.prepare_model_inputs(micro_batch=batch)
    output = engine.module(**model_inputs, use_cache=False)
    return engine.prepare_model_outputs(
        output=output, output_args=output_args, micro_batch=batch, logits_processor_func=None
    )


def _check_engine_outputs(mine: dict, theirs: dict, dtype: torch.dtype, what: str, last_labels: bool = True) -> None:
    """``last_labels=False``: skip each sequence's last log-prob, whose label is not the same token on
    verl's two padded paths (the fused forward rolls each padded row, the logits path the packed stream);
    it predicts nothing in the response."""
    assert set(mine) == set(theirs) == {"log_probs", "entropy", "sum_pi_squared"}, (set(mine), set(theirs))
    for key in theirs:
        assert mine[key].is_nested and mine[key].offsets().equal(theirs[key].offsets()), key
        keep = torch.ones(mine[key].values().shape[0], dtype=torch.bool)
        if key == "log_probs" and not last_labels:
            keep[mine[key].offsets()[1:] - 1] = False
        _check_close(f"{what} {key}", mine[key].values()[keep], theirs[key].values()[keep], dtype)


@pytest.mark.parametrize("remove_padding", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sum_pi_squared_through_verls_engine_matches_its_unfused_path(dtype, remove_padding):
    ref = _model(False, dtype)
    model = _patched(copy.deepcopy(ref), remove_padding=remove_padding)
    lengths = [5, 7, 4]
    layout = {"remove_padding": remove_padding}
    mine = _engine_outputs(_engine(model), _micro_batch(lengths, 3, fused=True, **layout))
    theirs = _engine_outputs(_engine(_unfused(ref)), _micro_batch(lengths, 3, fused=False, **layout))
    _check_engine_outputs(mine, theirs, dtype, f"{dtype} remove_padding={remove_padding}", remove_padding)
    # The Σπ² of a distribution lies in [1/V, 1]: a check that does not lean on the oracle.
    values = mine["sum_pi_squared"].values()
    assert bool(((values >= 1 / V - 1e-12) & (values <= 1)).all())


def test_optimal_token_baseline_advantages_from_the_fused_engine_equal_the_unfused_ones():
    """The trainer's path after ``compute_log_prob``: ``no_padding_2_padding`` of the engine's
    ``log_probs`` and ``sum_pi_squared`` (as ``_compute_old_log_prob`` does), then verl's
    ``optimal_token_baseline`` estimator, with Σπ² from each engine path."""
    import numpy as np
    from verl.trainer.ppo import core_algos
    from verl.workers.utils.padding import no_padding_2_padding

    prompts, responses = [3, 2, 4, 3], [4, 5, 2, 4]
    ref = _model(False, torch.float64)
    model = _patched(copy.deepcopy(ref))
    advantages = []
    for module, fused in ((model, True), (_unfused(ref), False)):
        batch = _micro_batch([p + r for p, r in zip(prompts, responses, strict=True)], 8, fused=fused)
        ids = batch["input_ids"].unbind()
        batch["prompts"] = torch.nested.nested_tensor(
            [i[:p] for i, p in zip(ids, prompts, strict=True)], layout=torch.jagged
        )
        batch["responses"] = torch.nested.nested_tensor(
            [i[p:] for i, p in zip(ids, prompts, strict=True)], layout=torch.jagged
        )
        out = _engine_outputs(_engine(module), batch)
        old_log_probs = no_padding_2_padding(out["log_probs"], batch)
        sum_pi_squared = no_padding_2_padding(out["sum_pi_squared"], batch)
        assert sum_pi_squared.shape == (len(prompts), max(responses))
        mask = (torch.arange(max(responses)) < torch.tensor(responses).unsqueeze(1)).to(torch.float64)
        rewards = torch.zeros_like(mask)
        last = torch.tensor(responses) - 1
        rewards[torch.arange(len(responses)), last] = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
        adv, _ = core_algos.compute_optimal_token_baseline_advantage(
            rewards, mask, np.array(["a", "a", "b", "b"]), old_log_probs, sum_pi_squared
        )
        advantages.append(adv)
    assert advantages[1].abs().max() > 0.1  # the baseline is not trivial here
    _check_close("optimal_token_baseline advantages", advantages[0], advantages[1], torch.float64)


def test_sum_pi_squared_is_computed_only_when_verl_asks():
    model = _patched(_model(False, torch.float64))
    batch = _micro_batch([4, 6], 5, fused=True, calculate_sum_pi_squared=False)
    engine = _engine(model)
    model_inputs, _ = engine.prepare_model_inputs(micro_batch=batch)
    assert "return_sum_pi_squared" not in model_inputs
    assert engine.module(**model_inputs, use_cache=False).sum_pi_squared is None
    assert set(_engine_outputs(engine, batch)) == {"log_probs", "entropy"}
    # Another backend keeps verl's own refusal.
    torch_backend = _model(False, torch.float64)
    verl_monkey_patch.apply_monkey_patch(torch_backend, use_fused_kernels=True, fused_kernels_backend="torch")
    with pytest.raises(NotImplementedError, match="calculate_sum_pi_squared=True is not supported"):
        _engine_outputs(_engine(torch_backend), _micro_batch([4, 6], 5, fused=True))


# Top-k distillation: verl's unfused engine computes the outputs from the logits in its logits
# processor, the loss function the worker builds (partial(distillation_ppo_loss, ...)); the clamp
# (about log(1 / V)) cuts some of the log-probs.
K_TEACHER = 8
DISTILLATION_CONFIG = SimpleNamespace(
    distillation_loss=SimpleNamespace(log_prob_min_clamp=-4.5, use_chunked_topk=False)
)
DISTILLATION_KEYS = ("distillation_losses", "student_mass", "teacher_mass")


def _distillation_loss_function():
    import functools

    from verl.trainer.distillation import distillation_ppo_loss

    return functools.partial(
        distillation_ppo_loss, config=SimpleNamespace(strategy="fsdp2"), distillation_config=DISTILLATION_CONFIG
    )


def _with_teacher(batch, lengths: list[int], seed: int):
    """A teacher's top-k ids and log-probs per token, nested like verl's ``teacher_ids`` / ``teacher_logprobs``."""
    g = torch.Generator().manual_seed(500 + seed)
    top = [(2 * torch.randn(n, V, generator=g, dtype=torch.float64)).log_softmax(-1).topk(K_TEACHER) for n in lengths]
    batch["teacher_ids"] = torch.nested.nested_tensor([t.indices for t in top], layout=torch.jagged)
    batch["teacher_logprobs"] = torch.nested.nested_tensor([t.values for t in top], layout=torch.jagged)
    return batch


def _distillation_outputs(engine, lengths, seed, fused):
    batch = _micro_batch(lengths, seed, fused=fused, distillation_use_topk=True, calculate_sum_pi_squared=False)
    batch = _with_teacher(batch, lengths, seed)
    model_inputs, output_args = engine.prepare_model_inputs(micro_batch=batch)
    output = engine.module(**model_inputs, use_cache=False)
    return engine.prepare_model_outputs(output, output_args, batch, _distillation_loss_function())


def _distillation_loss(out: dict, seed: int) -> torch.Tensor:
    values = out["distillation_losses"].values()
    adv, w = _weights(values.numel(), seed, values.dtype)
    return (w * values).sum() - (adv * out["log_probs"].values()).sum()


def test_topk_distillation_through_verls_engine_matches_its_unfused_path():
    ref = _model(False, torch.float64)
    model = _patched(copy.deepcopy(ref))
    lengths = [5, 7, 4]
    mine = _distillation_outputs(_engine(model), lengths, 4, fused=True)
    theirs = _distillation_outputs(_engine(_unfused(ref)), lengths, 4, fused=False)
    # The clamp bites on the student's and the teacher's side: some log-probs lie below it, some above.
    batch = _with_teacher(_micro_batch(lengths, 4, fused=False), lengths, 4)
    with torch.no_grad():
        ids, pos = batch["input_ids"].values().unsqueeze(0), batch["position_ids"].values().unsqueeze(0)
        logits = ref.lm_head(ref.model(input_ids=ids, position_ids=pos).last_hidden_state)[0] / ENGINE_TEMPERATURE
    student = logits.log_softmax(-1).gather(-1, batch["teacher_ids"].values())
    clamp = DISTILLATION_CONFIG.distillation_loss.log_prob_min_clamp
    for side in (student, batch["teacher_logprobs"].values()):
        assert bool((side < clamp).any()) and bool((side > clamp).any())
    for key in ("log_probs", "entropy", *DISTILLATION_KEYS):
        assert mine[key].is_nested and mine[key].offsets().equal(theirs[key].offsets()), key
        _check_close(f"distillation {key}", mine[key].values(), theirs[key].values(), torch.float64)
    _distillation_loss(mine, 4).backward()
    _distillation_loss(theirs, 4).backward()
    mine_grads, their_grads = _grads(model), _grads(ref)
    for name, g in their_grads.items():
        _check_close(f"distillation grad {name}", mine_grads[name], g, torch.float64)


def test_topk_distillation_on_padded_sequences_is_refused_in_the_engine():
    model = _patched(_model(False, torch.float64), remove_padding=False)
    batch = _micro_batch([4, 6], 5, fused=True, remove_padding=False, distillation_use_topk=True)
    with pytest.raises(ValueError, match=r"distillation_use_topk=True runs with .*use_remove_padding=False"):
        _engine(model).prepare_model_inputs(micro_batch=_with_teacher(batch, [4, 6], 5))


def test_topk_distillation_needs_verls_distillation_loss_function():
    model = _patched(_model(False, torch.float64))
    batch = _micro_batch([4, 6], 5, fused=True, distillation_use_topk=True, calculate_sum_pi_squared=False)
    engine = _engine(model)
    model_inputs, output_args = engine.prepare_model_inputs(micro_batch=_with_teacher(batch, [4, 6], 5))
    output = engine.module(**model_inputs, use_cache=False)
    with pytest.raises(RuntimeError, match=r"distillation_config in the engine's loss function"):
        engine.prepare_model_outputs(output, output_args, batch, None)


# ----------------------------------------------------------------------------------------------
# Heads that transform the logits: tiny random Gemma 2 (soft-cap), Cohere (logit_scale) and Granite
# (logits_scaling) against their own forward's logits, then verl's temperature.

SOFTCAP = 1.5  # small, so that the cap changes the logits of these tiny models substantially
HEADS = {
    # family: (config class, model class, the head's setting)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": SOFTCAP, "head_dim": 8}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.3}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 3.0}),
}


@pytest.fixture(params=sorted(HEADS))
def head_family(request):
    """(family, its model class); the class's own forward is restored after verl's class-level patch."""
    import transformers

    config_name, model_name, settings = HEADS[request.param]
    cls = getattr(transformers, model_name)
    forward = cls.forward
    yield request.param, getattr(transformers, config_name), cls, settings, forward
    cls.forward = forward


def _head_model(config_cls, model_cls, settings, dtype):
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
        **settings,
    )
    if hasattr(config, "attn_logit_softcapping"):
        config.attn_logit_softcapping = None  # lets sdpa run Gemma 2's attention
    model = model_cls(config)
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)  # raw logits of a few units: the cap bites
    return model.to(dtype)


def test_heads_that_transform_the_logits_match_their_own_logits_path(head_family):
    family, config_cls, model_cls, settings, own_forward = head_family
    dtype = torch.float64
    batch = _packed([6, 5], seed=7)
    ref = _head_model(config_cls, model_cls, settings, dtype)
    model = _patched(copy.deepcopy(ref))
    out = _call(model, batch)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    logits = own_forward(ref, **inputs).logits  # capped / scaled by the model's own forward
    with torch.no_grad():
        raw = ref.lm_head(ref.model(**inputs).last_hidden_state)
    if family == "gemma2":
        assert raw.abs().max() > 2 * SOFTCAP >= 2 * logits.abs().max()
    else:  # the head's factor, seen in the model's own logits
        factor = settings.get("logit_scale", 1 / settings.get("logits_scaling", 1.0))
        torch.testing.assert_close(logits, raw * factor, **TOL[dtype])
    logits = logits / TEMPERATURE  # verl's logits path: the model's logits, then the temperature
    logp = verl_F.logprobs_from_logits(logits, batch["shift_labels"])
    ent = verl_F.entropy_from_logits(logits)
    torch.testing.assert_close(out.log_probs, logp, **TOL[dtype])
    torch.testing.assert_close(out.entropy, ent, **TOL[dtype])
    _loss(out.log_probs, out.entropy, 7).backward()
    _loss(logp, ent, 7).backward()
    mine, theirs = _grads(model), _grads(ref)
    for name, g in theirs.items():
        torch.testing.assert_close(mine[name], g, **TOL[dtype], msg=lambda m, name=name: f"{family} {name}: {m}")


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


def _engine_sum_pi_squared(rank: int, world: int) -> None:
    """verl's engine on FSDP2: data parallel (each rank its micro-batch) and Ulysses (one micro-batch
    split across the ranks at a sequence boundary, gathered by the engine), against the engine's
    unfused path on the unsharded model."""
    from verl.utils import ulysses

    for dtype, tied in ((torch.float64, False), (torch.float64, True), (torch.float32, False)):
        ref = _model(tied, dtype)
        model = _fsdp2(_patched(copy.deepcopy(ref)), world, reshard=True)
        lengths, seed = DP_BATCHES[rank]
        mine = _engine_outputs(_engine(model), _micro_batch(lengths, seed, fused=True))
        theirs = _engine_outputs(_engine(_unfused(ref)), _micro_batch(lengths, seed, fused=False))
        _check_engine_outputs(mine, theirs, dtype, f"data parallel rank {rank} {dtype} tied={tied}")
    ulysses.set_ulysses_sequence_parallel_group(torch.distributed.group.WORLD)
    try:
        ref = _model(False, torch.float64)
        model = _fsdp2(_patched(copy.deepcopy(ref)), world, reshard=True)
        mine = _engine_outputs(_engine(model, sp_size=world), _micro_batch([6, 6], 21, fused=True))
    finally:
        ulysses.set_ulysses_sequence_parallel_group(None)
    theirs = _engine_outputs(_engine(_unfused(ref)), _micro_batch([6, 6], 21, fused=False))
    _check_engine_outputs(mine, theirs, torch.float64, f"ulysses rank {rank}")
    # Top-k distillation under Ulysses: the teacher's tensors sliced as the tokens, the outputs gathered.
    ulysses.set_ulysses_sequence_parallel_group(torch.distributed.group.WORLD)
    try:
        mine = _distillation_outputs(_engine(model, sp_size=world), [6, 6], 22, fused=True)
    finally:
        ulysses.set_ulysses_sequence_parallel_group(None)
    theirs = _distillation_outputs(_engine(ref), [6, 6], 22, fused=False)
    for key in ("log_probs", "entropy", *DISTILLATION_KEYS):
        _check_close(f"ulysses distillation {key} rank {rank}", mine[key].values(), theirs[key].values(), torch.float64)


def _all_scenarios(rank: int, world: int) -> None:
    warnings.filterwarnings("ignore")
    for dtype, tied, reshard in SCENARIOS:
        _data_parallel(rank, world, dtype, tied, reshard)
    for tied in (False, True):
        _sequence_split(rank, world, tied)
    _engine_sum_pi_squared(rank, world)


def test_fsdp2_data_parallel_and_sequence_split_match_one_process():
    trainer_spawn.run(_all_scenarios, 2, timeout=300)
