"""The paper's Figure 3, Table 1 and Table 2, and the inference-steps study, from MLflow runs.

`noprop-report` reads the runs of a sweep (its parent run, or the latest sweep of a name), of
experiments, or those an MLflow filter selects, into pandas, and writes to `--out`:

- `figure3.png/.pdf`: one panel per dataset, test accuracy (%) against cumulative training time
  (s), one line per variant: the mean over seeds at each evaluated epoch, plotted at the seeds'
  mean time; the band spans the seeds' minimum to maximum. One-hot runs only, as in the paper.
- `table1.md/.csv/.tex`: test accuracy, mean +- standard error, rows variant x embedding,
  columns datasets, the paper's value beside ours. The s.e. is that of all seeds x inference
  runs of a cell taken as one sample (the paper's "3 seeds x 5 inference runs"), computed
  exactly from each run's logged mean and s.e. over its `eval.repeats` inference runs.
- `table2.md/.csv/.tex`: peak GPU memory (GB, `peak_mem_gb`; CUDA runs only) per variant and
  dataset, one-hot, mean over seeds, beside the paper's.
- `steps.png/.pdf`, `steps.md/.csv/.tex` when runs logged `test_acc_steps_N` (eval.steps_sweep):
  accuracy against the number of inference steps, mean +- s.e. over seeds.
- `runs.csv`: the runs used, one row each.

Every row and column of the paper's tables is shown, and the cells without runs read "—": a
missing number is shown as missing, never dropped or filled in. Only FINISHED runs count, and of
several runs of one (variant, embedding, dataset, seed) the latest, so that a re-run replaces a
run instead of counting as one more seed. With a parent run (or `--sweep`) the outputs are also
logged to it under `report/`. Everything is keyed on the runs' tags (`variant`, `dataset`,
`embedding`) and params (`seed`, `eval.repeats`, `embedding.dim`), so new variants appear as new
rows without changes here.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from noprop_exp.config import default_tracking_uri

MISSING = "—"
DATASETS = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
VARIANTS = {  # the paper's row order
    "backprop": "Backprop",
    "dt": "NoProp-DT",
    "adjoint": "Adjoint",
    "ct": "NoProp-CT",
    "fm": "NoProp-FM",
}
# One colour per variant in every figure, so that figures from different sweeps compare.
COLOURS = {"backprop": "C7", "dt": "C4", "adjoint": "C0", "ct": "C1", "fm": "C2"}
SPARE_COLOURS = ["C3", "C5", "C6", "C8", "C9"]
EMBEDDINGS = {"onehot": "one-hot", "learned": "learned (d=20)", "prototype": "prototype"}
PAPER_LEARNED_DIM = "20"  # the paper's "dim=20": our `learned` embedding with embedding.dim=20

# Spec section 8: the paper's Table 1 (test accuracy %, mean over 3 seeds x 5 inference runs)
# and Table 2 (GPU memory allocated, GB, one-hot), in the column order of PAPER_DATASETS.
PAPER_DATASETS = ("mnist", "cifar10", "cifar100")
PAPER_TABLE1 = {
    ("backprop", "onehot"): (99.46, 79.92, 45.85),
    ("backprop", "learned"): (99.43, 79.30, 46.57),
    ("backprop", "prototype"): (99.44, 79.58, 47.80),
    ("dt", "onehot"): (99.47, 79.25, 45.93),
    ("dt", "learned"): (99.49, 79.12, 45.19),
    ("dt", "prototype"): (99.54, 80.54, 46.06),
    ("adjoint", "onehot"): (98.62, 66.78, 25.03),
    ("ct", "onehot"): (97.84, 73.35, 33.66),
    ("ct", "learned"): (97.70, 71.77, 33.99),
    ("ct", "prototype"): (97.17, 66.54, 21.31),
    ("fm", "onehot"): (99.21, 73.14, 6.38),
    ("fm", "learned"): (99.29, 73.50, 31.14),
    ("fm", "prototype"): (98.52, 75.18, 37.57),
}
PAPER_TABLE2 = {
    "backprop": (0.87, 1.17, 1.73),
    "dt": (0.49, 0.64, 1.23),
    "adjoint": (2.32, 6.23, 6.45),
    "ct": (1.05, 0.45, 0.50),
    "fm": (1.06, 0.44, 0.49),
}
STEPS_PREFIX = "test_acc_steps_"
FIGURE_EMBEDDING = "onehot"  # Figure 3 and Table 2 are one-hot in the paper
KEY = ["variant", "embedding", "dataset"]


# ---------------------------------------------------------------------------- reading MLflow


def find_sweep(client: MlflowClient, name: str) -> str:
    """The id of the latest parent run of the sweep `name` (its tag `sweep`)."""
    parents = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.sweep = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise ValueError(
            f"no sweep named {name!r} in this MLflow store: sweeps are named after their "
            "config (sweeps/figure3_small.yaml -> figure3_small); or pass --parent-run ID"
        )
    return parents[0].info.run_id


def search_runs(
    tracking_uri: str,
    experiments: Sequence[str] = (),
    parent_runs: Sequence[str] = (),
    filter_string: str = "",
) -> pd.DataFrame:
    """MLflow's runs table (`mlflow.search_runs`) of the finished runs selected: the children of
    `parent_runs` if any, else the runs of `experiments` (default `noprop`), and `filter_string`."""
    mlflow.set_tracking_uri(tracking_uri)
    conditions = ["attributes.status = 'FINISHED'", *([filter_string] if filter_string else [])]
    if parent_runs:
        frames = [
            mlflow.search_runs(
                search_all_experiments=True,
                filter_string=" and ".join([f"tags.mlflow.parentRunId = '{p}'", *conditions]),
            )
            for p in parent_runs
        ]
        frames = [frame for frame in frames if not frame.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    names = list(experiments) or ["noprop"]
    return mlflow.search_runs(experiment_names=names, filter_string=" and ".join(conditions))


def embedding_key(tag: str, dim: object) -> str:
    """The embedding tag, with the dimension when a learned one is not the paper's d = 20."""
    if tag == "learned" and not pd.isna(dim) and str(dim) != PAPER_LEARNED_DIM:
        return f"learned-d{dim}"
    return tag


