"""Helpers over an MLflow store shared by the commands that record and read runs."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
from mlflow.tracking import MlflowClient


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of the experiment `name`, created if the store has none of that name."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def accuracy_histories(client: MlflowClient, run_ids: Iterable[str]) -> pd.DataFrame:
    """Per run and evaluated epoch, in epoch order: cumulative training time (s) and test
    accuracy (%); an epoch is evaluated when the run logged `test_acc` at its step."""
    rows = []
    for run_id in run_ids:
        times = {m.step: m.value for m in client.get_metric_history(run_id, "train_time_s")}
        accs = sorted(client.get_metric_history(run_id, "test_acc"), key=lambda m: m.step)
        rows += [(run_id, m.step, times[m.step], m.value) for m in accs if m.step in times]
    return pd.DataFrame(rows, columns=["run_id", "epoch", "train_time_s", "test_acc"])
