"""RSPOTrainer under DDP: 2 gloo processes, 3 optimizer steps, replicas bit-identical.

TRL's ``GRPOTrainer`` (and so ``RSPOTrainer``) computes the per-token log-probs from the hidden
states by default (``add_fused_lm_head``: the logits never exist) through the wrapped model's own
forward, so DDP's reducer runs. The test trains on different prompts on the two ranks, so that
replicas which skipped the gradient all-reduce would drift apart.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("trl")

import trainer_spawn  # noqa: E402

STEPS = 3


def _train_ddp(rank: int, world: int, out_dir: str, options: dict) -> None:
    warnings.filterwarnings("ignore")
    from datasets import Dataset
    from test_integration_trl import PROMPTS, _model, _tokenizer, tiny_run

    from rspo_kernels.integrations.trl import RSPOConfig, RSPOTrainer

    def reward_fn(completion_ids, **kwargs):
        return [float(sum(ids) % 2) for ids in completion_ids]

    tokenizer = _tokenizer()
    model = _model(tokenizer)
    initial = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    args = RSPOConfig(**tiny_run(os.path.join(out_dir, str(rank)), STEPS), rspo_k=2, **options)
    trainer = RSPOTrainer(
        model=model,
        reward_funcs=reward_fn,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )
    assert trainer.accelerator.num_processes == world
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    assert trainer.state.global_step == STEPS
    params = torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach()
    assert not torch.equal(params, initial), "training did not change the model"
    replicas = [torch.empty_like(params) for _ in range(world)]
    torch.distributed.all_gather(replicas, params)
    drift = max(float((r - replicas[0]).abs().max()) for r in replicas)
    assert drift == 0.0, f"replicas differ by {drift:.3g} after {STEPS} steps"


def test_rspo_trainer_replicas_stay_bit_identical_under_ddp(tmp_path):
    trainer_spawn.run(_train_ddp, 2, str(tmp_path), {}, timeout=240)


def test_removed_fused_linear_flag_points_at_trls_native_path(tmp_path):
    from rspo_kernels.integrations.trl import RSPOConfig

    with pytest.raises(ValueError, match=r"use_fused_linear_loss=True\) was removed.*add_fused_lm_head"):
        RSPOConfig(output_dir=str(tmp_path), num_generations=4, use_cpu=True, use_fused_linear_loss=True)
