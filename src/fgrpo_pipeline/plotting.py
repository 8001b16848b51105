"""Figures for the reports (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

CURVES = (
    ("reward_mean", "reward (batch mean)"),
    ("accuracy", "accuracy (sampled, train prompts)"),
    ("kl_to_ref", "KL(π‖π_ref) per sequence"),
    ("loss", "loss"),
    ("completion_length", "completion length (tokens)"),
    ("frac_reward_zero_std", "groups with zero reward spread"),
)


def smooth(values: pd.Series, window: int) -> pd.Series:
    return values.rolling(window, min_periods=1).mean()


def training_curves(metrics: pd.DataFrame, title: str = "training") -> Figure:
    """A grid of per-step curves (raw, faint; rolling mean, bold)."""
    window = max(1, len(metrics) // 20)
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), constrained_layout=True)
    for ax, (column, label) in zip(axes.flat, CURVES, strict=True):
        if column in metrics:
            ax.plot(metrics["step"], metrics[column], alpha=0.3, color="tab:blue")
            ax.plot(metrics["step"], smooth(metrics[column], window), color="tab:blue")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


COMPARISON_CURVES = (
    ("reward_mean", "reward (batch mean, train prompts)"),
    ("accuracy", "accuracy (sampled, train prompts)"),
    ("kl_to_ref", "KL(π_old‖π_ref) per sequence"),
)
BASELINE_METHOD = "grpo"


def comparison_curves(curves: pd.DataFrame, title: str = "f-GRPO divergences vs GRPO") -> Figure:
    """Per-step curves of every method: the mean over seeds (rolling-mean smoothed) as a line,
    the min–max over seeds of the smoothed per-seed curves as a band. GRPO is black dashed.

    ``curves`` is the long table of :func:`fgrpo_pipeline.comparison.curves_table` (method,
    seed, step and metric columns). Panels: reward and accuracy, and KL to the reference when
    the table has it.
    """
    panels = list(COMPARISON_CURVES[:2])
    if "kl_to_ref" in curves and curves["kl_to_ref"].notna().any():
        panels.append(COMPARISON_CURVES[2])
    n_steps = int(curves["step"].nunique()) if len(curves) else 1
    window = max(1, n_steps // 25)
    methods = list(dict.fromkeys(curves["method"]))
    colours = iter(plt.get_cmap("tab10").colors)
    styles = {
        m: {"color": "black", "linestyle": "--", "linewidth": 2.0}
        if m == BASELINE_METHOD
        else {"color": next(colours), "linestyle": "-", "linewidth": 1.6}
        for m in methods
    }
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels), 4.6), constrained_layout=True, squeeze=False
    )
    for ax, (column, label) in zip(axes[0], panels, strict=True):
        for method in methods:
            runs = curves[curves["method"] == method].pivot_table(
                index="step", columns="seed", values=column
            )
            per_seed = runs.apply(lambda s: smooth(s, window))
            style = styles[method]
            n_seeds = runs.shape[1]
            ax.plot(
                per_seed.index,
                per_seed.mean(axis=1),
                label=f"{method} ({n_seeds} seed{'s' * (n_seeds != 1)})",
                **style,
            )
            if n_seeds > 1:
                ax.fill_between(
                    per_seed.index,
                    per_seed.min(axis=1),
                    per_seed.max(axis=1),
                    color=style["color"],
                    alpha=0.08 if method == BASELINE_METHOD else 0.12,
                    linewidth=0,
                )
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    smoothing = f"rolling mean over {window} steps" if window > 1 else "unsmoothed"
    fig.suptitle(f"{title} — mean over seeds (band: min–max over seeds), {smoothing}")
    return fig
