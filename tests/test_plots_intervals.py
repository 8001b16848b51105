"""The confidence-interval figures of the sweeps' summaries (reporting.plots), checked on
the artists they draw: error bar extents, highlighted methods, series, labels."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure

from fgrpo_pipeline.experiments.safety_sweep import METRICS
from fgrpo_pipeline.reporting.plots import (
    divergence_summary,
    safety_comparison_bars,
    safety_pareto,
    separation_by_lam,
)

NAN = math.nan


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def rendered(fig: Figure, tmp_path, name: str) -> Figure:
    assert isinstance(fig, Figure)
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=40)
    assert path.stat().st_size > 0
    return fig


def error_bars(ax) -> tuple[list[tuple[float, float, float]], list[tuple[float, float, float]]]:
    """(horizontal, vertical) error bars of ``ax`` as (position, low, high)."""
    horizontal, vertical = [], []
    for container in ax.containers:
        if not isinstance(container, ErrorbarContainer):
            continue
        for collection in container.lines[2]:
            for segment in collection.get_segments():
                if len(segment) == 0:  # matplotlib's own yerr: NaN gives an empty segment
                    continue
                (x0, y0), (x1, y1) = segment
                if y0 == y1:
                    horizontal.append((y0, min(x0, x1), max(x0, x1)))
                else:
                    assert x0 == x1
                    vertical.append((x0, min(y0, y1), max(y0, y1)))
    return horizontal, vertical


def markers(ax) -> list:
    """The lines of ``ax`` but the error bars' caps."""
    return [line for line in ax.get_lines() if line.get_marker() not in ("|", "_")]


def labelled(ax, label: str):
    (line,) = [line for line in ax.get_lines() if line.get_label() == label]
    return line


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


# ---- divergence_summary -------------------------------------------------------------------

METHODS = ["kl", "reverse_kl", "pearson", "hellinger", "grpo"]
# diff CIs of sampled_accuracy: kl and pearson exclude 0, reverse_kl does not, hellinger has
# one seed (NaN interval), grpo is the baseline (NaN).
DIFF = {
    "kl": (0.06, 0.02, 0.10),
    "reverse_kl": (-0.01, -0.05, 0.03),
    "pearson": (-0.08, -0.20, -0.01),
    "hellinger": (0.04, NAN, NAN),
    "grpo": (NAN, NAN, NAN),
}


def divergence_table() -> pd.DataFrame:
    rows = []
    for i, method in enumerate(METHODS):
        one_seed = method == "hellinger"
        row = {"method": method, "n_seeds": 1 if one_seed else 5}
        for j, metric in enumerate(
            ("sampled_accuracy", "ood_sampled_accuracy", "relative_overall")
        ):
            mean = (0.4 + 0.05 * i + 0.01 * j) * (100 if metric == "relative_overall" else 1)
            half = 0.1 * mean
            # an asymmetric interval
            low, high = (NAN, NAN) if one_seed else (mean - half, mean + 2 * half)
            row |= {f"{metric}_mean": mean, f"{metric}_ci_low": low, f"{metric}_ci_high": high}
            diff = DIFF[method] if metric == "sampled_accuracy" else (0.0, -0.1, 0.1)
            names = (f"{metric}_diff_mean", f"{metric}_diff_ci_low", f"{metric}_diff_ci_high")
            row |= dict(zip(names, diff, strict=True))
        rows.append(row)
    return pd.DataFrame(rows)


def method_bars(ax) -> dict[str, tuple[float, float]]:
    horizontal, vertical = error_bars(ax)
    assert not vertical
    return {METHODS[round(y)]: (low, high) for y, low, high in horizontal}


