"""The demo's figure: metric@k curves per method (paper Figure 6 style) and entropy over training.

Kept apart from :mod:`rspo_kernels.demo` because matplotlib is an optional dependency
(``pip install rspo_kernels[plot]``); the demo runs without it and only skips the PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_demo"]

# Paper Figure 6: policy gradient black dashed, RSPO in reds and hitchhiking in blues, darker and
# thicker as k grows.
_REDS = ("#f4a582", "#d6604d", "#8b0000")
_BLUES = ("#92c5de", "#4393c3", "#08306b")
_GREENS = ("#a6dba0", "#5aae61", "#00441b")  # Chen et al.'s Pass@k Training (Pass@k only)


def _style(method: Any, rank: int) -> dict[str, Any]:
    """Line style for a method; ``rank`` is the position of its k among the training ks."""
    if method.family == "pg":
        return {"color": "black", "linestyle": "--", "linewidth": 1.5}
    palette = {"rspo": _REDS, "passk_training": _GREENS}.get(method.family, _BLUES)
    return {"color": palette[min(rank, len(palette) - 1)], "linestyle": "-", "linewidth": 1.0 + 0.8 * rank}


def plot_demo(result: dict[str, Any], path: Path) -> Path:
    """Write the demo figure as a PNG.

    Parameters
    ----------
    result : dict
        What :func:`rspo_kernels.demo.run_demo` returns (``tables``, ``curves``, ``config``).
    path : pathlib.Path
        Output file.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ImportError
        matplotlib is not installed.
    """
    # A bare Figure renders with Agg and never touches pyplot's global backend state, so there is
    # no display to need and no backend warning to raise.
    from matplotlib.figure import Figure

    config = result["config"]
    objectives = list(result["tables"])
    fig = Figure(figsize=(5.5 * len(objectives), 8.5))
    axes = fig.subplots(2, len(objectives), squeeze=False)
    for col, objective in enumerate(objectives):
        table, curves = result["tables"][objective], result["curves"][objective]
        name = objective.split("@")[0]
        ks = np.asarray(config["eval_ks"])
        rows = {row["method"]: row for row in table["rows"]}
        ax_metric, ax_entropy = axes[0, col], axes[1, col]
        for t, method in enumerate(curves["methods"]):
            rank = list(config["train_ks"]).index(method.k) if method.k in config["train_ks"] else 0
            style = _style(method, rank)
            row = rows[method.name]
            mean = np.array([row[f"{name}@{j}"]["mean"] for j in ks])
            std = np.array([row[f"{name}@{j}"]["std"] for j in ks])
            ax_metric.plot(ks, mean, marker="o", markersize=3, label=method.name, **style)
            ax_metric.fill_between(ks, mean - std, mean + std, color=style["color"], alpha=0.15, linewidth=0)
            entropy = curves["entropy"][t]  # [S, E]
            steps = np.asarray(curves["steps"])
            e_mean, e_std = entropy.mean(axis=0), entropy.std(axis=0)
            ax_entropy.plot(steps, e_mean, label=method.name, **style)
            ax_entropy.fill_between(
                steps, e_mean - e_std, e_mean + e_std, color=style["color"], alpha=0.15, linewidth=0
            )
        initial = rows.get("initial (uniform)")
        if initial is not None:
            ax_metric.plot(
                ks,
                [initial[f"{name}@{j}"]["mean"] for j in ks],
                color="grey",
                linestyle=":",
                label="initial (uniform)",
            )
        ax_metric.set_xscale("log", base=2)
        ax_metric.set_xticks(ks, [str(j) for j in ks])
        ax_metric.set_xlabel(f"k of the {name}@k evaluation")
        ax_metric.set_ylabel(f"{name}@k (unbiased, held-out prompts)")
        ax_metric.set_title(f"Trained for {objective}: {name}@k vs k")
        ax_metric.grid(alpha=0.3)
        ax_metric.legend(fontsize=7, loc="lower right")
        ax_entropy.set_xlabel("training step")
        ax_entropy.set_ylabel("mean policy entropy (nats)")
        ax_entropy.set_title(f"Trained for {objective}: policy entropy")
        ax_entropy.grid(alpha=0.3)
        ax_entropy.legend(fontsize=7, loc="upper right")
    seeds = len(config["seeds"])
    fig.suptitle(
        f"rspo-kernels demo: coverage task, mean ± std over {seeds} seed{'s' if seeds > 1 else ''}",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
