"""Selecting runs from MLflow for the report, and their tidy table (one row per training run)."""

from __future__ import annotations

from collections.abc import Sequence

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from noprop_exp import paper
from noprop_exp.cli import UserError, describe

STEPS_PREFIX = "test_acc_steps_"  # metrics test_acc_steps_N of eval.steps_sweep
KEY = ["variant", "embedding", "dataset"]


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
    """One row per training run: run_id, start_time, variant, embedding, dataset, seed, repeats
    and the metrics used here. Of several runs of one (variant, embedding, dataset, seed), the
    latest is kept.

    Only training runs (tags `variant` and `dataset`) are read: a sweep's parent run, found
    beside its children when a whole experiment is selected, logs the swept values ("0,1") as
    its params, which are no numbers."""
    columns = ["run_id", "start_time", *KEY, "seed", "repeats", "test_acc", "test_acc_se"]
    if raw.empty or "tags.variant" not in raw or "tags.dataset" not in raw:
        return pd.DataFrame(columns=[*columns, "peak_mem_gb"])
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
        }
    )
    steps = sorted(c.removeprefix("metrics.") for c in raw if f"metrics.{STEPS_PREFIX}" in c)
    for name in ["test_acc", "test_acc_se", "peak_mem_gb", *steps]:
        runs[name] = pd.to_numeric(column(f"metrics.{name}"))
    runs = runs.sort_values("start_time").drop_duplicates([*KEY, "seed"], keep="last")
    return runs.reset_index(drop=True)