def test_divergence_summary_draws_each_methods_interval_in_every_panel(tmp_path):
    summary = divergence_table()
    base = {"sampled_accuracy": 0.3, "ood_sampled_accuracy": 0.25}
    fig = rendered(divergence_summary(summary, base), tmp_path, "divergences")
    axes = fig.axes
    assert len(axes) == 4  # two benchmarks, relative overall, difference to grpo
    for ax, metric in zip(
        axes[:3], ("sampled_accuracy", "ood_sampled_accuracy", "relative_overall"), strict=True
    ):
        bars = method_bars(ax)
        assert set(bars) == set(METHODS) - {"hellinger"}  # one seed: no bar
        for method, (low, high) in bars.items():
            row = summary.set_index("method").loc[method]
            assert low == pytest.approx(row[f"{metric}_ci_low"])
            assert high == pytest.approx(row[f"{metric}_ci_high"])
        # every method's point is drawn, hellinger's too, in table order top to bottom
        points = {
            round(y): x
            for line in ax.get_lines()
            for x, y in zip(*line.get_data(), strict=True)
            if line.get_linestyle() == "None"
        }
        assert points == pytest.approx(dict(enumerate(summary[f"{metric}_mean"])))
        assert ax.get_ylim()[0] > ax.get_ylim()[1]  # first method on top
    assert [t.get_text() for t in axes[0].get_yticklabels()] == METHODS
    # the base policy's value, dashed, on the benchmark panels
    for ax, value in ((axes[0], 0.3), (axes[1], 0.25)):
        (dashed,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert dashed.get_xdata()[0] == pytest.approx(value)
    # the baseline is highlighted: its own colour and a bold label
    (grpo_point,) = [
        line for line in markers(axes[0]) if list(line.get_ydata()) == [METHODS.index("grpo")]
    ]
    assert grpo_point.get_color() == "black"
    bold = [t.get_text() for t in axes[0].get_yticklabels() if t.get_fontweight() == "bold"]
    assert bold == ["grpo"]


def test_divergence_summary_highlights_exactly_the_differences_that_exclude_zero(tmp_path):
    summary = divergence_table()
    fig = rendered(divergence_summary(summary), tmp_path, "differences")
    ax = fig.axes[-1]
    excluded = labelled(ax, "CI excludes 0")
    included = labelled(ax, "CI includes 0")
    assert sorted(METHODS[round(y)] for y in excluded.get_ydata()) == ["kl", "pearson"]
    assert sorted(METHODS[round(y)] for y in included.get_ydata()) == ["hellinger", "reverse_kl"]
    assert excluded.get_color() != included.get_color()
    assert excluded.get_marker() != included.get_marker()
    assert "CI excludes 0" in legend_texts(ax)
    bars = method_bars(ax)
    assert set(bars) == {"kl", "reverse_kl", "pearson"}  # baseline and NaN: no bar
    for method, (low, high) in bars.items():
        assert (low, high) == pytest.approx(DIFF[method][1:])
    zero = [line for line in ax.get_lines() if list(line.get_xdata()) == [0, 0]]
    assert zero  # the vertical line at 0


def test_divergence_summary_skips_absent_benchmarks(tmp_path):
    summary = divergence_table()
    summary = summary.drop(columns=[c for c in summary if c.startswith("ood_")])
    fig = rendered(divergence_summary(summary, {"sampled_accuracy": 0.3}), tmp_path, "one")
    assert len(fig.axes) == 3
    assert "sampled" in fig.axes[-1].get_title()


def test_divergence_summary_with_one_seed_everywhere_draws_points_only(tmp_path):
    summary = divergence_table()
    summary[[c for c in summary if "_ci_" in c]] = NAN
    summary["n_seeds"] = 1
    fig = rendered(divergence_summary(summary), tmp_path, "one-seed")
    for ax in fig.axes:
        assert error_bars(ax) == ([], [])
    assert "1 seed)" in fig.get_suptitle()


@pytest.mark.parametrize(
    "column",
    ["method", "sampled_accuracy_ci_high", "relative_overall_mean", "sampled_accuracy_diff_ci_low"],
)
def test_divergence_summary_names_a_missing_column(column):
    with pytest.raises(ValueError, match=column):
        divergence_summary(divergence_table().drop(columns=[column]))


def test_divergence_summary_needs_a_benchmark():
    with pytest.raises(ValueError, match="greedy_accuracy_mean"):
        divergence_summary(divergence_table(), benchmarks=("greedy_accuracy",))


def test_divergence_summary_without_the_baseline_has_no_difference_panel(tmp_path):
    # summarise() leaves out the _diff_ columns when the sweep did not run the baseline
    summary = divergence_table().query("method != 'grpo'")
    summary = summary.drop(columns=[c for c in summary if "_diff_" in c])
    fig = rendered(divergence_summary(summary), tmp_path, "no-baseline")
    assert len(fig.axes) == 3
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == METHODS[:-1]
    assert all("difference" not in ax.get_title() for ax in fig.axes)


# ---- safety_pareto and separation_by_lam --------------------------------------------------


def safety_arms() -> pd.DataFrame:
    rows = []
    for scaling, shift in (("paper", 0.0), ("balanced", 0.1)):
        for lam in (1.0, 0.0, 0.5):  # not in λ order: the lines are
            row = {"lam": lam, "hal_scaling": scaling, "n_seeds": 4}
            for metric, centre in (("rm_reward", 1.0), ("gold_score", 0.5), ("bhattacharyya", 2.0)):
                mean = centre + lam + shift
                row |= {
                    f"{metric}_mean": mean,
                    f"{metric}_ci_low": mean - 0.1,
                    f"{metric}_ci_high": mean + 0.3,
                }
            row |= {"kl_to_ref_mean": lam, "kl_to_ref_ci_low": 0.0, "kl_to_ref_ci_high": lam + 0.1}
            rows.append(row)
    arms = pd.DataFrame(rows)
    one_seed = (arms["hal_scaling"] == "balanced") & (arms["lam"] == 0.5)
    arms.loc[one_seed, "n_seeds"] = 1
    arms.loc[one_seed, [c for c in arms if "_ci_" in c]] = NAN
    return arms


SAFETY_BASE = {"rm_reward": 0.2, "gold_score": 0.3, "bhattacharyya": 1.5, "kl_to_ref": 0.0}


def test_safety_pareto_one_line_per_scaling_with_ci_crosses(tmp_path):
    arms = safety_arms()
    fig = rendered(safety_pareto(arms, SAFETY_BASE), tmp_path, "pareto")
    (ax,) = fig.axes
    for scaling in ("paper", "balanced"):
        rows = arms[arms["hal_scaling"] == scaling].sort_values("lam")
        line = labelled(ax, scaling)
        assert list(line.get_xdata()) == pytest.approx(rows["rm_reward_mean"].tolist())
        assert list(line.get_ydata()) == pytest.approx(rows["gold_score_mean"].tolist())
    base = labelled(ax, "base")
    assert (base.get_xdata()[0], base.get_ydata()[0]) == (0.2, 0.3)
    assert base.get_marker() not in {labelled(ax, s).get_marker() for s in ("paper", "balanced")}
    assert sorted(legend_texts(ax)) == ["balanced", "base", "paper"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["λ=0", "λ=0.5", "λ=1"] * 2)
    horizontal, vertical = error_bars(ax)
    with_ci = arms.dropna(subset=["rm_reward_ci_low"])
    assert len(horizontal) == len(vertical) == len(with_ci) == 5  # the one-seed arm: none
    expected_h = with_ci[["gold_score_mean", "rm_reward_ci_low", "rm_reward_ci_high"]]
    expected_v = with_ci[["rm_reward_mean", "gold_score_ci_low", "gold_score_ci_high"]]
    assert np.allclose(sorted(horizontal), sorted(expected_h.itertuples(index=False)))
    assert np.allclose(sorted(vertical), sorted(expected_v.itertuples(index=False)))


def test_safety_pareto_without_base_and_bad_input(tmp_path):
    fig = rendered(safety_pareto(safety_arms()), tmp_path, "pareto-no-base")
    assert "base" not in legend_texts(fig.axes[0])
    with pytest.raises(ValueError, match="gold_score_ci_high"):
        safety_pareto(safety_arms().drop(columns=["gold_score_ci_high"]))
    with pytest.raises(ValueError, match="hal_scaling"):
        safety_pareto(safety_arms().drop(columns=["hal_scaling"]))
    with pytest.raises(ValueError, match="gold_score"):
        safety_pareto(safety_arms(), {"rm_reward": 0.2})
    with_base_row = safety_arms().astype({"lam": object})
    with_base_row.loc[0, "lam"] = "base"
    with pytest.raises(ValueError, match="lam must be a number"):
        safety_pareto(with_base_row)


@pytest.mark.parametrize("metric", ["bhattacharyya", "kl_to_ref"])
def test_separation_by_lam_error_bars_per_scaling(tmp_path, metric):
    arms = safety_arms()
    fig = rendered(separation_by_lam(arms, SAFETY_BASE, metric=metric), tmp_path, metric)
    (ax,) = fig.axes
    paper, balanced = labelled(ax, "paper"), labelled(ax, "balanced")
    for line, scaling in ((paper, "paper"), (balanced, "balanced")):
        rows = arms[arms["hal_scaling"] == scaling].sort_values("lam")
        assert list(line.get_xdata()) == pytest.approx(rows["lam"].tolist(), abs=0.05)
        assert list(line.get_ydata()) == pytest.approx(rows[f"{metric}_mean"].tolist())
    offsets = np.asarray(balanced.get_xdata()) - np.asarray(paper.get_xdata())
    assert (offsets > 0).all()  # side by side, not on top of each other
    horizontal, vertical = error_bars(ax)
    assert not horizontal
    assert len(vertical) == 5  # the one-seed arm has no bar
    xs = {round(x, 6): (lo, hi) for x, lo, hi in vertical}
    for line, scaling in ((paper, "paper"), (balanced, "balanced")):
        rows = arms[arms["hal_scaling"] == scaling].sort_values("lam")
        for x, low, high in zip(
            line.get_xdata(), rows[f"{metric}_ci_low"], rows[f"{metric}_ci_high"], strict=True
        ):
            if math.isnan(low):
                assert round(x, 6) not in xs
            else:
                assert xs[round(x, 6)] == pytest.approx((low, high))
    (dashed,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert dashed.get_ydata()[0] == SAFETY_BASE[metric]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.5", "1"]


def test_separation_by_lam_names_a_missing_metric():
    with pytest.raises(ValueError, match="gold_score_ci_low"):
        separation_by_lam(safety_arms().drop(columns=["gold_score_ci_low"]), metric="gold_score")
    with pytest.raises(ValueError, match="over_refusal_rate_mean"):
        separation_by_lam(safety_arms(), metric="over_refusal_rate")


# ---- safety_comparison_bars ---------------------------------------------------------------


def bar_heights(ax) -> list[float]:
    return [patch.get_height() for patch in ax.patches]


def test_safety_comparison_bars_with_intervals_grouped_by_scaling(tmp_path):
    arms = safety_arms()
    for metric in METRICS:
        if f"{metric}_mean" not in arms:
            arms[f"{metric}_mean"] = 0.4
            arms[f"{metric}_ci_low"] = 0.3
            arms[f"{metric}_ci_high"] = 0.6
    fig = rendered(safety_comparison_bars(arms, base=SAFETY_BASE), tmp_path, "bars-new")
    assert len(fig.axes) == 6
    ax = fig.axes[0]  # reward-model reward
    assert [t.get_text() for t in ax.get_xticklabels()] == ["paper", "balanced"]
    centres = [patch.get_x() + patch.get_width() / 2 for patch in ax.patches]
    assert bar_heights(ax) == pytest.approx(arms["rm_reward_mean"].tolist())
    # the same λ sits in the same slot of each group, with the same colour
    offsets = {lam: [] for lam in (0.0, 0.5, 1.0)}
    colours = {lam: set() for lam in offsets}
    for lam, centre, scaling, patch in zip(
        arms["lam"], centres, arms["hal_scaling"], ax.patches, strict=True
    ):
        offsets[lam].append(centre - ["paper", "balanced"].index(scaling))
        colours[lam].add(patch.get_facecolor())
    assert all(np.ptp(v) < 1e-9 for v in offsets.values())
    assert all(len(c) == 1 for c in colours.values())
    assert len({c.pop() for c in colours.values()}) == 3
    _, vertical = error_bars(ax)
    by_x = {round(x, 6): (lo, hi) for x, lo, hi in vertical}
    for centre, low, high in zip(
        centres, arms["rm_reward_ci_low"], arms["rm_reward_ci_high"], strict=True
    ):
        if math.isnan(low):
            assert round(centre, 6) not in by_x
        else:
            assert by_x[round(centre, 6)] == pytest.approx((low, high))
    (dashed,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert dashed.get_ydata()[0] == SAFETY_BASE["rm_reward"]
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == [
        "base",
        "λ=0",
        "λ=0.5",
        "λ=1",
    ]


def test_safety_comparison_bars_names_a_missing_metric():
    arms = safety_arms()
    with pytest.raises(ValueError, match="attack_success_rate"):
        safety_comparison_bars(arms)