def tidy_runs(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per training run (runs without a `variant` tag, e.g. parents, are left out):
    run_id, start_time, variant, embedding, dataset, seed, repeats and the metrics used here.
    Of several runs of one (variant, embedding, dataset, seed), the latest is kept."""

    def column(name: str) -> pd.Series:
        return raw[name] if name in raw else pd.Series(np.nan, index=raw.index, dtype=object)

    columns = ["run_id", "start_time", *KEY, "seed", "repeats", "test_acc", "test_acc_se"]
    if raw.empty or "tags.variant" not in raw:
        return pd.DataFrame(columns=[*columns, "peak_mem_gb"])
    runs = pd.DataFrame(
        {
            "run_id": raw["run_id"],
            "start_time": raw["start_time"],
            "variant": column("tags.variant"),
            "embedding": [
                embedding_key(tag, dim)
                for tag, dim in zip(
                    column("tags.embedding"), column("params.embedding.dim"), strict=True
                )
            ],
            "dataset": column("tags.dataset"),
            "seed": pd.to_numeric(column("params.seed")),
            "repeats": pd.to_numeric(column("params.eval.repeats")).fillna(1),
        }
    )
    steps = sorted(c.removeprefix("metrics.") for c in raw if f"metrics.{STEPS_PREFIX}" in c)
    for name in ["test_acc", "test_acc_se", "peak_mem_gb", *steps]:
        runs[name] = pd.to_numeric(column(f"metrics.{name}"))
    runs = runs.dropna(subset=["variant", "dataset"])
    runs = runs.sort_values("start_time").drop_duplicates([*KEY, "seed"], keep="last")
    return runs.reset_index(drop=True)


def accuracy_histories(client: MlflowClient, run_ids: Iterable[str]) -> pd.DataFrame:
    """Per run and evaluated epoch: cumulative training time (s) and test accuracy (%)."""
    rows = []
    for run_id in run_ids:
        times = {m.step: m.value for m in client.get_metric_history(run_id, "train_time_s")}
        for metric in client.get_metric_history(run_id, "test_acc"):
            if metric.step in times:
                rows.append((run_id, metric.step, times[metric.step], metric.value))
    return pd.DataFrame(rows, columns=["run_id", "epoch", "train_time_s", "test_acc"])


# ---------------------------------------------------------------------------- statistics


def pooled_mean_se(
    means: Sequence[float], ses: Sequence[float], repeats: Sequence[int]
) -> tuple[float, float]:
    """Mean and standard error of all inference runs of all seeds taken as one sample.

    Run i logged the mean m_i and standard error se_i of its R_i inference runs, so their
    sample variance is R_i se_i^2; the pooled sum of squares about the grand mean M is
    sum_i (R_i - 1) R_i se_i^2 + R_i (m_i - M)^2. One value in all: s.e. undefined (nan).
    """
    m, se, r = (np.asarray(v, dtype=float) for v in (means, ses, repeats))
    total = r.sum()
    grand = float((r * m).sum() / total)
    if total < 2:
        return grand, math.nan
    squares = ((r - 1) * r * np.nan_to_num(se) ** 2).sum() + (r * (m - grand) ** 2).sum()
    return grand, math.sqrt(squares / (total - 1) / total)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error over seeds (nan s.e. for a single value)."""
    v = np.asarray(values, dtype=float)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return float(v.mean()), se


# ---------------------------------------------------------------------------- tables


def _rank(order: dict[str, str], key: str) -> tuple[int, str]:
    return (list(order).index(key) if key in order else len(order), key)


def _datasets(present: Iterable[str]) -> list[str]:
    return sorted(set(PAPER_DATASETS) | set(present), key=lambda d: _rank(DATASETS, d))


def table1(runs: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (variant, embedding, dataset) of the paper or of the runs."""
    ours = {
        key: (*pooled_mean_se(g.test_acc, g.test_acc_se, g.repeats), len(g), int(g.repeats.sum()))
        for key, g in runs.dropna(subset=["test_acc"]).groupby(KEY)
    }
    rows = {(v, e) for v, e, _ in ours} | set(PAPER_TABLE1)
    rows = sorted(rows, key=lambda ve: (_rank(VARIANTS, ve[0]), _rank(EMBEDDINGS, ve[1])))
    records = []
    for variant, embedding in rows:
        for dataset in _datasets(d for _, _, d in ours):
            mean, se, seeds, inference_runs = ours.get(
                (variant, embedding, dataset), (math.nan, math.nan, 0, 0)
            )
            records.append(
                {
                    "variant": variant,
                    "embedding": embedding,
                    "dataset": dataset,
                    "test_acc": mean,
                    "test_acc_se": se,
                    "seeds": seeds,
                    "inference_runs": inference_runs,
                    "paper": _paper(PAPER_TABLE1.get((variant, embedding)), dataset),
                }
            )
    return pd.DataFrame.from_records(records)


def table2(runs: pd.DataFrame) -> pd.DataFrame:
    """Long table: peak memory (GB) per (variant, dataset), one-hot runs, mean over seeds."""
    onehot = runs[runs.embedding == FIGURE_EMBEDDING]
    ours = {
        key: (g.peak_mem_gb.mean(), int(g.peak_mem_gb.notna().sum()))
        for key, g in onehot.groupby(["variant", "dataset"])
    }
    variants = sorted({v for v, _ in ours} | set(PAPER_TABLE2), key=lambda v: _rank(VARIANTS, v))
    records = [
        {
            "variant": variant,
            "dataset": dataset,
            "peak_mem_gb": ours.get((variant, dataset), (math.nan, 0))[0],
            "seeds": ours.get((variant, dataset), (math.nan, 0))[1],
            "paper": _paper(PAPER_TABLE2.get(variant), dataset),
        }
        for variant in variants
        for dataset in _datasets(d for _, d in ours)
    ]
    return pd.DataFrame.from_records(records)


def steps_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Long table: accuracy per (variant, embedding, dataset, steps), mean and s.e. over seeds."""
    columns = [c for c in runs if c.startswith(STEPS_PREFIX)]
    long = runs.melt(id_vars=[*KEY, "seed"], value_vars=columns, value_name="acc").dropna()
    long["steps"] = long.pop("variable").str.removeprefix(STEPS_PREFIX).astype(int)
    groups = sorted(
        long.groupby([*KEY, "steps"]),
        key=lambda kg: (
            _rank(VARIANTS, kg[0][0]),
            _rank(EMBEDDINGS, kg[0][1]),
            _rank(DATASETS, kg[0][2]),
            kg[0][3],
        ),
    )
    records = [
        {**dict(zip([*KEY, "steps"], key, strict=True)), "test_acc": m, "test_acc_se": se}
        for key, g in groups
        for m, se in [mean_se(g.acc)]
    ]
    return pd.DataFrame.from_records(records, columns=[*KEY, "steps", "test_acc", "test_acc_se"])


def _paper(values: tuple[float, ...] | None, dataset: str) -> float:
    if values is None or dataset not in PAPER_DATASETS:
        return math.nan
    return values[PAPER_DATASETS.index(dataset)]


def _number(value: float, digits: int = 2) -> str:
    return MISSING if pd.isna(value) else f"{value:.{digits}f}"


def _mean_se(mean: float, se: float) -> str:
    if pd.isna(mean):
        return MISSING
    return _number(mean) if pd.isna(se) else f"{mean:.2f} ± {se:.2f}"


def _name(names: dict[str, str], key: str) -> str:
    return names.get(key, key)


def wide_table1(long: pd.DataFrame) -> pd.DataFrame:
    """Display table: rows method x embedding; per dataset an `ours` and a `paper` column."""
    out = {}
    for (variant, embedding), g in long.groupby(["variant", "embedding"], sort=False):
        row = {}
        for r in g.itertuples():
            row[f"{_name(DATASETS, r.dataset)} ours"] = _mean_se(r.test_acc, r.test_acc_se)
            row[f"{_name(DATASETS, r.dataset)} paper"] = _number(r.paper)
        out[(_name(VARIANTS, variant), _name(EMBEDDINGS, embedding))] = row
    return _indexed(out, ["method", "embedding"])


def wide_table2(long: pd.DataFrame) -> pd.DataFrame:
    out = {}
    for variant, g in long.groupby("variant", sort=False):
        row = {}
        for r in g.itertuples():
            row[f"{_name(DATASETS, r.dataset)} ours"] = _number(r.peak_mem_gb)
            row[f"{_name(DATASETS, r.dataset)} paper"] = _number(r.paper)
        out[(_name(VARIANTS, variant),)] = row
    return _indexed(out, ["method"])


def wide_steps(long: pd.DataFrame) -> pd.DataFrame:
    """Display table: rows method x embedding x dataset, a column per number of steps."""
    out: dict[tuple[str, ...], dict[str, str]] = {}
    for r in long.itertuples():
        key = (_name(VARIANTS, r.variant), _name(EMBEDDINGS, r.embedding))
        row = out.setdefault((*key, _name(DATASETS, r.dataset)), {})
        row[f"{r.steps} steps"] = _mean_se(r.test_acc, r.test_acc_se)
    table = _indexed(out, ["method", "embedding", "dataset"])
    return table[sorted(table.columns, key=lambda c: int(c.split()[0]))].fillna(MISSING)


def _indexed(rows: dict[tuple[str, ...], dict[str, str]], names: list[str]) -> pd.DataFrame:
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(list(rows), names=names)
    return table


def markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (the index levels first)."""
    header = [*table.index.names, *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, row in table.iterrows():
        cells = [*(key if isinstance(key, tuple) else (key,)), *row]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def latex(table: pd.DataFrame, caption: str) -> str:
    """A booktabs `table` environment."""

    def cell(text: object) -> str:
        text = str(text).replace("±", r"$\pm$").replace(MISSING, "---")
        return text.replace("%", r"\%").replace("_", r"\_")

    header = [*table.index.names, *table.columns]
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{cell(caption)}}}",
        r"\begin{tabular}{" + "l" * len(table.index.names) + "r" * len(table.columns) + "}",
        r"\toprule",
        " & ".join(cell(h) for h in header) + r" \\",
        r"\midrule",
    ]
    for key, row in table.iterrows():
        cells = [*(key if isinstance(key, tuple) else (key,)), *row]
        lines.append(" & ".join(cell(c) for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- figures


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
    datasets = sorted(curves.dataset.unique(), key=lambda d: _rank(DATASETS, d))
    variants = sorted(curves.variant.unique(), key=lambda v: _rank(VARIANTS, v))
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
        ax.set_title(_name(DATASETS, dataset))
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
        axes[0].plot([], [], color=colours[v], marker="o", ms=3, label=_name(VARIANTS, v))[0]
        for v in variants
    ]
    figure.legend(handles=handles, loc="outside right center", frameon=False)
    figure.suptitle(title, fontsize="medium")
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


# ---------------------------------------------------------------------------- the report


@dataclass
class Report:
    runs: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # long tables, by name
    figures: dict[str, Figure] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


TABLE_CAPTIONS = {
    "table1": "Test accuracy (%), ours: mean ± s.e. over seeds x inference runs; paper: "
    f"Li, Teh & Pascanu (2025), Table 1. {MISSING}: no finished run.",
    "table2": "Peak GPU memory allocated (GB), one-hot embeddings, ours: mean over seeds; "
    f"paper: Table 2. {MISSING}: no finished run on CUDA (CPU runs log no memory).",
    "steps": f"Test accuracy (%) against inference steps, mean ± s.e. over seeds. {MISSING}: "
    "not evaluated.",
}


def build_report(runs: pd.DataFrame, histories: pd.DataFrame) -> Report:
    """Tables and figures from tidy runs (`tidy_runs`) and their histories."""
    report = Report(runs)
    report.tables["table1"] = table1(runs)
    report.tables["table2"] = table2(runs)
    onehot = runs[runs.embedding == FIGURE_EMBEDDING]
    if not histories.empty and onehot.run_id.isin(histories.run_id).any():
        report.figures["figure3"] = figure3(onehot, histories)
    steps = [c for c in runs if c.startswith(STEPS_PREFIX)]
    if steps:
        report.tables["steps"] = steps_table(runs)
        if onehot[steps].notna().any(axis=None):
            report.figures["steps"] = steps_figure(onehot)
    return report


def write_report(report: Report, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    wide = {"table1": wide_table1, "table2": wide_table2, "steps": wide_steps}
    files = [out / "runs.csv"]
    report.runs.to_csv(files[0], index=False)
    for name, long in report.tables.items():
        table = wide[name](long)
        long.to_csv(out / f"{name}.csv", index=False)
        caption = TABLE_CAPTIONS[name]
        (out / f"{name}.md").write_text(markdown(table) + f"\n{caption}\n")
        (out / f"{name}.tex").write_text(latex(table, caption))
        files += [out / f"{name}.{ext}" for ext in ("csv", "md", "tex")]
    for name, figure in report.figures.items():
        for ext in ("png", "pdf"):
            figure.savefig(out / f"{name}.{ext}", dpi=150)
            files.append(out / f"{name}.{ext}")
    report.files = files
    return files


def report_from_mlflow(
    tracking_uri: str,
    out: Path,
    sweeps: Sequence[str] = (),
    parent_runs: Sequence[str] = (),
    experiments: Sequence[str] = (),
    filter_string: str = "",
) -> Report:
    """Select runs, build the report, write it to `out` and log it to the parent runs."""
    client = MlflowClient(tracking_uri)
    parents = [*parent_runs, *(find_sweep(client, name) for name in sweeps)]
    runs = tidy_runs(search_runs(tracking_uri, experiments, parents, filter_string))
    if runs.empty:
        raise SystemExit(
            "noprop-report: no finished training runs match; check --tracking-uri and the "
            "--sweep / --parent-run / --experiment / --filter selection"
        )
    onehot = runs.run_id[runs.embedding == FIGURE_EMBEDDING]
    report = build_report(runs, accuracy_histories(client, onehot))
    write_report(report, out)
    for parent in parents:
        for path in report.files:
            client.log_artifact(parent, str(path), artifact_path="report")
    print(f"{len(runs)} runs -> {out}: " + ", ".join(f.name for f in report.files))
    if parents:
        print("logged under report/ of the parent run(s) " + ", ".join(parents))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="noprop-report",
        description="Figure 3, Tables 1-2 and the inference-steps study from MLflow runs.",
    )
    parser.add_argument(
        "--tracking-uri",
        default=default_tracking_uri(),
        help="MLflow store or server (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        help="the latest sweep of this name, e.g. figure3_small (repeatable)",
    )
    parser.add_argument(
        "--parent-run", action="append", default=[], help="a sweep's parent run id (repeatable)"
    )
    parser.add_argument(
        "--experiment",
        action="append",
        default=[],
        help="experiment name, when no sweep or parent run is given (default: noprop)",
    )
    parser.add_argument(
        "--filter", default="", help="an MLflow filter, e.g. \"params.train.epochs = '100'\""
    )
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output folder")
    args = parser.parse_args(argv)
    try:
        report = report_from_mlflow(
            args.tracking_uri, args.out, args.sweep, args.parent_run, args.experiment, args.filter
        )
    except ValueError as error:  # a selection that names nothing: say so, no traceback
        parser.error(str(error))
    print(markdown(wide_table1(report.tables["table1"])))


if __name__ == "__main__":
    main()
