"""The report's figures: accuracy curves over seeds, one panel per dataset (Figure 3, and the
accuracy against the number of inference steps)."""

from __future__ import annotations

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from noprop_exp import paper
from noprop_exp.report.runs import STEPS_PREFIX
from noprop_exp.report.tables import name, rank

# One colour per variant in every figure, so that figures from different sweeps compare.
COLOURS = {"backprop": "C7", "dt": "C4", "adjoint": "C0", "ct": "C1", "fm": "C2"}
SPARE_COLOURS = ["C3", "C5", "C6", "C8", "C9"]


def band_curves(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Mean of x and y over seeds at each (dataset, variant, step), and y's min-max band.

    `points` has columns dataset, variant, step, x, y: one row per run and step."""
    grouped = points.groupby(["dataset", "variant", "step"])
    curves = grouped.agg(x=(x, "mean"), mean=(y, "mean"), low=(y, "min"), high=(y, "max"))
    curves["seeds"] = grouped.size()
    return curves.reset_index()


def plot_panels(
    curves: pd.DataFrame, xlabel: str, ylabel: str, title: str, logx: bool = False
) -> Figure:
    """One panel per dataset, one line (and band) per variant, colours alike in every panel."""
    datasets = sorted(curves.dataset.unique(), key=lambda d: rank(paper.DATASETS, d))
    variants = sorted(curves.variant.unique(), key=lambda v: rank(paper.VARIANTS, v))
    spare = iter(SPARE_COLOURS * len(variants))
    colours = {v: COLOURS.get(v) or next(spare) for v in variants}
    figure = Figure(figsize=(4.2 * len(datasets) + 0.4, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets, strict=True):
        for variant in variants:
            c = curves[(curves.dataset == dataset) & (curves.variant == variant)].sort_values("x")
            if c.empty:
                continue
            colour = colours[variant]
            ax.fill_between(c.x, c.low, c.high, color=colour, alpha=0.2, linewidth=0)
            ax.plot(c.x, c["mean"], color=colour, marker="o", markersize=3, lw=1.6)
        ax.set_title(name(paper.DATASETS, dataset))
        ax.set_xlabel(xlabel)
        if logx:  # label the values evaluated (2, 5, 10, ...), not powers of ten
            ax.set_xscale("log")
            ticks = sorted(curves.x[curves.dataset == dataset].unique())
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        else:
            ax.set_xlim(left=0)  # cumulative time starts at zero
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    handles = [
        axes[0].plot([], [], color=colours[v], marker="o", ms=3, label=name(paper.VARIANTS, v))[0]
        for v in variants
    ]
    figure.legend(handles=handles, loc="outside right center", frameon=False)
    # Wrapped at the figure's edges: a one-panel figure is narrower than the title.
    figure.suptitle(title, fontsize="medium", wrap=True)
    return figure


def figure3(runs: pd.DataFrame, histories: pd.DataFrame) -> Figure:
    """Test accuracy against cumulative training time, per dataset, a line per variant."""
    points = histories.merge(runs[["run_id", "variant", "dataset"]], on="run_id")
    curves = band_curves(points.rename(columns={"epoch": "step"}), "train_time_s", "test_acc")
    return plot_panels(
        curves,
        "cumulative training time (s)",
        "test accuracy (%)",
        "One-hot embeddings: mean over seeds at each epoch; band: min–max over seeds",
    )


def steps_figure(runs: pd.DataFrame) -> Figure:
    """Test accuracy against the number of inference steps, per dataset, a line per variant."""
    columns = [c for c in runs if c.startswith(STEPS_PREFIX)]
    points = runs.melt(id_vars=["variant", "dataset"], value_vars=columns, value_name="acc")
    points = points.dropna()
    points["step"] = points.pop("variable").str.removeprefix(STEPS_PREFIX).astype(int)
    curves = band_curves(points, "step", "acc")
    return plot_panels(
        curves,
        "inference steps",
        "test accuracy (%)",
        "One-hot embeddings: mean over seeds; band: min–max over seeds",
        logx=True,
    )
