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
- `steps.png/.pdf`, `steps.md/.csv/.tex` when runs logged `test_acc_steps/N` (eval.steps_sweep):
  accuracy against the number of inference steps, mean +- s.e. over seeds.
- `study.md/.csv/.tex`, `study.png` for a sweep over training settings (any swept key but
  seeds, presets and groups; `sweeps/ct_study.yaml`): a row per setting, seeds pooled, by
  validation accuracy, steadiness and gradient norms, test accuracy beside (`study.py`);
- `runs.csv`: the runs used, one row each, with their setting; `runs_left_out.csv`: the runs
  of other settings (below), when there are any. The command prints both, cell by cell.

Every row and column of the paper's tables is shown, and the cells without runs read "—": a
missing number is shown as missing, never dropped or filled in. Only FINISHED runs count. A cell
(variant, embedding, dataset) pools runs of one setting only (experiment preset, epochs,
training images, solver, inference steps: `runs.comparable_runs`): a paper preset's runs, else
those of the most epochs, the most images, the latest; `--filter` picks another. Of several runs
of one seed and setting the latest counts, so that a re-run replaces a run instead of counting
as one more seed. With a parent run (or `--sweep`) the outputs are also
logged to it under `report/`. Everything is keyed on the runs' tags (`variant`, `dataset`,
`embedding`) and params (`seed`, `eval.repeats`, `embedding.dim`), so new variants appear as new
rows without changes here.

The paper's numbers come from `noprop_exp.paper` (docs/NOPROP_SPEC.md §8). Here: the report
from tidy runs and the CLI; `runs`: selecting runs in MLflow and their tidy table; `tables`:
statistics, tables and their renderings; `figures`: the curves.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from noprop_exp.cli import UserError, add_tracking_uri, describe, find_run, open_store, run_command
from noprop_exp.paper import FIGURE3_EMBEDDING
from noprop_exp.report.figures import figure3, steps_figure
from noprop_exp.report.runs import (
    KEY,
    STEPS_PREFIX,
    comparable_runs,
    find_sweep,
    search_runs,
    tidy_runs,
)
from noprop_exp.report.study import CAPTION as STUDY_CAPTION
from noprop_exp.report.study import (
    by_setting,
    study_figure,
    study_table,
    swept_settings,
    wide_study,
)
from noprop_exp.report.tables import (
    MISSING,
    latex,
    markdown,
    steps_table,
    table1,
    table2,
    wide_steps,
    wide_table1,
    wide_table2,
)
from noprop_exp.store import accuracy_histories

# ---------------------------------------------------------------------------- the report


@dataclass
class Report:
    runs: pd.DataFrame
    left_out: pd.DataFrame = field(default_factory=pd.DataFrame)  # runs of other settings
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
    "study": STUDY_CAPTION,
}


def build_report(runs: pd.DataFrame, histories: pd.DataFrame) -> Report:
    """Tables and figures from tidy runs (`tidy_runs`) and their histories."""
    report = Report(runs)
    report.tables["table1"] = table1(runs)
    report.tables["table2"] = table2(runs)
    onehot = runs[runs.embedding == FIGURE3_EMBEDDING]
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
    wide = {"table1": wide_table1, "table2": wide_table2, "steps": wide_steps, "study": wide_study}
    files = [out / "runs.csv"]
    report.runs.to_csv(files[0], index=False)
    if not report.left_out.empty:
        files.append(out / "runs_left_out.csv")
        report.left_out.to_csv(files[-1], index=False)
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
    client = open_store(tracking_uri)
    parents = [find_run(client, p).info.run_id for p in parent_runs]
    parents += [find_sweep(client, name) for name in sweeps]
    runs, left_out = comparable_runs(
        tidy_runs(search_runs(tracking_uri, experiments, parents, filter_string))
    )
    if runs.empty:
        raise UserError(
            f"no finished training runs in the MLflow store at {describe(tracking_uri)} match "
            f"{selection(sweeps, parent_runs, experiments, filter_string)};\n"
            "check --tracking-uri and the --sweep / --parent-run / --experiment / --filter options"
        )
    onehot = runs.run_id[runs.embedding == FIGURE3_EMBEDDING]
    report = build_report(runs, accuracy_histories(client, onehot))
    report.left_out = left_out
    add_study(report, client, tracking_uri, parents)
    print(runs_used(runs, left_out))
    write_report(report, out)
    for parent in parents:
        for path in report.files:
            client.log_artifact(parent, str(path), artifact_path="report")
    print(f"{len(runs)} runs -> {out}: " + ", ".join(f.name for f in report.files))
    if parents:
        print("logged under report/ of the parent run(s) " + ", ".join(parents))
    return report


def add_study(report: Report, client: MlflowClient, tracking_uri: str, parents: list[str]) -> None:
    """The study table and figure of the one parent run whose sweep varied training settings."""
    for parent in parents:
        keys = swept_settings(client.get_run(parent).data.params)
        if keys:
            groups = by_setting(search_runs(tracking_uri, parent_runs=[parent]), keys, client)
            report.tables["study"] = study_table(groups, keys)
            report.figures["study"] = study_figure(groups, keys)
            print(markdown(wide_study(report.tables["study"])))
            return


def runs_used(runs: pd.DataFrame, left_out: pd.DataFrame) -> str:
    """Which runs each cell pools, and how many of other settings it left out."""
    lines = []
    for cell, used in runs.groupby(KEY, sort=True):
        other = left_out[(left_out[KEY] == pd.Series(cell, index=KEY)).all(axis=1)]
        ids = ", ".join(run_id[:8] for run_id in used.run_id)
        line = f"{' '.join(cell)}: {len(used)} run(s) of {used.setting.iloc[0]} [{ids}]"
        if not other.empty:
            line += f"; left out {len(other)} of other settings (runs_left_out.csv)"
        lines.append(line)
    return "\n".join(lines)


def selection(
    sweeps: Sequence[str],
    parent_runs: Sequence[str],
    experiments: Sequence[str],
    filter_string: str,
) -> str:
    """The selection in the command's own words, for the message that it matched nothing."""
    words = [f"--sweep {s}" for s in sweeps] + [f"--parent-run {p}" for p in parent_runs]
    if not words:
        words = [f"--experiment {e}" for e in experiments] or ["experiment noprop (the default)"]
    if filter_string:
        words.append(f"--filter {filter_string!r}")
    return " ".join(words)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="noprop-report",
        description="Figure 3, Tables 1-2 and the inference-steps study from MLflow runs.",
    )
    add_tracking_uri(parser)
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
    report = run_command(
        parser,
        lambda args: report_from_mlflow(
            args.tracking_uri, args.out, args.sweep, args.parent_run, args.experiment, args.filter
        ),
        argv,
    )
    print(markdown(wide_table1(report.tables["table1"])))


if __name__ == "__main__":
    main()
