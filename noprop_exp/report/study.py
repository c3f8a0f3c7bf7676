"""The study table of a sweep over training settings (sweeps/ct_study.yaml): one row per setting
the sweep varied, its seeds pooled, to be chosen on validation accuracy; the test accuracy is
shown beside, for the setting chosen, never to choose by.

Steadiness is the largest fall of an evaluation below the best one before it, counted after the
second epoch: a run that learns steadily never falls more than a point there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow.tracking import MlflowClient

# What a paper sweep varies to make its runs (presets, groups): not settings of a study.
IDENTITY = {"seed", "experiment", "variant", "dataset", "embedding"}
STEADY_FROM_EPOCH = 3  # epochs 1-2 may still jump about; from the third on, a fall counts
# Logged each epoch: the study table shows their last value, averaged over seeds.
DIAGNOSTICS = ["grad_norm/denoise", "grad_norm/head", "grad_norm/denoise_schedule"]
CAPTION = (
    "One row per setting, seeds pooled: val_acc (%) at the last epoch, mean ± s.e. over seeds; "
    f"largest_drop: the largest fall (points) of val_acc below its best so far from epoch "
    f"{STEADY_FROM_EPOCH} on, worst seed; gradient norms of each loss term at the last epoch. "
    "Choose on val_acc; test_acc is only reported."
)


def swept_settings(parent_params: Mapping[str, str]) -> list[str]:
    """The keys a sweep's parent run records as varied ("a,b,..."), seeds and presets aside."""
    return sorted(k for k, v in parent_params.items() if "," in str(v) and k not in IDENTITY)


def largest_drop(values: Sequence[float], from_epoch: int = STEADY_FROM_EPOCH) -> float:
    """max over epochs e >= from_epoch of (best before e) - value at e; 0 if it never fell."""
    drops = [max(values[: e - 1]) - values[e - 1] for e in range(from_epoch, len(values) + 1)]
    return max([0.0, *drops])


def histories(client: MlflowClient, run_ids: Sequence[str], name: str) -> dict[str, list[float]]:
    """Each run's `name` at its evaluated epochs, in epoch order."""
    return {
        run_id: [
            m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        ]
        for run_id in run_ids
    }


Setting = tuple[tuple[str, ...], pd.DataFrame, list[list[float]]]


def by_setting(raw: pd.DataFrame, keys: Sequence[str], client: MlflowClient) -> list[Setting]:
    """(values of `keys`, its runs' rows of `raw` (mlflow.search_runs' frame), their val_acc
    curves) for each setting, in sorted order."""
    val = histories(client, list(raw.run_id), "val_acc")
    groups = []
    for setting, runs in raw.groupby([f"params.{k}" for k in keys], sort=True):
        setting = setting if isinstance(setting, tuple) else (setting,)
        groups.append((setting, runs, [val[r] for r in runs.run_id if val[r]]))
    return groups


def study_table(groups: list[Setting], keys: Sequence[str]) -> pd.DataFrame:
    """A row per setting, best validation accuracy first."""
    rows = []
    for setting, runs, curves in groups:
        last = [curve[-1] for curve in curves]
        rows.append(
            {
                **dict(zip(keys, setting, strict=True)),
                "seeds": len(runs),
                "val_acc": np.mean(last),
                "val_acc_se": np.std(last, ddof=1) / np.sqrt(len(last)) if len(last) > 1 else 0,
                "val_by_epoch": " / ".join(f"{np.mean(e):.1f}" for e in zip(*curves, strict=False)),
                "largest_drop": max(largest_drop(curve) for curve in curves),
                "test_acc": pd.to_numeric(runs["metrics.test_acc"]).mean(),
                **{
                    name: pd.to_numeric(runs[f"metrics.{name}"]).mean()
                    if f"metrics.{name}" in runs
                    else np.nan
                    for name in DIAGNOSTICS
                },
            }
        )
    return pd.DataFrame(rows).sort_values("val_acc", ascending=False, ignore_index=True)


def study_figure(groups: list[Setting], keys: Sequence[str]) -> Figure:
    """val_acc against epoch, one line per setting (mean over seeds), the seeds as thin lines."""
    figure = Figure(figsize=(7.5, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for index, (setting, _, curves) in enumerate(groups):
        colour = f"C{index % 10}"
        for curve in curves:
            ax.plot(range(1, len(curve) + 1), curve, color=colour, lw=0.6, alpha=0.5)
        mean = [np.mean(epoch) for epoch in zip(*curves, strict=False)]
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, setting, strict=True))
        ax.plot(range(1, len(mean) + 1), mean, color=colour, marker="o", lw=1.8, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    figure.legend(fontsize="small", loc="outside lower center", ncols=2, frameon=False)
    figure.suptitle("Validation accuracy per setting: mean over seeds (thin: each seed)", wrap=True)
    return figure


def wide_study(long: pd.DataFrame) -> pd.DataFrame:
    """Display table: the setting's keys as the index, numbers formatted."""
    keys = list(long.columns[: list(long.columns).index("seeds")])
    table = pd.DataFrame(index=pd.MultiIndex.from_frame(long[keys]))
    table["seeds"] = list(long.seeds)
    table["val_acc"] = [
        f"{m:.2f} ± {s:.2f}" for m, s in zip(long.val_acc, long.val_acc_se, strict=True)
    ]
    table["val_acc by epoch"] = list(long.val_by_epoch)
    table["largest_drop"] = [f"{d:.2f}" for d in long.largest_drop]
    table["test_acc"] = [f"{t:.2f}" for t in long.test_acc]
    for name in DIAGNOSTICS:
        table[name] = [f"{v:.3g}" for v in long[name]]
    return table
