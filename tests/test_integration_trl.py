"""The TRL adapter against real TRL: training steps on CPU with a tiny random model, no downloads."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import rspo_kernels as rk

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (TRL's own dependencies)
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from rspo_kernels.integrations.trl import RSPOConfig, RSPOTrainer, rspo_advantages  # noqa: E402

# Training imports torch._inductor (and deepspeed, where installed), which defines TorchScript
# methods that torch itself deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit._script")

NUM_GENERATIONS = 4
WORDS = [f"w{i}" for i in range(40)]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


class _Recorder(RSPOTrainer):
    """Records the generation batches and what the loss received."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generated, self.loss_inputs = [], []

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.generated.append({k: out[k].clone() for k in ("prompt_ids", "completion_ids", "advantages")})
        return out

    def _compute_loss(self, model, inputs):
        self.loss_inputs.append({k: inputs[k].clone() for k in ("prompt_ids", "completion_ids", "advantages")})
        return super()._compute_loss(model, inputs)


def _cpu_config(cls, **kwargs):
    defaults = dict(output_dir="unused", num_generations=4, per_device_train_batch_size=4, report_to="none")
    defaults.update(use_cpu=True, bf16=False)
    return cls(**{**defaults, **kwargs})


def _rows(batch) -> list[tuple]:
    return [
        (tuple(p.tolist()), tuple(c.tolist()), float(a))
        for p, c, a in zip(batch["prompt_ids"], batch["completion_ids"], batch["advantages"], strict=False)
    ]


def tiny_run(tmp_path, max_steps: int) -> dict:
    """RSPOConfig keywords of a few CPU steps on the tiny model (shared with tests/test_fused_trl_ddp.py)."""
    return dict(
        output_dir=str(tmp_path),
        num_generations=NUM_GENERATIONS,
        per_device_train_batch_size=4,
        steps_per_generation=2,  # 2 prompts per generation, shuffled over 2 loss steps
        max_completion_length=6,
        max_steps=max_steps,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


PROMPTS = [" ".join(WORDS[i : i + 3]) for i in range(0, 24, 3)]


def _train(tmp_path, reward_fn, objective, k, max_steps=4):
    tokenizer = _tokenizer()
    args = RSPOConfig(**tiny_run(tmp_path, max_steps), rspo_k=k, rspo_objective=objective)
    trainer = _Recorder(
        model=_model(tokenizer),
        reward_funcs=reward_fn,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("objective,k", [("pass@k", 2), ("max@k", 3)])
def test_loss_sees_rspo_weights_of_the_produced_rewards(tmp_path, objective, k):
    produced = []

    def reward_fn(completions, completion_ids, **kwargs):
        # Deterministic in the completion, so equal completions get equal rewards; one in five is
        # unscorable (None), which TRL turns into NaN.
        rewards = []
        for ids in completion_ids:
            h = sum((i + 1) * t for i, t in enumerate(ids))
            if objective == "pass@k":
                rewards.append(None if h % 5 == 4 else float(h % 2))
            else:
                rewards.append(None if h % 5 == 4 else (h % 7) / 7)
        produced.append([math.nan if r is None else r for r in rewards])
        return rewards

    trainer = _train(tmp_path, reward_fn, objective, k)

    assert len(trainer.generated) == len(produced) == 2
    weight_fn = rk.pass_at_k_weights if objective == "pass@k" else rk.max_at_k_weights
    for gen, rewards in zip(trainer.generated, produced, strict=False):
        rewards = torch.tensor(rewards, dtype=torch.float32)
        groups = torch.arange(rewards.numel()) // NUM_GENERATIONS
        # Independent reference: unscorable completions leave their group and get weight 0; a
        # group left with fewer than k completions gets 0 throughout.
        ok = ~torch.isnan(rewards)
        ok &= torch.bincount(groups[ok], minlength=int(groups.max()) + 1)[groups] >= k
        expected = torch.zeros_like(rewards)
        for g in groups[ok].unique():
            rows = ok & (groups == g)
            expected[rows] = weight_fn(rewards[rows][None, :], k)[0]
        torch.testing.assert_close(gen["advantages"], expected)
    # Every row the loss saw (shuffled, split into micro-batches) carries its generation's weight.
    generated = Counter(r for gen in trainer.generated for r in _rows(gen))
    seen = Counter(r for inputs in trainer.loss_inputs for r in _rows(inputs))
    assert seen == generated
    assert any(r[2] != 0 for r in seen)  # the run had signal: a zeroed advantage must not pass

    # Logged: the RSPO weights in the completions buffer, and the unbiased metric.
    logged = list(trainer._logs["advantages"])
    torch.testing.assert_close(torch.tensor(logged), trainer.generated[-1]["advantages"])
    history = [h for h in trainer.state.log_history if f"rspo/{objective.replace('@k', f'@{k}')}" in h]
    assert history and all(0 <= h[f"rspo/{objective.replace('@k', f'@{k}')}"] <= 1 for h in history)


def test_rspo_advantages_skips_groups_with_fewer_than_k_scorable():
    settings = _cpu_config(RSPOConfig, rspo_k=3).rspo_settings()
    nan = math.nan
    rewards = torch.tensor([1.0, 0.0, nan, 1.0, 1.0, nan, nan, 0.0, 0.0, 0.0, 1.0, 0.0])
    weights, metrics = rspo_advantages(rewards, 4, settings)
    expected = torch.zeros(12)
    expected[[0, 1, 3]] = rk.pass_at_k_weights(torch.tensor([[1.0, 0.0, 1.0]]), 3)[0]
    expected[8:] = rk.pass_at_k_weights(rewards[8:][None], 3)[0]
    torch.testing.assert_close(weights, expected)
    assert metrics["rspo/frac_groups_skipped"] == pytest.approx(1 / 3)
    kept = (rk.pass_at_k(rewards[[0, 1, 3]][None], 3)[0], rk.pass_at_k(rewards[8:][None], 3)[0])
    assert metrics["rspo/pass@3"] == pytest.approx(float(sum(kept)) / 2)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"rspo_k": 8}, r"^rspo_k=8 but num_generations=4.*lower rspo_k or raise num_generations"),
        ({"rspo_k": 2, "num_generations_eval": 1}, r"^rspo_k=2 but num_generations_eval=1"),
        ({"rspo_k": 4, "rspo_estimator": "pkpo_loo"}, r"'pkpo_loo'.*rspo_k=4.*num_generations"),
        ({"rspo_k": 3, "rspo_estimator": "hitchhiking"}, r"multiple of k.*rspo_estimator=hitchhiking"),
        ({"rspo_objective": "mean@k"}, r"rspo_objective='mean@k' is not an RSPO objective"),
        ({"rspo_estimator": "grpo"}, r"rspo_estimator='grpo' is not an estimator"),
    ],
)
def test_config_errors_name_the_field(options, match):
    with pytest.raises(ValueError, match=match):
        _cpu_config(RSPOConfig, **options)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # TRL's own config
