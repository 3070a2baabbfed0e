"""What determines a demo run: its configuration and the training rules it compares.

Kept apart from :mod:`rspo_kernels.demo` (the task and the training) and
:mod:`rspo_kernels.demo.report` (the verdicts and the printed report), which both need it, so
that neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["OBJECTIVES", "DemoConfig", "QUICK", "Method", "methods"]

OBJECTIVES = ("pass@k", "max@k")


@dataclass(frozen=True)
class DemoConfig:
    """Everything that determines a demo run; the JSON output records it.

    Attributes
    ----------
    num_answers, feature_dim : int
        ``M`` candidate answers and ``D`` prompt features.
    steps : int
        Optimiser steps per policy.
    prompts_per_step, samples_per_prompt : int
        Prompts in each training batch, and ``n`` sampled answers per prompt (``n >= 2 * max k``).
    learning_rate : float
        Adam's step size.
    seeds : tuple of int
        Training seeds (prompt stream and answer sampling); tables show mean and std over them.
    task_seed : int
        The task instance (answer parameters and the held-out prompts), shared by every seed.
    train_ks, eval_ks : tuple of int
        k values trained with (besides policy gradient's k = 1) and evaluated at.
    eval_prompts, eval_samples : int
        Held-out prompts, and answers sampled for each when evaluating (``>= max(eval_ks)``).
    entropy_every : int
        Steps between entropy measurements for the entropy curves.
    """

    num_answers: int = 32
    feature_dim: int = 4
    steps: int = 1000
    prompts_per_step: int = 32
    samples_per_prompt: int = 16
    learning_rate: float = 0.05
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    task_seed: int = 0
    train_ks: tuple[int, ...] = (2, 4, 8)
    eval_ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    eval_prompts: int = 2048
    eval_samples: int = 32
    entropy_every: int = 20

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2 * max(self.train_ks):
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt} must be >= 2 * max(train_ks)")
        if self.eval_samples < max(self.eval_ks):
            raise ValueError(f"eval_samples={self.eval_samples} must be >= max(eval_ks)")
        if not self.seeds or self.steps < 1:
            raise ValueError("need at least one seed and one step")


QUICK = DemoConfig(steps=60, seeds=(0, 1, 2), eval_prompts=256, entropy_every=5)


@dataclass(frozen=True)
class Method:
    """One training rule: an estimator and the k it is trained for (k = 1 is policy gradient)."""

    name: str
    estimator: str
    k: int
    family: str = field(compare=False)


def methods(train_ks: tuple[int, ...], objective: str = "max@k") -> list[Method]:
    """Policy gradient, then hitchhiking and RSPO for every training k, in table order.

    For Pass@k, Chen et al.'s "Pass@k Training" advantage (``passk_training_std``, the estimator
    Pass@k-training users compare against; biased, see docs/math.md § Other estimators) follows
    RSPO. It has no Max@k form.
    """
    out = [Method("PG (k=1)", "rspo", 1, "pg")]
    out += [Method(f"hitchhiking k={k}", "hitchhiking", k, "hitchhiking") for k in train_ks]
    out += [Method(f"RSPO k={k}", "rspo", k, "rspo") for k in train_ks]
    if objective == "pass@k":
        out += [Method(f"PassK-Training k={k}", "passk_training_std", k, "passk_training") for k in train_ks]
    return out
