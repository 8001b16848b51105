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


def comparison_curves(
    curves: pd.DataFrame,
    title: str = "f-GRPO divergences vs GRPO",
    panels: tuple[tuple[str, str], ...] | None = None,
) -> Figure:
    """Per-step curves of every method: the mean over seeds (rolling-mean smoothed) as a line,
    the min–max over seeds of the smoothed per-seed curves as a band. GRPO is black dashed.

    ``curves`` is the long table of :func:`fgrpo_pipeline.experiments.divergence_sweep.curves_table`
    (method, seed, step and metric columns). ``panels`` are (column, title) pairs; by default
    reward and accuracy, and KL to the reference when the table has it.
    A panel whose column has no
    value is left out.
    """
    panels = [
        (column, label)
        for column, label in (panels or COMPARISON_CURVES)
        if column in curves and curves[column].notna().any()
    ]
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


SAFETY_COLOURS = (("harmful", "tab:red"), ("benign", "tab:blue"))


def latent_scatter(table: pd.DataFrame, title: str = "latent separation") -> Figure:
    """One PCA scatter per model (table order), harmful vs benign, titled with its D_B.

    ``table`` is :func:`fgrpo_pipeline.safety.latent.latent_projection` (model, safety, pc1, pc2,
    bhattacharyya). Each model has its own PCA, so axes are not shared between panels.
    """
    models = list(dict.fromkeys(table["model"]))
    if not models:
        raise ValueError("the latent table has no rows")
    fig, axes = plt.subplots(
        1, len(models), figsize=(4.2 * len(models), 4.4), constrained_layout=True, squeeze=False
    )
    for ax, model in zip(axes[0], models, strict=True):
        rows = table[table["model"] == model]
        for safety, colour in SAFETY_COLOURS:
            points = rows[rows["safety"] == safety]
            ax.scatter(points["pc1"], points["pc2"], s=12, alpha=0.6, color=colour, label=safety)
        ax.set_title(f"{model}  D_B = {rows['bhattacharyya'].iloc[0]:.2f}", fontsize=10)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
        ax.grid(alpha=0.3)
    # One legend for the figure: the colours mean the same in every panel.
    legend = {}
    for ax in axes[0]:
        handles, labels = ax.get_legend_handles_labels()
        legend.update(zip(labels, handles, strict=True))
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=len(legend))
    fig.suptitle(title)
    return fig


def reward_hacking_curves(
    metrics: pd.DataFrame, title: str = "reward model vs gold judge"
) -> Figure:
    """The reward-hacking monitor of one run: reward-model reward and gold score on the same
    rollouts (steps the monitor flags shaded), the monitor's gains, and KL to the reference.

    ``metrics`` is the trainer's per-step table with the monitor's columns (``rm_reward``,
    ``gold_score``, ``rm_gain``, ``gold_gain``, ``reward_hacking``).
    """
    window = max(1, len(metrics) // 25)
    steps = metrics["step"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), constrained_layout=True)
    rm_ax = axes[0]
    gold_ax = rm_ax.twinx()
    rm_ax.plot(steps, smooth(metrics["rm_reward"], window), color="tab:orange", label="RM reward")
    gold_ax.plot(steps, smooth(metrics["gold_score"], window), color="tab:green", label="gold")
    rm_ax.set_ylabel("reward-model reward", color="tab:orange")
    gold_ax.set_ylabel("gold score", color="tab:green")
    gold_ax.set_ylim(-0.02, 1.02)
    flagged = metrics["reward_hacking"] > 0
    if flagged.any():
        rm_ax.fill_between(
            steps,
            0,
            1,
            where=flagged,
            transform=rm_ax.get_xaxis_transform(),
            color="tab:red",
            alpha=0.12,
            linewidth=0,
            label="flagged",
        )
    handles = [h for ax in (rm_ax, gold_ax) for h in ax.get_legend_handles_labels()[0]]
    rm_ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="best")
    rm_ax.set_title("same rollouts, two judges", fontsize=10)
    axes[1].plot(steps, metrics["rm_gain"], color="tab:orange", label="RM gain (std units)")
    axes[1].plot(steps, metrics["gold_gain"], color="tab:green", label="gold gain")
    axes[1].axhline(0, color="grey", linewidth=0.8)
    axes[1].legend(fontsize=8)
    axes[1].set_title("monitor: change since the first window", fontsize=10)
    axes[2].plot(steps, smooth(metrics["kl_to_ref"], window), color="tab:blue")
    axes[2].set_title("KL(π_old‖π_ref) per sequence", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


SAFETY_BARS = (
    ("rm_reward", "reward-model reward"),
    ("gold_score", "gold score"),
    ("attack_success_rate", "attack success rate (lower is safer)"),
    ("over_refusal_rate", "over-refusal rate (lower is better)"),
    ("bhattacharyya", "latent separation D_B"),
    ("kl_to_ref", "KL to reference"),
)


def safety_comparison_bars(table: pd.DataFrame, title: str = "f-HAL by λ") -> Figure:
    """One bar chart per metric of the safety table (base and every λ; error bars: std over
    seeds where there is more than one)."""
    labels = [str(lam) if lam == "base" else f"λ={lam}" for lam in table["lam"]]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    colours = ["grey", *plt.get_cmap("tab10").colors[: len(table) - 1]]
    for ax, (column, label) in zip(axes.flat, SAFETY_BARS, strict=True):
        errors = table.get(f"{column}_std")
        ax.bar(labels, table[column], color=colours, yerr=errors, capsize=3)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    return fig
