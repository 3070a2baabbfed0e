"""The demo's figure: metric@k curves per method (paper Figure 6 style) and entropy over training.

Kept apart from :mod:`rspo_kernels.demo` because matplotlib is an optional dependency
(``pip install rspo_kernels[plot]``); the demo runs without it and only skips the PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_demo"]

# One colour per family, the same in every panel: policy gradient black dashed, hitchhiking blue,
# RSPO red (paper Figure 6), Chen et al.'s Pass@k Training green (Pass@k only). Each metric panel
# holds one training k, so it shows at most five curves.
_STYLE = {
    "pg": {"color": "black", "linestyle": "--", "marker": "o"},
    "hitchhiking": {"color": "#2166ac", "linestyle": "-", "marker": "s"},
    "rspo": {"color": "#b2182b", "linestyle": "-", "marker": "o"},
    "passk_training": {"color": "#1b7837", "linestyle": "-.", "marker": "^"},
}
_LABEL = {"pg": "PG (k=1)", "hitchhiking": "hitchhiking", "rspo": "RSPO", "passk_training": "PassK-Training"}


def plot_demo(result: dict[str, Any], path: Path) -> Path:
    """Write the demo figure as a PNG.

    One row per objective. The first panels show metric@k against the evaluation k, one panel per
    training k (policy gradient, hitchhiking, RSPO and, for Pass@k, Pass@k Training, mean ± std
    over seeds); the last one the final policy entropy against the training k.

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
    train_ks = list(config["train_ks"])
    ks = np.asarray(config["eval_ks"])
    fig = Figure(figsize=(4.0 * (len(train_ks) + 1), 4.2 * len(objectives)))
    axes = fig.subplots(len(objectives), len(train_ks) + 1, squeeze=False)
    for row_index, objective in enumerate(objectives):
        name = objective.split("@")[0]
        rows = {row["method"]: row for row in result["tables"][objective]["rows"]}
        methods = result["curves"][objective]["methods"]
        pg = next(m for m in methods if m.family == "pg")

        def curve(method: Any, name: str = name, rows: dict = rows) -> tuple[np.ndarray, np.ndarray]:
            row = rows[method.name]
            return (
                np.array([row[f"{name}@{j}"]["mean"] for j in ks]),
                np.array([row[f"{name}@{j}"]["std"] for j in ks]),
            )

        for col, k in enumerate(train_ks):
            ax = axes[row_index, col]
            initial = rows.get("initial (uniform)")
            if initial is not None:
                ax.plot(ks, [initial[f"{name}@{j}"]["mean"] for j in ks], color="grey", linestyle=":", label="initial")
            for method in [pg, *(m for m in methods if m.k == k and m.family != "pg")]:
                mean, std = curve(method)
                style = _STYLE[method.family]
                label = _LABEL[method.family] + ("" if method.family == "pg" else f" k={k}")
                ax.plot(ks, mean, markersize=4, linewidth=1.8, label=label, **style)
                ax.fill_between(ks, mean - std, mean + std, color=style["color"], alpha=0.2, linewidth=0)
            ax.axvline(k, color="grey", linewidth=0.8, alpha=0.6)  # where training k = evaluation k
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(j) for j in ks])
            ax.set_xlabel(f"k of the {name}@k evaluation")
            if col == 0:
                ax.set_ylabel(f"{objective} (unbiased, held-out)")
            ax.set_title(f"trained for {objective}, k = {k}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
        # One y range for the row's metric panels, so that they compare at a glance.
        limits = [axes[row_index, col].get_ylim() for col in range(len(train_ks))]
        for col in range(len(train_ks)):
            axes[row_index, col].set_ylim(min(lo for lo, _ in limits), max(hi for _, hi in limits))

        ax = axes[row_index, -1]
        for family in ("pg", "hitchhiking", "rspo", "passk_training"):
            members = sorted((m for m in methods if m.family == family), key=lambda m: m.k)
            if not members:
                continue
            if family != "pg":
                members = [pg, *members]  # every family starts from k = 1, which is policy gradient
            xs = [m.k for m in members]
            mean = np.array([rows[m.name]["entropy"]["mean"] for m in members])
            std = np.array([rows[m.name]["entropy"]["std"] for m in members])
            style = _STYLE[family]
            ax.errorbar(xs, mean, yerr=std, markersize=4, linewidth=1.8, capsize=3, label=_LABEL[family], **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, *train_ks], [str(j) for j in [1, *train_ks]])
        ax.set_xlabel("training k")
        ax.set_ylabel("final policy entropy (nats)")
        ax.set_title(f"trained for {objective}: entropy", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    seeds = len(config["seeds"])
    fig.suptitle(
        f"rspo-kernels demo: coverage task, mean ± std over {seeds} seed{'s' if seeds > 1 else ''} "
        "(pass@k / max@k: higher is better; grey line: evaluation k = training k)",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
