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
