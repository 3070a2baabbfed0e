r"""A small, reproducible demonstration of risk-seeking training (the ``rspo-kernels demo`` command).

The task
--------
A *coverage* task with verifiable rewards. There are ``M`` candidate answers and an endless
stream of prompts. Prompt ``p`` has features :math:`x_p \sim N(0, I_D)`; answer ``a`` has a
latent quality on it

.. math:: s_{pa} = x_p^\top u_a + b_a + \sigma_a \varepsilon_{pa}, \qquad
          \varepsilon_{pa} \sim N(0, 1) \text{ i.i.d.},

where :math:`u_a, b_a, \sigma_a` are drawn once per seed. The policy is one linear softmax
shared by every prompt, :math:`\pi_\theta(a \mid x) = \mathrm{softmax}(W^\top [x; 1])_a`, so it
sees :math:`x_p` but never :math:`\varepsilon_{pa}`: it cannot know which answers solve a given
prompt, only which are likely to. Rewards are a deterministic function of (prompt, answer):

* Pass@k: :math:`R = 1[s_{pa} > 0]` (the answer solves the prompt);
* Max@k: :math:`R = \mathrm{sigmoid}(s_{pa})`, a continuous quality score.

Why the best single answer and the best set of k answers differ
---------------------------------------------------------------
Write :math:`q_p = \sum_{a \in S_p} \pi(a \mid x_p)` for the mass the policy puts on the answers
that solve prompt ``p``. Then :math:`\mathrm{Pass@}k = E_p[1 - (1 - q_p)^k]`. For ``k = 1`` it is
*linear* in :math:`\pi(\cdot \mid x)`, so it is maximised at a vertex: all mass on the answer
with the largest :math:`P(s_{pa} > 0 \mid x_p)`, a deterministic policy, and then Pass@k =
Pass@1 for every k because the same answer is drawn k times. For ``k > 1`` it is strictly concave
in :math:`q_p`, and because the :math:`\varepsilon_{pa}` are independent across answers, the
events "answer a solves p" are conditionally independent given :math:`x_p`; spreading mass over
the m most promising answers gives :math:`1 - (1 - q_p)^k` close to the probability that *any* of
them solves ``p``, which exceeds the best single answer's success probability. The same holds for
Max@k: Max@1 is linear in :math:`\pi` (pick the largest :math:`E[R \mid x]`), while
:math:`E[\max_{i \le k} R_i]` rewards drawing different answers with independent noise, and
answers with a large :math:`\sigma_a` (the risky :math:`\pi_B` of the paper's Figure 1).
Measured on seed 0 with exact policies (before any training was run): all mass on the top
answer gives pass@1 = pass@16 = 0.62, a uniform mixture over the top 8 gives pass@1 = 0.34 and
pass@16 = 0.91, and the top 2 and top 4 win at pass@2 and pass@4. Nothing in the task was chosen
with the paper's three claims in view; the task sizes were fixed from those oracle numbers and
the 2-core time budget.

What is compared
----------------
Policy gradient (``k = 1``, where every estimator gives ``w = R``), the hitchhiking baseline
(paper Section 3) and RSPO for k in {2, 4, 8}, each trained from the uniform policy with Adam
on ``loss = -(1/n) sum_i w_i log pi(y_i)`` (weights from :mod:`rspo_kernels`, constants), ``n``
samples per prompt. Every (seed, method) pair is one independent policy; all of them train at
once as one batched tensor, and Adam's update is elementwise, so they never interact. Evaluation
samples ``eval_samples`` answers for each of ``eval_prompts`` held-out prompts and applies the
library's unbiased :func:`~rspo_kernels.pass_at_k` / :func:`~rspo_kernels.max_at_k`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

import rspo_kernels as rk
from rspo_kernels.demo.config import OBJECTIVES, QUICK, DemoConfig, Method, methods
from rspo_kernels.demo.report import check_claims, format_report, json_record

__all__ = [
    "torch_threads",
    "DemoConfig",
    "QUICK",
    "Method",
    "methods",
    "run_demo",
    "check_claims",
    "json_record",
    "format_report",
]

_F64 = torch.float64


class CoverageTask:
    """One task instance: answer parameters and a sampler of fresh prompts.

    Parameters
    ----------
    task_seed : int
        Draws :math:`u_a, b_a, \\sigma_a` from ``torch.Generator().manual_seed(task_seed)``.
    num_answers, feature_dim : int
        ``M`` and ``D``.
    """

    def __init__(self, task_seed: int, num_answers: int, feature_dim: int):
        g = torch.Generator().manual_seed(task_seed)
        # x @ u_a ~ N(0, 1) marginally, so the predictable part and the noise are comparable.
        scale = 1 / math.sqrt(feature_dim)
        self.directions = scale * torch.randn(feature_dim, num_answers, generator=g, dtype=_F64)  # [D, M]
        self.bias = -1.5 + 0.5 * torch.randn(num_answers, generator=g, dtype=_F64)  # [M]
        self.noise = 0.5 + torch.rand(num_answers, generator=g, dtype=_F64)  # [M]

    def sample(self, num_prompts: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh prompts: features ``[P, D+1]`` (last column 1, the bias input) and qualities ``[P, M]``."""
        dim, num_answers = self.directions.shape
        x = torch.randn(num_prompts, dim, generator=g, dtype=_F64)
        eps = torch.randn(num_prompts, num_answers, generator=g, dtype=_F64)
        quality = x @ self.directions + self.bias + self.noise * eps
        return torch.cat([x, torch.ones(num_prompts, 1, dtype=_F64)], dim=1), quality


