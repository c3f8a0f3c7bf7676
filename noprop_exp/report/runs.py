"""Selecting runs from MLflow for the report, and their tidy table (one row per training run)."""

from __future__ import annotations

from collections.abc import Sequence

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from noprop_exp import paper
from noprop_exp.cli import UserError, describe

STEPS_PREFIX = "test_acc_steps/"  # metrics test_acc_steps/N of eval.steps_sweep
KEY = ["variant", "embedding", "dataset"]
# What makes runs comparable: a cell of Table 1 or a line of Figure 3 pools runs of one setting.
SETTING = ["preset", "epochs", "train_size", "solver", "steps"]


def find_sweep(client: MlflowClient, name: str) -> str:
    """The id of the latest parent run of the sweep `name` (its tag `sweep`)."""
    parents = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.sweep = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise UserError(
            f"no sweep named {name!r} in the MLflow store at {describe(client.tracking_uri)}:\n"
            "sweeps are named after their config (sweeps/figure3_small.yaml -> figure3_small); "
            "or pass --parent-run ID"
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
    if tag == "learned" and not pd.isna(dim) and str(dim) != paper.LEARNED_DIM:
        return f"learned-d{dim}"
    return tag


def tidy_runs(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per training run: run_id, start_time, variant, embedding, dataset, seed, repeats,
    the columns of SETTING, `setting` (them in words) and the metrics used here. Of several runs
    of one (variant, embedding, dataset, seed) and setting, the latest is kept.

    Only training runs (tags `variant` and `dataset`) are read: a sweep's parent run, found
    beside its children when a whole experiment is selected, logs the swept values ("0,1") as
    its params, which are no numbers."""
    columns = ["run_id", "start_time", *KEY, "seed", "repeats", *SETTING, "setting", "test_acc"]
    if raw.empty or "tags.variant" not in raw or "tags.dataset" not in raw:
        return pd.DataFrame(columns=[*columns, "test_acc_se", "peak_mem_gb"])
    raw = raw[raw["tags.variant"].notna() & raw["tags.dataset"].notna()]

    def column(name: str) -> pd.Series:
        return raw[name] if name in raw else pd.Series(np.nan, index=raw.index, dtype=object)

    runs = pd.DataFrame(
        {
            "run_id": raw["run_id"],
            "start_time": raw["start_time"],
            "variant": raw["tags.variant"],
            "embedding": [
                embedding_key(tag, dim)
                for tag, dim in zip(
                    column("tags.embedding"), column("params.embedding.dim"), strict=True
                )
            ],
            "dataset": raw["tags.dataset"],
            "seed": pd.to_numeric(column("params.seed")),
            "repeats": pd.to_numeric(column("params.eval.repeats")).fillna(1),
            "preset": column("tags.experiment").fillna(""),
            # The tag follows a run extended on resume; MLflow params keep their first value.
            "epochs": pd.to_numeric(column("tags.epochs").fillna(column("params.train.epochs"))),
            "train_size": pd.to_numeric(column("params.dataset.train_size"), errors="coerce"),
            "solver": column("tags.solver").fillna(""),
            "steps": column("params.eval.steps").fillna(""),
        }
    )
    runs["setting"] = [describe_setting(row) for row in runs.itertuples()]
    steps = sorted(c.removeprefix("metrics.") for c in raw if f"metrics.{STEPS_PREFIX}" in c)
    for name in ["test_acc", "test_acc_se", "peak_mem_gb", *steps]:
        runs[name] = pd.to_numeric(column(f"metrics.{name}"))
    runs = runs.sort_values("start_time").drop_duplicates([*KEY, "seed", "setting"], keep="last")
    return runs.reset_index(drop=True)


def describe_setting(run: object) -> str:
    """A run's SETTING in words, e.g. `experiment=paper/mnist_dt, 100 epochs, all training
    images, solver=posterior, eval.steps=None`."""
    epochs = "? epochs" if pd.isna(run.epochs) else f"{run.epochs:g} epochs"
    images = "all" if pd.isna(run.train_size) else f"{run.train_size:,.0f}"
    return ", ".join(
        [
            f"experiment={run.preset}" if run.preset else "no experiment preset",
            epochs,
            f"{images} training images",
            f"solver={run.solver or '?'}",
            f"eval.steps={run.steps or '?'}",
        ]
    )


def comparable_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(used, left out): of each (variant, embedding, dataset), the runs of one setting, so that
    no cell pools a one-epoch smoke run with a paper run, and a later smoke run never replaces
    one. The setting chosen: a paper preset's before any other, then the most epochs, then the
    most training images, then the latest. Narrow the choice with `--filter`."""
    if runs.empty:
        return runs, runs
    ranked = runs.assign(
        paper_preset=runs.preset.str.startswith("paper/"),
        images=runs.train_size.fillna(np.inf),  # no train_size: the whole training split
    ).sort_values(["paper_preset", "epochs", "images", "start_time"], na_position="first")
    chosen = ranked.groupby(KEY).tail(1)[[*KEY, "setting"]]
    used = runs.merge(chosen, on=[*KEY, "setting"], how="left", indicator=True)["_merge"]
    is_used = (used == "both").to_numpy()
    return runs[is_used].reset_index(drop=True), runs[~is_used].reset_index(drop=True)
