"""MLflow bookkeeping of one training run: its lifecycle, params, tags, metrics and artifacts.

A run opens in a `with tracked_run(...)` block and always closes there: FINISHED when the block
ends, FAILED (or KILLED on Ctrl-C) when it raises, keeping everything logged so far. Nothing of a
run is held back until the end, so a crash loses at most the epoch in progress.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

# Config groups whose choice becomes a run tag, so the MLflow UI can filter and group runs.
GROUP_TAGS = ("variant", "dataset", "backbone", "embedding", "noise_schedule", "solver")
# Set in each sweep job's process by the sweep callback (noprop_exp.sweep.SweepParentRun):
# the job's run then becomes a child of the sweep's parent run.
PARENT_RUN_ENV = "NOPROP_MLFLOW_PARENT_RUN_ID"


def flatten_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as dotted keys, e.g. {'train.lr': 0.001}."""
    flat: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    visit(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return flat


class RunTracker:
    """Logs to one active MLflow run; created by `tracked_run`."""

    def __init__(self, run: mlflow.ActiveRun) -> None:
        self.run_id = run.info.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        mlflow.log_metrics({name: float(value) for name, value in metrics.items()}, step=step)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        mlflow.log_table(data=pd.DataFrame(rows), artifact_file=artifact_file)

    def log_state_dict(self, module: torch.nn.Module, artifact_path: str = "model") -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "state_dict.pt"
            torch.save(module.state_dict(), path)
            mlflow.log_artifact(str(path), artifact_path)


@contextmanager
def tracked_run(cfg: DictConfig, choices: Mapping[str, str]) -> Iterator[RunTracker]:
    """Open the run for `cfg` in its experiment, log config, params and tags, yield a tracker.

    `choices` maps each config group to the option chosen (Hydra's runtime choices).
    """
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_experiment(cfg.mlflow.experiment_name)
    tags = {group: choices[group] for group in GROUP_TAGS if group in choices}
    if choices.get("experiment"):
        tags["experiment"] = choices["experiment"]
    parent_run_id = os.environ.get(PARENT_RUN_ENV)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=cfg.mlflow.run_name, tags=tags) as run:
        mlflow.log_params(flatten_config(cfg))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        yield RunTracker(run)