def reward(quality: torch.Tensor, objective: str) -> torch.Tensor:
    """Verifiable reward from latent quality: solved (Pass@k) or ``sigmoid`` quality (Max@k)."""
    return (quality > 0).to(_F64) if objective == "pass@k" else torch.sigmoid(quality)


def _weight_fn(objective: str) -> Callable[..., Any]:
    return rk.pass_at_k_weights if objective == "pass@k" else rk.max_at_k_weights


def _metric_fn(objective: str) -> Callable[..., Any]:
    return rk.pass_at_k if objective == "pass@k" else rk.max_at_k


def _sample_answers(logits: torch.Tensor, num: int, g: torch.Generator) -> torch.Tensor:
    """``num`` i.i.d. answers per row of ``logits [..., M]``, returned as ``[..., num]``."""
    probs = torch.softmax(logits, dim=-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), num, replacement=True, generator=g)
    return flat.reshape(*logits.shape[:-1], num)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean policy entropy over prompts, in nats: ``[R, P, M] -> [R]``."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean(-1)


def _seed_generators(seeds: tuple[int, ...], objective: str) -> list[torch.Generator]:
    """One generator per training seed and objective, so seed s gives the same run whatever the other seeds."""
    offset = OBJECTIVES.index(objective) + 1
    return [torch.Generator().manual_seed(seed * 1_000_003 + offset) for seed in seeds]