def test_trainer_requires_rspo_config(tmp_path):
    tokenizer = _tokenizer()
    args = _cpu_config(trl.GRPOConfig, output_dir=str(tmp_path))
    with pytest.raises(TypeError, match=r"RSPOTrainer needs args=RSPOConfig"):
        RSPOTrainer(model=_model(tokenizer), reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args)


def test_every_library_estimator_is_accepted_by_name():
    for name in rk.ESTIMATORS:
        assert _cpu_config(RSPOConfig, rspo_k=2, rspo_estimator=name).rspo_settings().estimator == name


def test_loss_defaults_to_a_constant_normaliser_and_other_modes_warn():
    assert _cpu_config(RSPOConfig).loss_type == "dr_grpo"
    with pytest.warns(UserWarning, match=r"loss_type='dapo'.*only loss_type='dr_grpo'.*sampled lengths"):
        _cpu_config(RSPOConfig, loss_type="dapo")


def test_config_builds_without_warnings_on_this_transformers():
    """TRL 1.16 sets its gradient_checkpointing default on a name transformers >= 5.2x deprecates
    (a FutureWarning on every GRPOConfig); RSPOConfig sets it on the new name where one exists."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = _cpu_config(RSPOConfig)
    assert args.gradient_checkpointing is trl.GRPOConfig.gradient_checkpointing  # TRL's default kept
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the user's own use of the deprecated name
        args = _cpu_config(RSPOConfig, gradient_checkpointing=False)
    assert args.gradient_checkpointing is False and getattr(args, "activation_checkpointing", False) is False


def test_readme_snippet(tmp_path, monkeypatch):
    """The README's TRL lines, run as written, on this CPU machine with a tiny model."""
    import ast
    from dataclasses import dataclass

    from readme_snippets import snippet

    import rspo_kernels.integrations.trl as rspo_trl

    @dataclass
    class CPUConfig(RSPOConfig):  # the README targets a GPU; the rest is as written
        use_cpu: bool = True
        bf16: bool = False

    monkeypatch.setattr(rspo_trl, "RSPOConfig", CPUConfig)
    monkeypatch.chdir(tmp_path)
    code = snippet("### TRL", "python")
    *setup, construct = code.strip().splitlines()
    namespace = {}
    exec("\n".join(setup), namespace)
    args = namespace["args"]
    assert (args.num_generations, args.rspo_k, args.rspo_objective, args.loss_type) == (8, 4, "pass@k", "dr_grpo")

    call = ast.parse(construct).body[0].value
    assert [kw.arg for kw in call.keywords] == ["model", "reward_funcs", "args", "train_dataset"]
    tokenizer = _tokenizer()
    _model(tokenizer).save_pretrained("tiny")  # a local checkpoint stands for a hub name
    tokenizer.save_pretrained("tiny")
    namespace.update(
        model="tiny",
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        train_dataset=Dataset.from_dict({"prompt": ["w1 w2"] * 8}),
    )
    exec(construct.replace("=...", "={}").format(*(kw.arg for kw in call.keywords if kw.arg != "args")), namespace)
    assert isinstance(namespace["trainer"], RSPOTrainer)
