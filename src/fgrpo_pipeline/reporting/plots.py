"""Figures for the reports (matplotlib, headless)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

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


def safety_comparison_bars(
    table: pd.DataFrame, title: str = "f-HAL by λ", *, base: Mapping[str, float] | None = None
) -> Figure:
    """One bar chart per metric of the safety table
    (:func:`fgrpo_pipeline.experiments.safety_sweep.safety_table`'s arm rows): ``lam``,
    ``<metric>_mean`` and, when present, ``<metric>_ci_low`` / ``_ci_high`` (error bars: the
    95 % CI, none where it is NaN). With a ``hal_scaling`` column the bars are grouped by
    scaling, one bar per λ in every group (the same colour for the same λ); a ``"base"`` row is
    a group of its own. ``base`` (metric -> value) draws the base policy as a dashed line.
    """
    _require(table, ["lam"], "the safety table")
    values = {name: _value_column(table, name) for name, _ in SAFETY_BARS}
    x, colours, width, ticks, legend = _bar_layout(table)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for ax, (name, label) in zip(axes.flat, SAFETY_BARS, strict=True):
        low, high = f"{name}_ci_low", f"{name}_ci_high"
        ax.bar(x, table[values[name]], width=width, color=colours)
        if low in table and high in table:
            _interval_bars(ax, x, table[low], table[high], horizontal=False, color="black")
        if base is not None and name in base:
            ax.axhline(base[name], color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(*ticks)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    if base is not None and any(name in base for name, _ in SAFETY_BARS):
        legend.append(Line2D([], [], color="grey", linestyle="--", linewidth=1, label="base"))
    if legend:
        fig.legend(handles=legend, loc="outside lower center", ncols=len(legend))
    fig.suptitle(title)
    return fig


def _value_column(table: pd.DataFrame, name: str) -> str:
    """``<name>_mean``, which the table must have."""
    if f"{name}_mean" not in table.columns:
        raise ValueError(f"the safety table lacks column {name + '_mean'!r}")
    return f"{name}_mean"


def _bar_layout(
    table: pd.DataFrame,
) -> tuple[np.ndarray, list, float, tuple[list[float], list[str]], list[Patch]]:
    """(bar positions, bar colours, bar width, (tick positions, tick labels), legend handles)
    of :func:`safety_comparison_bars`: a bar per row, or grouped by ``hal_scaling``."""
    is_base = (table["lam"].astype(str) == "base").to_numpy()
    palette = plt.get_cmap("tab10").colors
    if "hal_scaling" not in table:
        cycle = itertools.cycle(palette)
        labels = ["base" if b else f"λ={lam}" for b, lam in zip(is_base, table["lam"], strict=True)]
        colours = ["grey" if b else next(cycle) for b in is_base]
        x = np.arange(len(table), dtype=float)
        return x, colours, 0.8, (list(x), labels), []
    arms = table[~is_base]
    lams = sorted({float(lam) for lam in arms["lam"]})
    groups = list(dict.fromkeys(arms["hal_scaling"].astype(str)))
    width = 0.8 / max(1, len(lams))
    colour = {lam: palette[i % len(palette)] for i, lam in enumerate(lams)}
    offset = {lam: (i - (len(lams) - 1) / 2) * width for i, lam in enumerate(lams)}
    first = int(is_base.any())  # the base row's group comes first
    slot = {group: first + i for i, group in enumerate(groups)}
    x, colours = [], []
    for b, lam, group in zip(is_base, table["lam"], table["hal_scaling"].astype(str), strict=True):
        x.append(0.0 if b else slot[group] + offset[float(lam)])
        colours.append("grey" if b else colour[float(lam)])
    ticks = (list(range(first + len(groups))), ["base"] * first + groups)
    legend = [Patch(color=colour[lam], label=f"λ={lam:g}") for lam in lams]
    return np.asarray(x), colours, width, ticks, legend


# Confidence-interval figures of the sweeps' summaries
# (:func:`fgrpo_pipeline.experiments.statistics.summarise_arms`: ``<metric>_mean`` /
# ``_ci_low`` / ``_ci_high``; a NaN interval, e.g. one seed, is a point without a bar).

BENCHMARK_LABELS = {
    "sampled_accuracy": "accuracy (sampled, held-out)",
    "greedy_accuracy": "accuracy (greedy, held-out)",
    "ood_sampled_accuracy": "accuracy (sampled, out of distribution)",
}
METHOD_STYLE = {"color": "tab:blue", "marker": "o"}
BASELINE_STYLE = {"color": "black", "marker": "D"}
EXCLUDES_ZERO = ("CI excludes 0", {"color": "tab:red", "marker": "s"})
INCLUDES_ZERO = ("CI includes 0", {"color": "tab:grey", "marker": "o"})


def _require(table: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}")


def _interval_columns(metric: str) -> tuple[str, str, str]:
    return f"{metric}_mean", f"{metric}_ci_low", f"{metric}_ci_high"


def _intervals(table: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) of ``metric`` as float arrays."""
    return tuple(table[c].to_numpy(dtype=float) for c in _interval_columns(metric))


def _interval_bars(ax: Axes, at, low, high, *, horizontal: bool, color) -> ErrorbarContainer | None:
    """Error bars spanning exactly [low, high] (the interval need not contain the point
    estimate, so they are drawn from ``low`` rather than around the mean), at positions
    ``at`` on the other axis. Rows with a NaN bound get no bar; None when no row has one."""
    at, low, high = (np.asarray(v, dtype=float) for v in (at, low, high))
    finite = np.isfinite(at) & np.isfinite(low) & np.isfinite(high)
    if not finite.any():
        return None
    start = np.minimum(low[finite], high[finite])
    err = np.vstack([np.zeros_like(start), np.abs(high[finite] - low[finite])])
    style = {"fmt": "none", "ecolor": color, "capsize": 3, "elinewidth": 1.2}
    if horizontal:
        return ax.errorbar(start, at[finite], xerr=err, **style)
    return ax.errorbar(at[finite], start, yerr=err, **style)


def _seeds_note(table: pd.DataFrame) -> str:
    """`` (5 seeds)`` or `` (3–5 seeds)`` from ``n_seeds``; empty without it."""
    if "n_seeds" not in table or not table["n_seeds"].notna().any():
        return ""
    low, high = int(table["n_seeds"].min()), int(table["n_seeds"].max())
    return f" ({low} seed{'s' * (low != 1)})" if low == high else f" ({low}–{high} seeds)"


def divergence_summary(
    summary: pd.DataFrame,
    base: Mapping[str, float] | None = None,
    *,
    benchmarks: Sequence[str] = ("sampled_accuracy", "ood_sampled_accuracy"),
    baseline: str = BASELINE_METHOD,
    title: str = "f-GRPO divergences vs GRPO",
) -> Figure:
    """The divergence sweep's summary (one row per method) as point ranges, methods in
    table order top to bottom in every panel, the baseline in black: a panel per benchmark
    of ``benchmarks`` the table has (``<benchmark>_mean`` / ``_ci_low`` / ``_ci_high``; the
    base policy's ``base[benchmark]`` dashed), one of ``relative_overall`` (base 0, best 100)
    and one of the paired difference to ``baseline`` on the first benchmark present
    (``<benchmark>_diff_*``), where intervals that exclude 0 are red squares. A summary
    without the baseline method (a sweep that did not run it) has no difference panel.
    """
    _require(summary, ["method"], "the summary")
    present = [b for b in benchmarks if f"{b}_mean" in summary.columns]
    if not present:
        wanted = [f"{b}_mean" for b in benchmarks]
        raise ValueError(f"the summary lacks every benchmark column {wanted}")
    methods = [str(m) for m in summary["method"]]
    with_diff = baseline in methods
    needed = (*present, "relative_overall", *[f"{present[0]}_diff"] * with_diff)
    _require(summary, [c for m in needed for c in _interval_columns(m)], "the summary")
    rows = np.arange(len(methods), dtype=float)
    is_base = np.array([m == baseline for m in methods])
    panels = [(b, BENCHMARK_LABELS.get(b, b)) for b in present]
    panels.append(("relative_overall", "Relative Overall (base 0, best 100)"))
    fig, axes = plt.subplots(
        1,
        len(panels) + with_diff,
        figsize=(4.2 * (len(panels) + with_diff), max(3.2, 1.6 + 0.45 * len(methods))),
        constrained_layout=True,
        sharey=True,
        squeeze=False,
    )
    for ax, (metric, label) in zip(axes[0][: len(panels)], panels, strict=True):
        mean, low, high = _intervals(summary, metric)
        for chosen, style in ((~is_base, METHOD_STYLE), (is_base, BASELINE_STYLE)):
            _interval_bars(
                ax, rows[chosen], low[chosen], high[chosen], horizontal=True, color=style["color"]
            )
            ax.plot(mean[chosen], rows[chosen], linestyle="none", **style)
        reference = 0.0 if metric == "relative_overall" else (base or {}).get(metric)
        if base is not None and reference is not None:
            ax.axvline(reference, color="grey", linestyle="--", linewidth=1, label="base policy")
            ax.legend(fontsize=8, loc="best")
        ax.set_title(label, fontsize=10)
    if with_diff:
        _difference_panel(axes[0][-1], summary, present[0], rows, is_base, baseline)
    for ax in axes[0]:
        for row in rows[is_base]:
            ax.axhspan(row - 0.4, row + 0.4, color="grey", alpha=0.12, linewidth=0)
        ax.grid(alpha=0.3, axis="x")
    first = axes[0][0]
    first.set_yticks(rows, methods)
    first.set_ylim(len(methods) - 0.5, -0.5)  # first method on top
    for tick, method in zip(first.get_yticklabels(), methods, strict=True):
        tick.set_fontweight("bold" if method == baseline else "normal")
    fig.suptitle(f"{title} — mean and 95 % CI over seeds{_seeds_note(summary)}")
    return fig


def _difference_panel(
    ax: Axes,
    summary: pd.DataFrame,
    benchmark: str,
    rows: np.ndarray,
    is_base: np.ndarray,
    baseline: str,
) -> None:
    """The paired difference to the baseline on ``benchmark``: red squares where the
    interval excludes 0, grey circles where it does not (or is NaN)."""
    mean, low, high = _intervals(summary, f"{benchmark}_diff")
    with np.errstate(invalid="ignore"):
        excludes = np.isfinite(low) & np.isfinite(high) & ((low > 0) | (high < 0))
    shown = np.isfinite(mean) & ~is_base
    for chosen, (label, style) in ((excludes, EXCLUDES_ZERO), (~excludes, INCLUDES_ZERO)):
        chosen = chosen & shown
        if chosen.any():
            _interval_bars(
                ax, rows[chosen], low[chosen], high[chosen], horizontal=True, color=style["color"]
            )
            ax.plot(mean[chosen], rows[chosen], linestyle="none", label=label, **style)
    ax.axvline(0, color="black", linewidth=0.8)
    for row in rows[is_base]:
        ax.text(0, row, f" {baseline}", va="center", fontsize=8, color="grey")
    name = BENCHMARK_LABELS.get(benchmark, benchmark)
    ax.set_title(f"{name}: difference to {baseline}\n(paired by seed)", fontsize=10)
    ax.set_xlabel(f"difference to {baseline} (red: CI excludes 0)")
    if shown.any():
        ax.legend(fontsize=8, loc="best")


def _by_scaling(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(hal_scaling, its rows ordered by λ) in table order; ``lam`` must be numeric."""
    lam = pd.to_numeric(table["lam"], errors="coerce")
    if lam.isna().any():
        bad = table["lam"][lam.isna()].tolist()
        raise ValueError(f"lam must be a number on every row (the base goes in `base`), got {bad}")
    table = table.assign(lam=lam.astype(float))
    groups = table.groupby(table["hal_scaling"].astype(str), sort=False)
    return [(str(scaling), rows.sort_values("lam")) for scaling, rows in groups]


def safety_pareto(
    table: pd.DataFrame,
    base: Mapping[str, float] | None = None,
    *,
    title: str = "f-HAL: gold score vs reward-model reward",
) -> Figure:
    """Gold score against reward-model reward, one arm (λ, hal_scaling) a point with its
    95 % CI cross, one coloured line per ``hal_scaling`` in λ order, every point labelled
    with its λ; the base policy (``base["rm_reward"]``, ``base["gold_score"]``) a black star.

    ``table``: ``lam``, ``hal_scaling``, ``rm_reward_mean`` / ``_ci_low`` / ``_ci_high`` and
    ``gold_score_mean`` / ``_ci_low`` / ``_ci_high`` (``n_seeds`` goes in the title).
    """
    columns = ["lam", "hal_scaling", *_interval_columns("rm_reward")]
    _require(table, [*columns, *_interval_columns("gold_score")], "the safety table")
    if base is not None:
        missing = [k for k in ("rm_reward", "gold_score") if k not in base]
        if missing:
            raise ValueError(f"base lacks {missing}")
    palette = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(7, 5.4), constrained_layout=True)
    for i, (scaling, rows) in enumerate(_by_scaling(table)):
        colour = palette[i % len(palette)]
        x, x_low, x_high = _intervals(rows, "rm_reward")
        y, y_low, y_high = _intervals(rows, "gold_score")
        ax.plot(x, y, marker="o", color=colour, label=scaling)
        _interval_bars(ax, y, x_low, x_high, horizontal=True, color=colour)
        _interval_bars(ax, x, y_low, y_high, horizontal=False, color=colour)
        for lam, xi, yi in zip(rows["lam"], x, y, strict=True):
            ax.annotate(
                f"λ={lam:g}", (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=8
            )
    if base is not None:
        ax.plot(
            [base["rm_reward"]],
            [base["gold_score"]],
            marker="*",
            markersize=14,
            color="black",
            linestyle="none",
            label="base",
        )
    ax.set_xlabel("reward-model reward (mean, 95 % CI)")
    ax.set_ylabel("gold score (mean, 95 % CI)")
    ax.grid(alpha=0.3)
    ax.legend(title="HAL scaling", fontsize=8, loc="best")
    fig.suptitle(f"{title}{_seeds_note(table)}")
    return fig


def separation_by_lam(
    table: pd.DataFrame,
    base: Mapping[str, float] | None = None,
    *,
    metric: str = "bhattacharyya",
    title: str = "latent separation D_B by λ",
) -> Figure:
    """``<metric>_mean`` against λ with its 95 % CI as error bars, one line per
    ``hal_scaling`` (shifted sideways a little so they do not overlap); ``base[metric]`` as a
    dashed line. Any metric of the safety summary works (``kl_to_ref``, ``gold_score``, …).

    ``table``: ``lam``, ``hal_scaling``, ``<metric>_mean`` / ``_ci_low`` / ``_ci_high``.
    """
    _require(table, ["lam", "hal_scaling", *_interval_columns(metric)], "the safety table")
    groups = _by_scaling(table)
    lams = np.unique(np.concatenate([rows["lam"].to_numpy() for _, rows in groups]))
    step = 0.02 * ((lams.max() - lams.min()) or 1.0) if len(lams) else 0.0
    palette = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(6.5, 4.6), constrained_layout=True)
    for i, (scaling, rows) in enumerate(groups):
        colour = palette[i % len(palette)]
        x = rows["lam"].to_numpy() + (i - (len(groups) - 1) / 2) * step
        mean, low, high = _intervals(rows, metric)
        ax.plot(x, mean, marker="o", color=colour, label=scaling)
        _interval_bars(ax, x, low, high, horizontal=False, color=colour)
    if base is not None and metric in base:
        ax.axhline(base[metric], color="grey", linestyle="--", linewidth=1, label="base")
    ax.set_xticks(lams, [f"{lam:g}" for lam in lams])
    ax.set_xlabel("λ")
    ax.set_ylabel(f"{dict(SAFETY_BARS).get(metric, metric)} (mean, 95 % CI)")
    ax.grid(alpha=0.3)
    ax.legend(title="HAL scaling", fontsize=8, loc="best")
    fig.suptitle(f"{title}{_seeds_note(table)}")
    return fig
