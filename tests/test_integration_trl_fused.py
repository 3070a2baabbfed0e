"""``RSPOConfig(use_fused_linear_loss=True)`` against real TRL: training steps with a tiny random model.

Each step computes the loss twice on the same batch, fused (hidden states and ``lm_head``) and with
GRPO's own ``_compute_loss``, and compares values and the gradients of every parameter: the fused
path must be the same loss, only without the logits.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from test_integration_trl import PROMPTS, _model, _tokenizer, tiny_run  # noqa: E402

from rspo_kernels.integrations.trl import RSPOConfig, RSPOTrainer  # noqa: E402
from rspo_kernels.integrations.trl_fused import fused_linear_loss_settings  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit._script")


class _Compare(RSPOTrainer):
    """Trains on the fused loss and records GRPO's loss and gradients on the same batches."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compared = []

    def _compute_loss(self, model, inputs):
        fused = super()._compute_loss(model, inputs)
        self.args.use_fused_linear_loss = False
        try:
            plain = super()._compute_loss(model, inputs)
        finally:
            self.args.use_fused_linear_loss = True
        params = [p for p in model.parameters() if p.requires_grad]
        g_fused = torch.autograd.grad(fused, params, retain_graph=True)
        g_plain = torch.autograd.grad(plain, params, retain_graph=True)
        self.compared.append((fused.detach(), plain.detach(), g_fused, g_plain))
        return fused


def _config(tmp_path, loss_type, beta, max_steps):
    return RSPOConfig(
        **tiny_run(tmp_path, max_steps),
        rspo_k=2,
        use_fused_linear_loss=True,
        loss_type=loss_type,
        beta=beta,
        use_bias_correction_kl=False,
        num_iterations=2,  # old log-probs differ from the current ones on the second pass: the ratio is clipped
    )


def _train(tmp_path, loss_type, beta=0.0, max_steps=4, trainer_cls=_Compare, run=True):
    tokenizer = _tokenizer()

    def reward_fn(completion_ids, **kwargs):
        return [float(sum((i + 1) * t for i, t in enumerate(ids)) % 2) for ids in completion_ids]

    # Any loss_type other than dr_grpo warns (the RSPO weights want a constant normaliser); the
    # fused path must still equal GRPO's own loss for each of them.
    expect = pytest.warns(UserWarning, match="only loss_type='dr_grpo'") if loss_type != "dr_grpo" else nullcontext()
    with expect:
        args = _config(tmp_path, loss_type, beta, max_steps)
    model = _model(tokenizer)
    if beta != 0.0:  # TRL loads the reference model by name: save the tiny model and pass its path
        model.save_pretrained(tmp_path / "model")
        model = str(tmp_path / "model")
    trainer = trainer_cls(
        model=model,
        reward_funcs=reward_fn,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )
    if run:
        trainer.train()
    return trainer


@pytest.mark.parametrize("loss_type,beta", [("dapo", 0.0), ("bnpo", 0.04), ("grpo", 0.0), ("dr_grpo", 0.0)])
def test_fused_linear_loss_trains_and_equals_grpo_loss(tmp_path, loss_type, beta):
    trainer = _train(tmp_path, loss_type, beta)
    assert len(trainer.compared) == 4
    assert any(float(f) != 0 for f, *_ in trainer.compared)  # the run had signal
    for fused, plain, g_fused, g_plain in trainer.compared:
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
        for gf, gp in zip(g_fused, g_plain, strict=False):
            torch.testing.assert_close(gf, gp, rtol=1e-4, atol=1e-7)
    logged = [h for h in trainer.state.log_history if "loss" in h and "entropy" in h]
    assert logged and all(math.isfinite(h["loss"]) and h["entropy"] > 0 for h in logged)


def test_fused_linear_loss_changes_the_model(tmp_path):
    trainer = _train(tmp_path, "dapo", trainer_cls=RSPOTrainer)
    fresh = _model(_tokenizer())
    moved = [not torch.equal(a, b) for a, b in zip(trainer.model.parameters(), fresh.parameters(), strict=False)]
    assert all(moved)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"loss_type": "cispo"}, r"supports loss_type in .*got 'cispo'"),
        ({"importance_sampling_level": "sequence"}, r"does not support importance_sampling_level='sequence'"),
        ({"top_entropy_quantile": 0.5}, r"does not support top_entropy_quantile < 1"),
        ({"beta": 0.1, "use_bias_correction_kl": True}, r"does not support use_bias_correction_kl with beta > 0"),
    ],
)
def test_unsupported_grpo_options_are_named(options, match):
    class _Stub:  # the trainer attributes the settings read, as GRPOTrainer sets them from the config
        def __init__(self, args):
            self.args = args
            self.loss_type = args.loss_type
            self.importance_sampling_level = args.importance_sampling_level
            self.top_entropy_quantile = args.top_entropy_quantile
            self.off_policy_mask_threshold = args.off_policy_mask_threshold
            self.beta = args.beta
            self.temperature, self.epsilon_low, self.epsilon_high = args.temperature, args.epsilon, args.epsilon
            self.max_completion_length = args.max_completion_length

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # loss_type='cispo' also warns: not what this test checks
        args = RSPOConfig(
            output_dir="unused",
            num_generations=4,
            per_device_train_batch_size=4,
            report_to="none",
            use_cpu=True,
            bf16=False,
            rspo_k=2,
            use_fused_linear_loss=True,
            **options,
        )
    with pytest.raises(ValueError, match=match):
        fused_linear_loss_settings(_Stub(args))


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
def test_fully_masked_completion_equals_grpo_loss(tmp_path, loss_type):
    """A completion with no scored token: TRL's grpo / dr_grpo average over all rows, and so must we."""
    trainer = _train(tmp_path, loss_type, run=False)
    trainer.current_gradient_accumulation_steps = 2
    g = torch.Generator().manual_seed(0)
    B, P, C, V = 4, 3, 5, trainer.model.config.vocab_size
    mask = torch.ones(B, C, dtype=torch.long)
    mask[1] = 0
    mask[2, 3:] = 0
    inputs = {
        "prompt_ids": torch.randint(3, V, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(3, V, (B, C), generator=g),
        "completion_mask": mask,
        "advantages": torch.randn(B, generator=g),
        "num_items_in_batch": torch.tensor(17.0),
    }
    trainer.model.train()
    trainer._compute_loss(trainer.model, inputs)
    ((fused, plain, g_fused, g_plain),) = trainer.compared
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
    for gf, gp in zip(g_fused, g_plain, strict=False):
        torch.testing.assert_close(gf, gp, rtol=1e-4, atol=1e-7)
