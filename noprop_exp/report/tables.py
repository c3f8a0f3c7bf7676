"""The report's tables: statistics over seeds, long tables (one row per cell), their display
forms (rows and columns as in the paper's tables) and their Markdown and LaTeX renderings."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from noprop_exp import paper
from noprop_exp.report.runs import KEY, STEPS_PREFIX

MISSING = "—"


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


# ---------------------------------------------------------------------------- long tables


def rank(order: dict[str, str], key: str) -> tuple[int, str]:
    """Sort key: the paper's order first (`order`'s keys), then others by name."""
    return (list(order).index(key) if key in order else len(order), key)


def _datasets(present: Iterable[str]) -> list[str]:
    return sorted(set(paper.TABLE_DATASETS) | set(present), key=lambda d: rank(paper.DATASETS, d))


def table1(runs: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (variant, embedding, dataset) of the paper or of the runs."""
    ours = {
        key: (*pooled_mean_se(g.test_acc, g.test_acc_se, g.repeats), len(g), int(g.repeats.sum()))
        for key, g in runs.dropna(subset=["test_acc"]).groupby(KEY)
    }
    rows = {(v, e) for v, e, _ in ours} | set(paper.TABLE1)
    rows = sorted(rows, key=lambda ve: (rank(paper.VARIANTS, ve[0]), rank(paper.EMBEDDINGS, ve[1])))
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
                    "paper": paper.accuracy(variant, embedding, dataset),
                }
            )
    return pd.DataFrame.from_records(records)


def table2(runs: pd.DataFrame) -> pd.DataFrame:
    """Long table: peak memory (GB) per (variant, dataset), one-hot runs, mean over seeds."""
    onehot = runs[runs.embedding == paper.FIGURE3_EMBEDDING]
    ours = {
        key: (g.peak_mem_gb.mean(), int(g.peak_mem_gb.notna().sum()))
        for key, g in onehot.groupby(["variant", "dataset"])
    }
    variants = {v for v, _ in ours} | set(paper.TABLE2)
    variants = sorted(variants, key=lambda v: rank(paper.VARIANTS, v))
    records = [
        {
            "variant": variant,
            "dataset": dataset,
            "peak_mem_gb": ours.get((variant, dataset), (math.nan, 0))[0],
            "seeds": ours.get((variant, dataset), (math.nan, 0))[1],
            "paper": paper.memory_gb(variant, dataset),
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
            rank(paper.VARIANTS, kg[0][0]),
            rank(paper.EMBEDDINGS, kg[0][1]),
            rank(paper.DATASETS, kg[0][2]),
            kg[0][3],
        ),
    )
    records = [
        {**dict(zip([*KEY, "steps"], key, strict=True)), "test_acc": m, "test_acc_se": se}
        for key, g in groups
        for m, se in [mean_se(g.acc)]
    ]
    return pd.DataFrame.from_records(records, columns=[*KEY, "steps", "test_acc", "test_acc_se"])


# ---------------------------------------------------------------------------- display tables


def _number(value: float, digits: int = 2) -> str:
    return MISSING if pd.isna(value) else f"{value:.{digits}f}"


def _mean_se(mean: float, se: float) -> str:
    if pd.isna(mean):
        return MISSING
    return _number(mean) if pd.isna(se) else f"{mean:.2f} ± {se:.2f}"


def name(names: dict[str, str], key: str) -> str:
    """The paper's display name of a key, else the key itself."""
    return names.get(key, key)


def wide_table1(long: pd.DataFrame) -> pd.DataFrame:
    """Display table: rows method x embedding; per dataset an `ours` and a `paper` column."""
    out = {}
    for (variant, embedding), g in long.groupby(["variant", "embedding"], sort=False):
        row = {}
        for r in g.itertuples():
            row[f"{name(paper.DATASETS, r.dataset)} ours"] = _mean_se(r.test_acc, r.test_acc_se)
            row[f"{name(paper.DATASETS, r.dataset)} paper"] = _number(r.paper)
        out[(name(paper.VARIANTS, variant), name(paper.EMBEDDINGS, embedding))] = row
    return _indexed(out, ["method", "embedding"])


def wide_table2(long: pd.DataFrame) -> pd.DataFrame:
    """Display table: rows method; per dataset an `ours` and a `paper` column."""
    out = {}
    for variant, g in long.groupby("variant", sort=False):
        row = {}
        for r in g.itertuples():
            row[f"{name(paper.DATASETS, r.dataset)} ours"] = _number(r.peak_mem_gb)
            row[f"{name(paper.DATASETS, r.dataset)} paper"] = _number(r.paper)
        out[(name(paper.VARIANTS, variant),)] = row
    return _indexed(out, ["method"])


def wide_steps(long: pd.DataFrame) -> pd.DataFrame:
    """Display table: rows method x embedding x dataset, a column per number of steps."""
    out: dict[tuple[str, ...], dict[str, str]] = {}
    for r in long.itertuples():
        key = (name(paper.VARIANTS, r.variant), name(paper.EMBEDDINGS, r.embedding))
        row = out.setdefault((*key, name(paper.DATASETS, r.dataset)), {})
        row[f"{r.steps} steps"] = _mean_se(r.test_acc, r.test_acc_se)
    table = _indexed(out, ["method", "embedding", "dataset"])
    return table[sorted(table.columns, key=lambda c: int(c.split()[0]))].fillna(MISSING)


def _indexed(rows: dict[tuple[str, ...], dict[str, str]], names: list[str]) -> pd.DataFrame:
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(list(rows), names=names)
    return table


# ---------------------------------------------------------------------------- renderings


def markdown_table(frame: pd.DataFrame, format_cell: Callable[[object], str] = str) -> str:
    """A GitHub-flavoured Markdown table of `frame`'s columns, each cell kept to one line and
    its `|` escaped so that no text breaks the columns."""

    def cell(value: object) -> str:
        return " ".join(format_cell(value).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |"]
    lines.append("|" + "---|" * len(frame.columns))
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines) + "\n"


def markdown(table: pd.DataFrame) -> str:
    """A display table in Markdown, the index levels as its first columns."""
    return markdown_table(table.reset_index())


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