def _train_objective(
    objective: str,
    config: DemoConfig,
    task: CoverageTask,
    eval_x: torch.Tensor,
    generators: list[torch.Generator],
    on_step: Callable[[], None],
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Train every (method, seed) policy for one objective.

    Returns
    -------
    params : torch.Tensor
        Final parameters ``[T, S, D+1, M]`` (T methods, S seeds).
    entropy : torch.Tensor
        Entropy curves ``[T, S, E]`` on the evaluation prompts ``eval_x [P, D+1]``.
    entropy_steps : list of int
        The step at which each of the ``E`` entropy points was measured.
    """
    table = methods(config.train_ks, objective)
    n, batch = config.samples_per_prompt, config.prompts_per_step
    params = torch.zeros(
        len(table),
        len(generators),
        config.feature_dim + 1,
        config.num_answers,
        dtype=_F64,
        requires_grad=True,
    )
    optimiser = torch.optim.Adam([params], lr=config.learning_rate)
    weights_of = _weight_fn(objective)
    curves, curve_steps = [], []
    for step in range(config.steps + 1):
        if step % config.entropy_every == 0 or step == config.steps:
            with torch.no_grad():
                curves.append(_entropy(eval_x @ params))
            curve_steps.append(step)
        if step == config.steps:
            break
        # Each seed draws its own prompts; within a seed every method sees the same prompts.
        prompts = [task.sample(batch, g) for g in generators]
        x = torch.stack([p[0] for p in prompts])  # [S, B, D+1]
        quality = torch.stack([p[1] for p in prompts])  # [S, B, M]
        log_probs = torch.log_softmax(x @ params, dim=-1)  # [T, S, B, M]
        with torch.no_grad():
            answers = torch.stack(
                [_sample_answers(log_probs[:, s], n, g) for s, g in enumerate(generators)], dim=1
            )  # [T, S, B, n]
            rewards = reward(torch.gather(quality.expand(len(table), -1, -1, -1), 3, answers), objective)
            weights = torch.stack(
                [
                    weights_of(rewards[t].reshape(-1, n), m.k, estimator=m.estimator, validate=False)
                    for t, m in enumerate(table)
                ]
            ).reshape(rewards.shape)
        chosen = torch.gather(log_probs, 3, answers)  # [T, S, B, n]
        # Sum over methods and seeds: their parameters are disjoint, so the gradients do not mix.
        loss = -(weights * chosen).mean(dim=3).mean(dim=2).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        on_step()
    return params.detach(), torch.stack(curves, dim=-1), curve_steps


def _evaluate(
    objective: str,
    params: torch.Tensor,
    eval_prompts: tuple[torch.Tensor, torch.Tensor],
    config: DemoConfig,
    generators: list[torch.Generator],
) -> dict[int, torch.Tensor]:
    """Unbiased metric@j for every j in ``eval_ks``: ``{j: [T, S]}``, the mean over prompts."""
    x, quality = eval_prompts
    logits = x @ params  # [T, S, P, M]
    answers = torch.stack(
        [_sample_answers(logits[:, s], config.eval_samples, g) for s, g in enumerate(generators)], dim=1
    )  # [T, S, P, N]
    rewards = reward(torch.gather(quality.expand(*logits.shape[:2], -1, -1), 3, answers), objective)
    flat = rewards.reshape(-1, config.eval_samples)
    metric = _metric_fn(objective)
    return {j: metric(flat, j).reshape(rewards.shape[:3]).mean(-1) for j in config.eval_ks}


def _mean_std(values: torch.Tensor) -> dict[str, float]:
    """Mean and sample std over seeds (std 0 for a single seed), rounded as the table prints them."""
    std = values.std(unbiased=True).item() if values.numel() > 1 else 0.0
    return {"mean": round(values.mean().item(), 3), "std": round(std, 3)}


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the body with ``threads`` torch intra-op threads (``None``: leave it), then restore."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(config: DemoConfig, progress: bool = False, threads: int | None = 1) -> dict[str, Any]:
    """Train and evaluate every method on both objectives.

    Parameters
    ----------
    config : DemoConfig
        Sizes, seeds and hyperparameters.
    progress : bool, default False
        Show a tqdm progress bar on stderr.
    threads : int or None, default 1
        torch intra-op threads while the demo runs (restored afterwards); ``None`` keeps torch's
        setting. The policies are tiny (a ``[5, 32]`` matrix per seed and method), so extra threads
        only add synchronisation: beside two CPU-bound processes on 2 cores, torch's default
        (one thread per core) made the demo 2.4x slower than one thread (47 s against 20 s).

    Returns
    -------
    dict
        ``{"config", "versions", "tables", "claims"}`` (what the JSON file holds) plus
        ``"curves"`` (entropy curves for the figure, not written to JSON). ``tables[objective]``
        has ``columns`` and ``rows``; each row maps ``method`` and every column to
        ``{"mean", "std"}`` over seeds. Identical for identical ``config``.
    """
    with torch_threads(threads):
        return _run_demo(config, progress)


def _run_demo(config: DemoConfig, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    task = CoverageTask(config.task_seed, config.num_answers, config.feature_dim)
    result: dict[str, Any] = {"config": asdict(config), "versions": _versions(), "tables": {}, "curves": {}}
    bar = tqdm(total=len(OBJECTIVES) * config.steps, desc="training", disable=not progress, unit="step")
    try:
        for objective in OBJECTIVES:
            bar.set_description(f"training for {objective}")
            table = methods(config.train_ks, objective)
            # The held-out prompts depend on the task only: every seed is scored on the same set.
            eval_prompts = task.sample(config.eval_prompts, torch.Generator().manual_seed(config.task_seed + 7919))
            generators = _seed_generators(config.seeds, objective)
            params, curves, curve_steps = _train_objective(
                objective, config, task, eval_prompts[0], generators, lambda: bar.update(1)
            )
            final = _evaluate(objective, params, eval_prompts, config, generators)
            initial = _evaluate(objective, torch.zeros_like(params[:1]), eval_prompts, config, generators)
            name = objective.split("@")[0]
            columns = [f"{name}@{j}" for j in config.eval_ks] + ["entropy"]
            rows = [
                {"method": "initial (uniform)"}
                | {f"{name}@{j}": _mean_std(initial[j][0]) for j in config.eval_ks}
                | {"entropy": {"mean": round(math.log(config.num_answers), 3), "std": 0.0}}
            ]
            for t, m in enumerate(table):
                rows.append(
                    {"method": m.name}
                    | {f"{name}@{j}": _mean_std(final[j][t]) for j in config.eval_ks}
                    | {"entropy": _mean_std(curves[t, :, -1])}
                )
            result["tables"][objective] = {"columns": columns, "rows": rows}
            result["curves"][objective] = {"steps": curve_steps, "entropy": curves.numpy(), "methods": table}
    finally:
        bar.close()
    result["claims"] = check_claims(result["tables"], config)
    return result


def _versions() -> dict[str, str]:
    import platform

    return {
        "rspo_kernels": getattr(rk, "__version__", "unknown"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
